"""Small pieces every stage shares: the user-facing error, atomic writes, peak memory, the CLI wrapper."""

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path


class EWQError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits 2."""


def write_json_atomic(path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_text_atomic(path, text: str) -> Path:
    """Write to a temporary file in the same directory, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and plans are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def unique_path(directory, stem: str, suffix: str) -> Path:
    """A path in `directory` that does not exist yet (never overwrite an earlier result)."""
    directory = Path(directory)
    candidate = directory / f"{stem}{suffix}"
    n = 1
    while candidate.exists():
        candidate = directory / f"{stem}_{n}{suffix}"
        n += 1
    return candidate


def check_writable_dir(directory) -> Path:
    """Create `directory` if needed and prove we can write there, before any long work starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".ewq_write_test_"):
            pass
    except OSError as e:
        raise EWQError(f"cannot write to output directory {directory}: {e.strerror or e}; "
                       f"choose another with --out-dir or fix its permissions") from None
    return directory


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (what is wrong, where to look), exit 2."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def run_cli(main, argv=None) -> int:
    """Run a script's main(); a user error becomes one line on stderr and exit code 2, no traceback."""
    try:
        return main(argv) or 0
    except EWQError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing was written\n")
        return 130
