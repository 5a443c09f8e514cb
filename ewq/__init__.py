"""EWQ: entropy-weighted quantization of transformer blocks, with honest measurements.

Data flows one way, one module per stage:
    source (find the checkpoint) -> checkpoint (tensors, blocks) -> analysis (entropy, fingerprint)
    -> planning (choose precisions; allocate: size targets; sensitivity: measured damage) -> plan (the plan file)
    -> apply (quantized model; artifact: save/load it) -> generate / embed (each model kind's measurements,
    on probes: timing, memory, roofline; quality: KL) -> result (the result file) -> report
runner wires a benchmark run for both benchmark scripts and every model kind; demo runs the whole story;
status lists the models on disk; serve serves one; synthetic writes random checkpoints with real shapes.
"""

__version__ = "0.1.0"
