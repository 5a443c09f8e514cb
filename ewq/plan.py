"""Stage 3: the quantization plan, a JSON file a person can read and edit.

The entropy rule (the published PoC's): with mu, sigma the mean and population standard deviation
of the block entropies,  H >= mu -> raw;  mu - k*sigma <= H < mu -> 8-bit;  H < mu - k*sigma -> 4-bit.
When every block has the same entropy (sigma = 0) every block stays raw.

Estimated storage per precision (what bitsandbytes keeps): raw 16 bits per weight (fp16/bf16);
8-bit: int8 data + one fp32 scale per output row (LLM.int8); 4-bit: packed nf4/fp4 + one fp32
absmax per 64 weights (4.5 bits), without double quantization.
"""

import hashlib
import json
import math
import statistics
import time
from pathlib import Path

from . import __version__
from .common import EWQError, peak_rss_gb

SCHEMA_VERSION = 1
PRECISIONS = ("raw", "8-bit", "4-bit")
RULE = "H >= mu -> raw; mu - k*sigma <= H < mu -> 8-bit; H < mu - k*sigma -> 4-bit"
BUILTIN_PLANS = {"raw": "raw", "uniform-8bit": "8-bit", "uniform-4bit": "4-bit"}


def entropy_rule(entropies, k: float):
    """Precision per block from its entropy; returns (precisions, stats). k >= 0 is checked by make_plan."""
    if min(entropies) == max(entropies):  # sigma = 0: nothing stands out, keep everything raw
        mu, sigma = entropies[0], 0.0
    else:
        mu, sigma = statistics.fmean(entropies), statistics.pstdev(entropies)
    low = mu - k * sigma
    precisions = ["raw" if h >= mu else "8-bit" if h >= low else "4-bit" for h in entropies]
    return precisions, {"mean": mu, "std": sigma, "raw_threshold": mu, "four_bit_threshold": low}


def estimated_bytes(params: int, rows: int, precision: str) -> float:
    if precision == "raw":
        return 2.0 * params
    if precision == "8-bit":
        return params + 4.0 * rows
    if precision == "4-bit":
        return params / 2 + 4.0 * math.ceil(params / 64)
    raise EWQError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")


def size_summary(blocks, other_params: int) -> dict:
    params = sum(b["params"] for b in blocks)
    before = sum(estimated_bytes(b["params"], b["rows"], "raw") for b in blocks)
    after = sum(estimated_bytes(b["params"], b["rows"], b["precision"]) for b in blocks)
    return {
        "block_params": params,
        "other_params": other_params,
        "blocks_bytes_before": int(before),
        "blocks_bytes_after": int(after),
        "model_bytes_before": int(before + 2 * other_params),
        "model_bytes_after": int(after + 2 * other_params),
        "avg_bits_per_weight": round(8 * after / params, 4),
    }


def counts(blocks) -> dict:
    return {p: sum(b["precision"] == p for b in blocks) for p in PRECISIONS}


def model_section(source, ckpt, fingerprint: str) -> dict:
    return {
        "id": source.id,
        "path": str(source.path),
        "fingerprint": fingerprint,
        "architecture": ckpt.architecture,
        "model_type": ckpt.config.get("model_type"),
        "layout": ckpt.layout,
        "block_prefix": ckpt.block_prefix,
        "block_count": len(ckpt.blocks),
    }


def block_rows(ckpt) -> list:
    return [{"index": b.index, "params": b.params, "rows": sum(ckpt.rows(t) for t in b.matrices)} for b in ckpt.blocks]


def build_plan(source, ckpt, fingerprint: str, method: dict, precisions, entropies=None, stats=None,
               analysis_s: float = 0.0) -> dict:
    """Assemble the plan dict. Everything except `run` depends only on the weights and settings."""
    blocks = block_rows(ckpt)
    for i, b in enumerate(blocks):
        if entropies is not None:
            b["entropy"] = round(entropies[i], 9)
        b["precision"] = precisions[i]
    other_params = sum(t.numel for t in ckpt.other) + sum(t.numel for b in ckpt.blocks for t in b.others)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "ewq-plan",
        "model": model_section(source, ckpt, fingerprint),
        "method": method,
        "stats": {k: round(v, 9) for k, v in stats.items()} if stats else None,
        "blocks": blocks,
        "other": {"params": other_params, "note": "embeddings, norms, biases and lm_head are never quantized",
                  "tensors": [t.name for t in ckpt.other]},
        "counts": counts(blocks),
        "size": size_summary(blocks, other_params),
        "run": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "analysis_s": round(analysis_s, 3),
                "peak_rss_gb": round(peak_rss_gb(), 3), "tool_version": __version__},
    }


