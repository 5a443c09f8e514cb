"""python -m ewq.serve: see the package's docstring, or --help."""

import sys

from ..common import run_cli
from .cli import main

sys.exit(run_cli(main))
