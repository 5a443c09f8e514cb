"""Stage 3: the quantization plan, a JSON file a person can read and edit.

The entropy rule (the published PoC's): with mu, sigma the mean and population standard deviation
of the block entropies,  H >= mu -> raw;  mu - k*sigma <= H < mu -> 8-bit;  H < mu - k*sigma -> 4-bit.
When every block has the same entropy (sigma = 0) every block stays raw.

A block may carry `matrices: {"self_attn.q_proj": "4-bit", ...}` (a per-matrix plan): those matrices
take that precision instead of the block's `precision`. `shapes` lists every matrix of the block with
its [out, in] size, so per-matrix entries are checked and sized without opening the model.

Estimated storage per precision: raw 16 bits per weight (fp16/bf16); 8-bit: int8 data + one fp32 scale
per output row (LLM.int8 and torchao's int8 alike); 4-bit: packed 4-bit data + 4 bytes per group of
`group_size` weights (bitsandbytes: one fp32 absmax per 64; torchao: a 16-bit scale and zero point per
group), 4.5 bits at the default group of 64.
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


DEFAULT_GROUP_SIZE = 64


def estimated_bytes(params: int, rows: int, precision: str, group_size: int = DEFAULT_GROUP_SIZE,
                    raw_bits: int = 16) -> float:
    if precision == "raw":
        return raw_bits / 8 * params
    if precision == "8-bit":
        return params + 4.0 * rows
    if precision == "4-bit":
        return params / 2 + 4.0 * math.ceil(params / group_size)
    raise EWQError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")


def layer_precision(block: dict, matrix: str) -> str:
    """The precision of one matrix: its per-matrix entry, else its block's."""
    return (block.get("matrices") or {}).get(matrix, block["precision"])


def precisions_used(plan: dict) -> set:
    """Every precision the plan gives a block or a matrix (raw included)."""
    used = {layer_precision(b, name) for b in plan["blocks"] for name in (b.get("matrices") or {})}
    return used | {b["precision"] for b in plan["blocks"]}


def block_bytes(block: dict, group_size: int = DEFAULT_GROUP_SIZE, raw_bits: int = 16) -> float:
    if block.get("matrices"):
        return sum(estimated_bytes(o * i, o, layer_precision(block, name), group_size, raw_bits)
                   for name, (o, i) in block["shapes"].items())
    return estimated_bytes(block["params"], block["rows"], block["precision"], group_size, raw_bits)


def int8_activations_of(plan: dict) -> bool:
    """Whether a sensitivity plan was measured with torchao's int8 activations (then it should run with them)."""
    return bool(((plan.get("method") or {}).get("formats") or {}).get("int8_activations"))


def group_size_of(plan: dict) -> int:
    return (plan.get("method") or {}).get("group_size") or DEFAULT_GROUP_SIZE


def raw_bits_of(plan: dict) -> int:
    """Bits of a raw (unquantized) weight in the dtype the plan was sized for: 16 (bf16/fp16, recorded only when
    it is not) or 32 (an encoder's float32 on the CPU, torch-dynamic's float32)."""
    return (plan.get("method") or {}).get("raw_bits") or 16


def default_raw_bits(kind: str, backend: str) -> int:
    """Bits of a raw weight in the dtype benchmark.py runs by default on this machine (device.pick_dtype)."""
    import torch

    from .device import pick_device, pick_dtype

    return torch.finfo(pick_dtype(None, pick_device("auto"), backend, kind)).bits


def size_summary(blocks, other_params: int, group_size: int = DEFAULT_GROUP_SIZE, raw_bits: int = 16) -> dict:
    """Estimated bytes; raw weights, embeddings and norms at `raw_bits`."""
    params = sum(b["params"] for b in blocks)
    before = sum(estimated_bytes(b["params"], b["rows"], "raw", raw_bits=raw_bits) for b in blocks)
    after = sum(block_bytes(b, group_size, raw_bits) for b in blocks)
    other = raw_bits / 8 * other_params
    return {
        "block_params": params,
        "other_params": other_params,
        "raw_bits": raw_bits,
        "blocks_bytes_before": int(before),
        "blocks_bytes_after": int(after),
        "model_bytes_before": int(before + other),
        "model_bytes_after": int(after + other),
        "avg_bits_per_weight": round(8 * after / params, 4),
    }


def counts(blocks) -> dict:
    return {p: sum(b["precision"] == p for b in blocks) for p in PRECISIONS}


def matrix_counts(blocks) -> dict | None:
    """Matrices per precision, for plans that know their matrices (None for older plans)."""
    if not all(b.get("shapes") for b in blocks):
        return None
    return {p: sum(layer_precision(b, m) == p for b in blocks for m in b["shapes"]) for p in PRECISIONS}


