#!/usr/bin/env python
"""The baseline: the same benchmark suite on the original, unquantized model.

The last line of stdout is the path of the result JSON (benchmark_results/original_benchmark_<hash>_<time>.json)."""

import sys

from ewq.common import run_cli
from ewq.runner import run


def main(argv=None):
    print(run("original", argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
