#!/usr/bin/env python
"""Step 2 of EWQ: apply a plan to the original checkpoint and run the benchmark suite.

The last line of stdout is the path of the result JSON (benchmark_results/ewq_benchmark_<hash>_<time>.json)."""

import sys

from ewq.common import run_cli
from ewq.runner import run


def main(argv=None):
    print(run("ewq", argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))
