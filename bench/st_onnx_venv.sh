#!/usr/bin/env bash
# A Python environment as users deploy ONNX embeddings: sentence-transformers' ONNX backend (optimum-onnx, which pins
# transformers < 4.58, so it cannot share EWQ's venv with transformers 5), ONNX Runtime and torch's CPU build.
# sentence-transformers 6 requires transformers >= 5, so its [onnx] extra cannot be installed at all (pip finds no
# solution with optimum-onnx 0.1.0): the deployable pairing today is sentence-transformers 5.x.
# tests/test_onnx.py loads an EWQ export with it when EWQ_ST_PYTHON names its python:
#     bash bench/st_onnx_venv.sh /tmp/ewq-st-onnx
#     EWQ_ST_PYTHON=/tmp/ewq-st-onnx/bin/python .venv/bin/python -m pytest -q tests/test_onnx.py
set -euo pipefail
VENV=${1:-/tmp/ewq-st-onnx}
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 onnxruntime==1.30.0 \
    "sentence-transformers[onnx]>=5,<6"
"$VENV/bin/python" -c "import sentence_transformers, optimum.onnxruntime, onnxruntime, transformers; \
print('sentence-transformers', sentence_transformers.__version__, 'onnxruntime', onnxruntime.__version__, \
'transformers', transformers.__version__)"
echo "EWQ_ST_PYTHON=$VENV/bin/python"