def model_section(source, ckpt, fingerprint: str) -> dict:
    return {
        "id": source.id,
        "path": str(source.path),
        "fingerprint": fingerprint,
        "architecture": ckpt.architecture,
        "model_type": ckpt.config.get("model_type"),
        "kind": ckpt.kind,
        "layout": ckpt.layout,
        "block_prefix": ckpt.block_prefix,
        "block_count": len(ckpt.blocks),
    }


def matrix_name(ckpt, block, tensor) -> str:
    """`self_attn.q_proj` for model.layers.3.self_attn.q_proj.weight: the layer's name within its block."""
    return tensor.name[len(f"{ckpt.block_prefix}.{block.index}."):].removesuffix(".weight")


def block_rows(ckpt) -> list:
    return [{"index": b.index, "params": b.params, "rows": sum(ckpt.rows(t) for t in b.matrices),
             "shapes": {matrix_name(ckpt, b, t): [ckpt.rows(t), t.numel // ckpt.rows(t)] for t in b.matrices}}
            for b in ckpt.blocks]


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
        "matrix_counts": matrix_counts(blocks),
        "size": size_summary(blocks, other_params, group_size_of({"method": method}), raw_bits_of({"method": method})),
        "run": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "analysis_s": round(analysis_s, 3),
                "peak_rss_gb": round(peak_rss_gb(), 3), "tool_version": __version__},
    }


def entropy_plan(source, ckpt, analysis, entropy: str, k: float, bins: int, raw_bits: int = 16) -> dict:
    precisions, stats = entropy_rule(analysis.block_entropies, k)
    method = {"name": "entropy", "entropy": entropy, "bins": bins if entropy == "histogram" else None,
              "k": k, "rule": RULE, **raw_bits_entry(raw_bits)}
    return build_plan(source, ckpt, analysis.fingerprint, method, precisions, analysis.block_entropies, stats,
                      analysis.seconds)


def raw_bits_entry(raw_bits: int) -> dict:
    """The method's record of raw bits: absent at 16, so the plans (and hashes) of 16-bit models stay as they were."""
    return {} if raw_bits == 16 else {"raw_bits": raw_bits}


def builtin_plan(name: str, source, ckpt, fingerprint: str, raw_bits: int = 16) -> dict:
    """The baselines EWQ must beat: every block raw, 8-bit or 4-bit."""
    precision = BUILTIN_PLANS[name]
    return build_plan(source, ckpt, fingerprint, {"name": name, **raw_bits_entry(raw_bits)},
                      [precision] * len(ckpt.blocks))


def plan_hash(plan: dict) -> str:
    """Covers the weights' fingerprint and the method settings, so a plan never silently moves models."""
    key = json.dumps({"fingerprint": plan["model"]["fingerprint"], "method": plan["method"]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def plan_filename(plan: dict) -> str:
    return f"quant_plan_{plan_hash(plan)}.json"


def load_plan(path) -> dict:
    """Read a plan file and check its structure (a person may have edited it)."""
    path = Path(path)
    if path.is_dir():
        raise EWQError(f"plan {path} is a folder; give a plan JSON file (quantized_models/quant_plan_<hash>.json)")
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
    plan["matrix_counts"] = matrix_counts(plan["blocks"])
    plan["size"] = size_summary(plan["blocks"], plan["other"]["params"], group_size_of(plan), raw_bits_of(plan))
    return plan


def validate_plan(plan: dict, path="plan") -> None:
    if not isinstance(plan, dict) or plan.get("schema_version") != SCHEMA_VERSION:
        raise EWQError(f"{path} is not an EWQ plan of schema_version {SCHEMA_VERSION}; regenerate it with main_cache_model.py")
    try:
        n = int(plan["model"]["block_count"])
        blocks = plan["blocks"]
        plan["model"]["fingerprint"]
        int(plan["other"]["params"])
        if not isinstance(blocks, list):
            raise TypeError("blocks")
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
        validate_matrices(b, path)
    if len(seen) != n:
        raise EWQError(f"{path} lists {len(seen)} blocks but the model has {n}; every block needs a precision")


def validate_matrices(b: dict, path) -> None:
    shapes, matrices = b.get("shapes"), b.get("matrices")
    if shapes is not None and not (isinstance(shapes, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v) for v in shapes.values())):
        raise EWQError(f"{path}: block {b['index']} 'shapes' must map matrix names to [out, in]; regenerate the plan")
    if matrices is None:
        return
    if not isinstance(matrices, dict):
        raise EWQError(f"{path}: block {b['index']} 'matrices' must be an object like "
                       f'{{"self_attn.q_proj": "4-bit"}}, got {type(matrices).__name__}')
    if not shapes:
        raise EWQError(f"{path}: block {b['index']} has per-matrix entries but no 'shapes'; regenerate the plan "
                       f"with main_cache_model.py (plans of this version list every matrix)")
    for name, precision in matrices.items():
        if name not in shapes:
            raise EWQError(f"{path}: block {b['index']} names matrix '{name}', which the model does not have; "
                           f"its matrices are {', '.join(shapes)}")
        if precision not in PRECISIONS:
            raise EWQError(f"{path}: block {b['index']} matrix '{name}' has unknown precision {precision!r}; "
                           f"use one of {', '.join(PRECISIONS)}")


def check_plan_matches(plan: dict, fingerprint: str, block_count: int, path="plan", kind: str | None = None) -> None:
    plan_kind = plan["model"].get("kind", "decoder")  # plans written before encoders existed are decoder plans
    if kind and plan_kind != kind:
        raise EWQError(f"{path} is a plan for {'an' if plan_kind == 'encoder' else 'a'} {plan_kind} "
                       f"({plan['model'].get('id')}), but this model is {'an' if kind == 'encoder' else 'a'} {kind}; "
                       f"make its own plan with: python main_cache_model.py --model <this model>")
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
    ] + ([f"matrices   raw {mc['raw']}  8-bit {mc['8-bit']}  4-bit {mc['4-bit']}"]
         if (mc := plan.get("matrix_counts")) and any(b.get("matrices") for b in plan["blocks"]) else []) + [
        f"weights    blocks {s['blocks_bytes_before'] / gb:.3f} GB -> {s['blocks_bytes_after'] / gb:.3f} GB, "
        f"whole model {s['model_bytes_before'] / gb:.3f} GB -> {s['model_bytes_after'] / gb:.3f} GB (estimated)",
        f"avg bits   {s['avg_bits_per_weight']:.2f} bits per block weight (a raw weight counted at "
        f"{s.get('raw_bits', 16)} bits)",
    ]
    if plan.get("stats"):
        st = plan["stats"]
        lines.append(f"entropy    mu {st['mean']:.4f}  sigma {st['std']:.4f}  4-bit below {st['four_bit_threshold']:.4f}")
    checks, m = plan.get("checks"), sensitivity_metric(plan)
    if checks:
        lines.append(f"checks     {METRIC_LABELS[m]} on the calibration text: predicted (sum of single measurements) "
                     f"{checks[f'predicted_{m}']:.4f}, measured {checks[f'measured_{m}']:.4f}; "
                     f"{len(checks[f'random_plans_{m}'])} random plans of the same size: mean "
                     f"{checks[f'random_mean_{m}']:.4f}")
    run = plan.get("run") or {}
    lines.append(f"time       {run.get('analysis_s', 0):.2f} s analysis, peak RSS {run.get('peak_rss_gb', 0):.2f} GB")
    return "\n".join(lines)


METHODS = ("entropy", "sensitivity", "position")
METRIC_LABELS = {"kl": "KL", "cosine_loss": "1 - cosine"}


def sensitivity_metric(plan: dict) -> str:
    """The damage a sensitivity plan measured: kl (decoders) or cosine_loss (encoders); fields are named after it."""
    return (plan.get("method") or {}).get("metric", "kl")


def plan_label(plan: dict) -> str:
    """A short name for a plan's variant in results and reports."""
    m = plan["method"]
    target = m.get("target") or {}
    size = f"-{target['target_bits']:g}b" if "target_bits" in target else f"-{target['max_weight_gb']:g}gb" if target else ""
    detail = ("-" + m["backend"] if m.get("backend") not in (None, "bitsandbytes") else "") + \
        ("-a8" if int8_activations_of(plan) else "") + ("-matrix" if m.get("granularity") == "matrix" else "")
    if m["name"] == "entropy":
        return f"ewq-{m['entropy']}" + detail + (size or f"-k{m['k']:g}")
    return m["name"] + detail + size


def make_plan(model: str, method: str = "entropy", entropy: str = "histogram", k: float = 1.0, bins: int = 128,
              target_bits=None, max_weight_gb=None, calib_tokens=None, calib_text=None, quant_type: str = "nf4",
              force: bool = False, models_dir="models", out_dir="quantized_models", progress: bool = True,
              backend: str = "bitsandbytes", group_size: int = DEFAULT_GROUP_SIZE, granularity: str = "block",
              device: str = "cpu", calib_sentences=None, int8_activations: bool = False):
    """checkpoint -> analysis -> (sensitivity) -> plan file. Returns (path, plan, reused).

    Without a size target, `entropy` at block granularity applies the mu/sigma rule; every other method
    (and granularity) aims at the size of that rule's plan, so methods compare at equal size by default."""
    from . import allocate
    from .analysis import analyze
    from .backends import GROUP_SIZES, QuantSettings, get_backend
    from .checkpoint import open_checkpoint
    from .common import check_writable_dir, write_json_atomic
    from .source import resolve_model

    if method not in METHODS:
        raise EWQError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if not math.isfinite(k) or k < 0:
        raise EWQError(f"--k must be a finite number >= 0, got {k}")
    if granularity not in allocate.GRANULARITIES:
        raise EWQError(f"unknown granularity '{granularity}'; choose one of {', '.join(allocate.GRANULARITIES)}")
    if group_size not in GROUP_SIZES:
        raise EWQError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if group_size != DEFAULT_GROUP_SIZE and backend != "torchao":
        raise EWQError(f"--group-size applies to --backend torchao only ({backend} 4-bit uses groups of 64)")
    if int8_activations and backend != "torchao":
        raise EWQError("--int8-activations applies to --backend torchao only")
    settings = QuantSettings(backend=backend, quant_type=quant_type, group_size=group_size,
                             int8_activations=int8_activations)
    if method == "sensitivity":
        get_backend(backend)  # an unknown backend is refused before any weight is read
    out_dir = check_writable_dir(out_dir)
    source = resolve_model(model, models_dir)
    ckpt = open_checkpoint(source.path)
    wrong = "--calib-tokens" if ckpt.kind == "encoder" and calib_tokens is not None else \
        "--calib-sentences" if ckpt.kind == "decoder" and calib_sentences is not None else None
    if wrong:
        raise EWQError(f"{model} is {'an' if ckpt.kind == 'encoder' else 'a'} {ckpt.kind}: {wrong} does not apply "
                       f"(encoders calibrate on sentences, decoders on token windows); drop it")
    # the research question needs both entropy definitions beside the measured sensitivity
    analysis = analyze(ckpt, entropy, progress=progress, also=("histogram", "softmax") if method == "sensitivity" else ())
    # sizes count a raw weight in the dtype the benchmark will run it in here: an encoder's float32 on the CPU
    # costs 32 bits, not 16
    rule_plan = entropy_plan(source, ckpt, analysis, entropy, k, bins, default_raw_bits(ckpt.kind, backend))
    has_target = target_bits is not None or max_weight_gb is not None
    if method == "entropy" and not has_target and granularity == "block":
        plan = rule_plan
    else:
        plan = allocated_plan(source, ckpt, analysis, rule_plan, method, entropy, k, bins, target_bits, max_weight_gb,
                              settings, granularity, calib_tokens, calib_text, out_dir, device, progress, calib_sentences)
    path = out_dir / plan_filename(plan)
    if path.exists() and not force:
        try:
            return path, load_plan(path), True
        except EWQError:
            pass  # an unreadable old file is replaced below
    write_json_atomic(path, plan)
    return path, plan, False


def allocated_plan(source, ckpt, analysis, rule_plan, method, entropy, k, bins, target_bits, max_weight_gb, settings,
                   granularity, calib_tokens, calib_text, out_dir, device, progress, calib_sentences=None) -> dict:
    """A plan that fits a size target, chosen per block or per matrix by entropy order, position or measured KL."""
    from . import allocate
    from .backends import get_backend

    blocks, other = rule_plan["blocks"], rule_plan["other"]["params"]
    group_size, raw_bits = settings.group_size, raw_bits_of(rule_plan)
    if target_bits is not None or max_weight_gb is not None:
        target = {"target_bits": target_bits} if target_bits is not None else {"max_weight_gb": max_weight_gb}
    else:
        target = {"target_bits": rule_plan["size"]["avg_bits_per_weight"],
                  "from": f"the size of the {entropy} entropy rule plan (k={k:g})"}
    # a target the executor cannot reach is refused before anything is measured
    usable = get_backend(settings.backend).PRECISIONS if method == "sensitivity" else ("8-bit", "4-bit")
    budget = allocate.budget_bytes(blocks, other, target.get("target_bits"), target.get("max_weight_gb"), group_size,
                                   usable, settings.backend, raw_bits)
    items = allocate.plan_items(blocks, granularity)
    sizes = allocate.item_sizes(items, group_size, raw_bits)
    method_info = {"name": method, "target": target, "granularity": granularity, **raw_bits_entry(raw_bits)}
    if group_size != DEFAULT_GROUP_SIZE:
        method_info["group_size"] = group_size
    extra, checks, cached = None, None, None
    if method == "entropy":
        if granularity == "block":
            scores = analysis.block_entropies
        else:
            names = [f"{ckpt.block_prefix}.{it['block']}.{it['matrix']}.weight" for it in items]
            scores = [analysis.matrix_entropies[n][entropy] for n in names]
        order = sorted(range(len(items)), key=lambda i: (scores[i], i))
        precisions = allocate.ordered_allocation(order, sizes, budget)
        method_info.update(entropy=entropy, bins=bins if entropy == "histogram" else None,
                           allocator="ordered: lowest entropy lowered first, all to 8-bit, then to 4-bit")
    elif method == "position":
        rank = {b: r for r, b in enumerate(allocate.position_order(len(blocks)))}
        order = sorted(range(len(items)), key=lambda i: (rank[items[i]["block"]], i))
        precisions = allocate.ordered_allocation(order, sizes, budget)
        method_info["allocator"] = "ordered: middle blocks lowered first; first and last blocks keep the most bits"
    else:
        from . import sensitivity

        calibration = sensitivity.Calibration(source, ckpt, analysis.fingerprint, calib_tokens or sensitivity.CALIB_TOKENS,
                                              calib_text, 256, settings, granularity, device,
                                              calib_sentences or sensitivity.CALIB_SENTENCES)
        metric = calibration.metric
        rows, key, cached = sensitivity.measure(calibration, items, out_dir, progress)
        costs = [{"raw": 0.0, "8-bit": r.get("8-bit", math.inf), "4-bit": r.get("4-bit", math.inf)} for r in rows]
        precisions = allocate.optimal_allocation(costs, sizes, budget)
        method_info.update(calibration=key, backend=settings.backend, formats=settings.key(), metric=metric,
                           allocator=f"exact: minimum summed {granularity} {metric} within the byte budget (Pareto DP)")
        if settings.backend == "bitsandbytes":
            method_info["quant_type"] = settings.quant_type
        randoms = [allocate.random_allocation(sizes, budget, seed) for seed in range(sensitivity.RANDOM_PLANS)]
        measured = sensitivity.measure_plans(calibration, items, [precisions] + randoms, progress)
        predicted = sum(c[p] for c, p in zip(costs, precisions))
        if not math.isfinite(predicted):
            raise EWQError(f"the {settings.backend} backend has no 4-bit, and this size target needs some; "
                           f"choose a target of at least 8.1 bits or another --backend")
        checks = {f"predicted_{metric}": predicted, f"measured_{metric}": measured[0],
                  f"random_plans_{metric}": measured[1:], f"random_mean_{metric}": sum(measured[1:]) / len(randoms),
                  "windows": "calibration",
                  "note": f"predicted = sum of single-item {metric}; random = same size, random order"}
        extra = rows
    plan = build_plan(source, ckpt, analysis.fingerprint, method_info, [b["precision"] for b in blocks],
                      analysis.block_entropies, None, analysis.seconds)
    allocate.write_precisions(plan["blocks"], items, precisions)
    if extra is not None:
        by_block = {}
        for it, r in zip(items, extra):
            by_block.setdefault(it["block"], []).append((it["matrix"], r))
        for b in plan["blocks"]:
            measured_rows = by_block[b["index"]]
            if granularity == "block":
                r = measured_rows[0][1]
                b.update({f"{metric}_8bit": _round(r.get("8-bit")), f"{metric}_4bit": _round(r.get("4-bit"))})
            else:  # a block's sensitivity summarised as the sum over its matrices; per matrix in `matrix_<metric>`
                b.update({f"{metric}_8bit": _round(sum(r.get("8-bit", 0) for _, r in measured_rows)),
                          f"{metric}_4bit": _round(sum(r.get("4-bit", 0) for _, r in measured_rows)),
                          f"matrix_{metric}": {m: {p: _round(v) for p, v in r.items()} for m, r in measured_rows}})
            b["entropies"] = {kind: round(v[b["index"]], 9) for kind, v in analysis.by_kind.items()}
    plan["counts"] = counts(plan["blocks"])
    plan["matrix_counts"] = matrix_counts(plan["blocks"])
    plan["size"] = size_summary(plan["blocks"], other, group_size, raw_bits)
    if checks:
        plan["checks"] = {k: (_round(v) if isinstance(v, float) else [_round(x) for x in v] if isinstance(v, list) else v)
                          for k, v in checks.items()}
    if cached is not None:
        plan["run"]["sensitivity_cached"] = cached  # under "run": not part of the plan's identity
    return plan


def _round(v):
    return None if v is None else round(v, 9)
