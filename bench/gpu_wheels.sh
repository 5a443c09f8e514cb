#!/usr/bin/env bash
# The wheels the GPU image lacks (bitsandbytes, torchao) or has in another version (transformers 5.17 there,
# 5.23 here; regex for its version check), downloaded here into .whl/ (git-ignored) for the device tool to carry.
# The GPU image runs Python 3.12 on x86-64 with torch 2.11 (cu130): bitsandbytes 0.50.2 ships a CUDA 13.0 library,
# torchao >= 0.17 is ABI-stable against torch 2.11. About 61 MB: the device tool carries 64 MiB with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -f .whl/*.whl
for wheel in bitsandbytes==0.50.2 torchao==0.18.0 transformers==5.23.0 regex==2026.11.15; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$wheel"
done
ls -l .whl
du -cb .whl/*.whl $(git ls-files) | tail -1 | awk '{printf "the working tree with the wheels: %.1f MB (the limit is 67.1 MB)\n", $1 / 1e6}'
