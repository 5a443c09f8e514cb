"""EWQ: entropy-weighted quantization of transformer blocks, with honest measurements.

Data flows one way, one module per stage:
    source (find the checkpoint) -> checkpoint (tensors, blocks) -> analysis (entropy, fingerprint)
    -> plan (precision per block; allocate: size targets; sensitivity: measured block damage)
    -> apply (quantized model; artifact: save/load it) -> bench / quality (measurements) -> report
runner wires a benchmark run for both benchmark scripts; demo runs the whole story; status lists
the models on disk; synthetic writes random checkpoints with real shapes for speed measurements.
"""

__version__ = "0.1.0"