def entropy_plan(source, ckpt, analysis, entropy: str, k: float, bins: int) -> dict:
    precisions, stats = entropy_rule(analysis.block_entropies, k)
    method = {"name": "entropy", "entropy": entropy, "bins": bins if entropy == "histogram" else None,
              "k": k, "rule": RULE}
    return build_plan(source, ckpt, analysis.fingerprint, method, precisions, analysis.block_entropies, stats,
                      analysis.seconds)


def builtin_plan(name: str, source, ckpt, fingerprint: str) -> dict:
    """The baselines EWQ must beat: every block raw, 8-bit or 4-bit."""
    precision = BUILTIN_PLANS[name]
    return build_plan(source, ckpt, fingerprint, {"name": name}, [precision] * len(ckpt.blocks))


def plan_hash(plan: dict) -> str:
    """Covers the weights' fingerprint and the method settings, so a plan never silently moves models."""
    key = json.dumps({"fingerprint": plan["model"]["fingerprint"], "method": plan["method"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def plan_filename(plan: dict) -> str:
    return f"quant_plan_{plan_hash(plan)}.json"


def load_plan(path) -> dict:
    """Read a plan file and check its structure (a person may have edited it)."""
    path = Path(path)
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EWQError(f"plan file {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise EWQError(f"plan file {path} is not valid JSON ({e}); fix it or regenerate it with main_cache_model.py") from None
    validate_plan(plan, path)
    # counts and sizes derive from the precisions, which a person may have edited: recompute them
    plan["blocks"].sort(key=lambda b: b["index"])
    plan["counts"] = counts(plan["blocks"])
    plan["size"] = size_summary(plan["blocks"], plan["other"]["params"])
    return plan


def validate_plan(plan: dict, path="plan") -> None:
    if not isinstance(plan, dict) or plan.get("schema_version") != SCHEMA_VERSION:
        raise EWQError(f"{path} is not an EWQ plan of schema_version {SCHEMA_VERSION}; regenerate it with main_cache_model.py")
    try:
        n = int(plan["model"]["block_count"])
        blocks = plan["blocks"]
        plan["model"]["fingerprint"]
        int(plan["other"]["params"])
    except (KeyError, TypeError, ValueError):
        raise EWQError(f"{path} lacks model.block_count, model.fingerprint or blocks; regenerate it with main_cache_model.py") from None
    seen = set()
    for b in blocks:
        if not isinstance(b, dict) or not isinstance(b.get("index"), int) or not 0 <= b["index"] < n:
            raise EWQError(f"{path}: block index {b.get('index') if isinstance(b, dict) else b!r} is out of range 0..{n - 1}")
        if b["index"] in seen:
            raise EWQError(f"{path}: block {b['index']} appears twice")
        seen.add(b["index"])
        if not all(isinstance(b.get(f), int) and b[f] >= 0 for f in ("params", "rows")):
            raise EWQError(f"{path}: block {b['index']} lacks integer 'params' and 'rows'; regenerate the plan")
        if b.get("precision") not in PRECISIONS:
            raise EWQError(f"{path}: block {b['index']} has unknown precision {b.get('precision')!r}; "
                           f"use one of {', '.join(PRECISIONS)}")
    if len(seen) != n:
        raise EWQError(f"{path} lists {len(seen)} blocks but the model has {n}; every block needs a precision")


def check_plan_matches(plan: dict, fingerprint: str, block_count: int, path="plan") -> None:
    if plan["model"]["block_count"] != block_count:
        raise EWQError(f"{path} is for a model with {plan['model']['block_count']} blocks, this one has {block_count}")
    if plan["model"]["fingerprint"] != fingerprint:
        raise EWQError(f"{path} was made for other weights (fingerprint {plan['model']['fingerprint']}, this model "
                       f"{fingerprint}); run main_cache_model.py on this model to make its plan")


def format_summary(plan: dict) -> str:
    c, s = plan["counts"], plan["size"]
    gb = 1e9
    lines = [
        f"model      {plan['model']['id']} ({plan['model']['architecture']}, {plan['model']['block_count']} blocks, "
        f"fingerprint {plan['model']['fingerprint'][:12]})",
        f"method     {json.dumps({k: v for k, v in plan['method'].items() if k not in ('rule', 'calibration', 'allocator')})}",
        f"blocks     raw {c['raw']}  8-bit {c['8-bit']}  4-bit {c['4-bit']}",
        f"weights    blocks {s['blocks_bytes_before'] / gb:.3f} GB -> {s['blocks_bytes_after'] / gb:.3f} GB, "
        f"whole model {s['model_bytes_before'] / gb:.3f} GB -> {s['model_bytes_after'] / gb:.3f} GB (estimated)",
        f"avg bits   {s['avg_bits_per_weight']:.2f} bits per block weight",
    ]
    if plan.get("stats"):
        st = plan["stats"]
        lines.append(f"entropy    mu {st['mean']:.4f}  sigma {st['std']:.4f}  4-bit below {st['four_bit_threshold']:.4f}")
    run = plan.get("run") or {}
    lines.append(f"time       {run.get('analysis_s', 0):.2f} s analysis, peak RSS {run.get('peak_rss_gb', 0):.2f} GB")
    return "\n".join(lines)


METHODS = ("entropy", "sensitivity", "position")


def plan_label(plan: dict) -> str:
    """A short name for a plan's variant in results and reports."""
    m = plan["method"]
    target = m.get("target") or {}
    size = f"-{target['target_bits']:g}b" if "target_bits" in target else f"-{target['max_weight_gb']:g}gb" if target else ""
    if m["name"] == "entropy":
        return f"ewq-{m['entropy']}" + (size or f"-k{m['k']:g}")
    return m["name"] + size


def make_plan(model: str, method: str = "entropy", entropy: str = "histogram", k: float = 1.0, bins: int = 128,
              target_bits=None, max_weight_gb=None, calib_tokens=None, calib_text=None, quant_type: str = "nf4",
              force: bool = False, models_dir="models", out_dir="quantized_models", progress: bool = True):
    """checkpoint -> analysis -> (sensitivity) -> plan file. Returns (path, plan, reused).

    Without a size target, `entropy` applies the mu/sigma rule; `sensitivity` and `position` aim at the
    size of that rule's plan, so every method can be compared at equal size by default."""
    from . import allocate
    from .analysis import analyze
    from .checkpoint import open_checkpoint
    from .common import check_writable_dir, write_json_atomic
    from .source import resolve_model

    if method not in METHODS:
        raise EWQError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if k < 0 or not math.isfinite(k):
        raise EWQError(f"--k must be a finite number >= 0, got {k}")
    out_dir = check_writable_dir(out_dir)
    source = resolve_model(model, models_dir)
    ckpt = open_checkpoint(source.path)
    # the research question needs both entropy definitions beside the measured sensitivity
    analysis = analyze(ckpt, entropy, progress=progress, also=("histogram", "softmax") if method == "sensitivity" else ())
    rule_plan = entropy_plan(source, ckpt, analysis, entropy, k, bins)
    has_target = target_bits is not None or max_weight_gb is not None
    if method == "entropy" and not has_target:
        plan = rule_plan
    else:
        blocks, other = rule_plan["blocks"], rule_plan["other"]["params"]
        if has_target:
            target = {"target_bits": target_bits} if target_bits is not None else {"max_weight_gb": max_weight_gb}
        else:
            target = {"target_bits": rule_plan["size"]["avg_bits_per_weight"],
                      "from": f"the size of the {entropy} entropy rule plan (k={k:g})"}
        budget = allocate.budget_bytes(blocks, other, target.get("target_bits"), target.get("max_weight_gb"))
        sizes = allocate.block_sizes(blocks)
        method_info = {"name": method, "target": target}
        extra = None
        if method == "entropy":
            order = sorted(range(len(blocks)), key=lambda i: (analysis.block_entropies[i], i))
            precisions = allocate.ordered_allocation(order, sizes, budget)
            method_info.update(entropy=entropy, bins=bins if entropy == "histogram" else None,
                               allocator="ordered: lowest entropy lowered first, all to 8-bit, then to 4-bit")
        elif method == "position":
            precisions = allocate.ordered_allocation(allocate.position_order(len(blocks)), sizes, budget)
            method_info["allocator"] = "ordered: middle blocks lowered first; first and last blocks keep the most bits"
        else:
            from . import sensitivity
            from .apply import QuantSettings

            rows, calibration, cached = sensitivity.measure(
                source, ckpt, analysis.fingerprint, out_dir, calib_tokens or sensitivity.CALIB_TOKENS, calib_text,
                settings=QuantSettings(quant_type=quant_type), progress=progress)
            costs = [{"raw": 0.0, "8-bit": r["8-bit"], "4-bit": r["4-bit"]} for r in rows]
            precisions = allocate.optimal_allocation(costs, sizes, budget)
            method_info.update(calibration=calibration, quant_type=quant_type,
                               allocator="exact: minimum summed block KL within the byte budget (Pareto DP)")
            extra = [{"kl_8bit": round(r["8-bit"], 9), "kl_4bit": round(r["4-bit"], 9),
                      "entropies": {kind: round(v[i], 9) for kind, v in analysis.by_kind.items()}}
                     for i, r in enumerate(rows)]
        plan = build_plan(source, ckpt, analysis.fingerprint, method_info, precisions, analysis.block_entropies,
                          None, analysis.seconds)
        if extra:
            for b, e in zip(plan["blocks"], extra):
                b.update(e)
        if method == "sensitivity":
            plan["run"]["sensitivity_cached"] = cached  # under "run": not part of the plan's identity
    path = out_dir / plan_filename(plan)
    if path.exists() and not force:
        try:
            return path, load_plan(path), True
        except EWQError:
            pass  # an unreadable old file is replaced below
    write_json_atomic(path, plan)
    return path, plan, False
