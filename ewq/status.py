"""What models are here, and are they quantized?  python -m ewq.status [--json]

Lists every model directory under models/ and quantized_models/ with its metadata.json: base model,
is_quantized, method, precision counts, size on disk, and the plans and benchmark results that belong
to it (matched by the weights' fingerprint). A directory without metadata.json is listed as unknown,
not guessed; a damaged metadata.json is listed as broken.
"""

import json
import sys
from pathlib import Path

from .common import ArgumentParser, EWQError, run_cli

SCHEMA_VERSION = 1
MAX_DEPTH = 4  # models/models--org--name/snapshots/<revision>/ in the huggingface_hub cache layout


def model_dirs(root: Path) -> list:
    found = []

    def walk(d: Path, depth: int):
        if d.name.startswith(".") and depth:
            return  # caches and half-written directories
        names = {p.name for p in d.iterdir()}
        if depth and ("metadata.json" in names or "config.json" in names):
            found.append(d)
            return
        if depth < MAX_DEPTH:
            for p in sorted(d.iterdir()):
                if p.is_dir():
                    walk(p, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def disk_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # stat follows the hub cache's symlinks


def _json_files(directory: Path, pattern: str) -> list:
    out = []
    for f in sorted(directory.glob(pattern)) if directory.is_dir() else []:
        try:
            out.append((f, json.loads(f.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue
    return out


def entry(d: Path, plans: list, results: list) -> dict:
    row = {"path": str(d), "name": d.name, "size_bytes": disk_bytes(d), "is_quantized": "unknown", "method": None,
           "base_model": None, "fingerprint": None, "counts": None, "plans": [], "results": [], "problem": None}
    meta_file = d / "metadata.json"
    if not meta_file.is_file():
        row["problem"] = "no metadata.json"
        return row
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        quantized = meta["is_quantized"]
        if not isinstance(quantized, bool):
            raise ValueError("is_quantized is not true/false")
    except (OSError, ValueError, KeyError, TypeError) as e:
        row["problem"] = f"broken metadata.json ({type(e).__name__}: {e})"
        return row
    fp = meta.get("base_fingerprint") if quantized else meta.get("fingerprint")
    row.update(is_quantized=quantized, method=meta.get("method"), base_model=meta.get("base_model"), fingerprint=fp,
               counts=meta.get("counts"))
    if quantized:
        row["plans"] = [f"plan.json ({meta.get('plan_hash')})"]
        row["results"] = [f.name for f, r in results if r.get("model", {}).get("path") == str(d)]
    elif fp:
        row["plans"] = [f.name for f, p in plans if p.get("model", {}).get("fingerprint") == fp]
        row["results"] = [f.name for f, r in results if r.get("model", {}).get("fingerprint") == fp
                          and r.get("load", {}).get("path_taken") != "saved-quantized"]
    return row


def status(models_dir="models", plans_dir="quantized_models", results_dir="benchmark_results") -> list:
    plans = _json_files(Path(plans_dir), "quant_plan_*.json")
    results = _json_files(Path(results_dir), "*_benchmark_*.json")
    return [entry(d, plans, results) for root in (Path(models_dir), Path(plans_dir)) for d in model_dirs(root)]


def format_table(rows) -> str:
    if not rows:
        return "no models found"
    lines = [f"{'model':<44} {'quantized':<9} {'method':<18} {'raw/8/4':<9} {'size GB':>8} {'plans':>5} {'results':>7}  base"]
    for r in rows:
        c = r["counts"]
        counts = f"{c['raw']}/{c['8-bit']}/{c['4-bit']}" if c else "-"
        q = {True: "yes", False: "no"}.get(r["is_quantized"], "unknown")
        lines.append(f"{r['path'][-44:]:<44} {q:<9} {(r['method'] or '-')[:18]:<18} {counts:<9} "
                     f"{r['size_bytes'] / 1e9:>8.3f} {len(r['plans']):>5} {len(r['results']):>7}  "
                     f"{r['base_model'] or r['problem'] or '-'}")
    return "\n".join(lines)


def main(argv=None):
    p = ArgumentParser(prog="python -m ewq.status", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print JSON for scripts instead of the table")
    p.add_argument("--models-dir", default="models", help="where embedded and fetched models live (default models/)")
    p.add_argument("--plans-dir", default="quantized_models",
                   help="where plans and saved quantized models are (default quantized_models/)")
    p.add_argument("--results-dir", default="benchmark_results",
                   help="where benchmark result JSONs are (default benchmark_results/)")
    args = p.parse_args(argv)
    for flag in ("models_dir", "plans_dir", "results_dir"):  # a typo must not read as "no models"
        given = Path(getattr(args, flag))
        if given.exists() and not given.is_dir() or not given.exists() and str(given) != p.get_default(flag):
            raise EWQError(f"--{flag.replace('_', '-')} {given} is not a directory; give the folder to list")
    rows = status(args.models_dir, args.plans_dir, args.results_dir)
    if args.json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "models": rows}, indent=2))
    else:
        print(format_table(rows))


if __name__ == "__main__":
    sys.exit(run_cli(main))
