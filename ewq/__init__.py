"""EWQ: entropy-weighted quantization of transformer blocks, with honest measurements.

Data flows one way, one module per stage:
    source (find the checkpoint) -> checkpoint (tensors, blocks) -> analysis (entropy, fingerprint)
    -> plan (precision per block) -> apply (quantized model) -> bench / quality (measurements) -> report
"""

__version__ = "0.1.0"
