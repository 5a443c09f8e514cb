"""The result file: one schema for every benchmark run (original or quantized, decoder or encoder), written
once under a name that never overwrites an earlier result."""

import time
from pathlib import Path

from .common import unique_path, write_json_atomic

RESULT_SCHEMA_VERSION = 1


def write_result(result: dict, out_dir, name_hash: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = unique_path(out_dir, f"{result['kind']}_benchmark_{name_hash}_{stamp}", ".json")
    return write_json_atomic(path, result)
