"""The plan file: a JSON file a person can read and edit, what every stage after planning reads.

Its schema, validation, sizes and hash live here; how a plan is *chosen* (the entropy rule, size targets,
measured sensitivity) lives above, in planning.py, which imports this module and never the reverse.

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
import time
from pathlib import Path

from . import __version__
from .common import EWQError, peak_rss_gb
from .ggml_types import GGML_TYPES
from .ggml_types import block as ggml_block

SCHEMA_VERSION = 1
# the torch executors' menu (bitsandbytes, torchao, torch-dynamic) ...
TORCH_PRECISIONS = ("raw", "8-bit", "4-bit")
# ... and llama.cpp's own formats (ggml types, ewq.ggml_types.GGML_TYPES), which a llama.cpp plan names directly
PRECISIONS = TORCH_PRECISIONS + GGML_TYPES
BUILTIN_PLANS = {"raw": "raw", "uniform-8bit": "8-bit", "uniform-4bit": "4-bit"}


DEFAULT_GROUP_SIZE = 64


def fits(precision: str, shape) -> bool:
    """Whether a matrix [out, in] can take the precision: a ggml type needs rows whole blocks long (llama-quantize
    would silently write another type: Q6_K as Q8_0, Q4_K as Q5_0, ...; a plan never pretends)."""
    return precision not in GGML_TYPES or shape[1] % ggml_block(precision)[0] == 0


def estimated_bytes(params: int, rows: int, precision: str, group_size: int = DEFAULT_GROUP_SIZE,
                    raw_bits: int = 16) -> float:
    """Bytes of a matrix in a precision; exact for ggml types (whole blocks), scales included for the others."""
    if precision == "raw":
        return raw_bits / 8 * params
    if precision == "8-bit":
        return params + 4.0 * rows
    if precision == "4-bit":
        return params / 2 + 4.0 * math.ceil(params / group_size)
    if precision in GGML_TYPES:
        weights, nbytes = ggml_block(precision)
        return params / weights * nbytes
    raise EWQError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")


def layer_precision(block: dict, matrix: str) -> str:
    """The precision of one matrix: its per-matrix entry, else its block's."""
    return (block.get("matrices") or {}).get(matrix, block["precision"])


def precisions_used(plan: dict) -> set:
    """Every precision the plan gives a block, a matrix or a planned embedding/head (raw included)."""
    used = {layer_precision(b, name) for b in plan["blocks"] for name in (b.get("matrices") or {})}
    return used | {b["precision"] for b in plan["blocks"]} | set(other_matrices(plan).values())


def other_matrices(plan: dict) -> dict:
    """Precisions of the tensors outside the blocks that the plan quantizes ({"model.embed_tokens.weight": "Q8_0"}):
    only llama.cpp plans have them; the torch executors keep embeddings and lm_head in the run dtype."""
    return (plan.get("other") or {}).get("matrices") or {}


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


def size_summary(blocks, other_params: int, group_size: int = DEFAULT_GROUP_SIZE, raw_bits: int = 16,
                 other: dict | None = None) -> dict:
    """Estimated bytes; raw weights, embeddings and norms at `raw_bits`, except the embeddings/head a llama.cpp plan
    quantizes (`other`: the plan's "other" section with `matrices` and `shapes`)."""
    params = sum(b["params"] for b in blocks)
    before = sum(estimated_bytes(b["params"], b["rows"], "raw", raw_bits=raw_bits) for b in blocks)
    after = sum(block_bytes(b, group_size, raw_bits) for b in blocks)
    planned = {n: (p, (other or {})["shapes"][n]) for n, p in ((other or {}).get("matrices") or {}).items()}
    other_before = raw_bits / 8 * other_params
    other = other_before + sum(estimated_bytes(o * i, o, p, group_size, raw_bits) - raw_bits / 8 * o * i
                               for p, (o, i) in planned.values())
    summary = {
        "block_params": params,
        "other_params": other_params,
        "raw_bits": raw_bits,
        "blocks_bytes_before": int(before),
        "blocks_bytes_after": int(after),
        "model_bytes_before": int(before + other_before),
        "model_bytes_after": int(after + other),
        "avg_bits_per_weight": round(8 * after / params, 4),
    }
    if planned:  # only in llama.cpp plans: their file size is the figure to compare
        summary["other_bytes_after"] = int(other)
    return summary


def tally(precisions) -> dict:
    """Count per precision: raw, 8-bit and 4-bit always (the torch menu's fields), ggml types when used."""
    out = {p: 0 for p in TORCH_PRECISIONS}
    for p in precisions:
        out[p] = out.get(p, 0) + 1
    return out


def counts(blocks) -> dict:
    return tally(b["precision"] for b in blocks)


def matrix_counts(blocks) -> dict | None:
    """Matrices per precision, for plans that know their matrices (None for older plans)."""
    if not all(b.get("shapes") for b in blocks):
        return None
    return tally(layer_precision(b, m) for b in blocks for m in b["shapes"])


def format_counts(c: dict) -> str:
    """'raw 3  8-bit 2  4-bit 1' (torch menu) or 'raw 0  Q8_0 121  Q6_K 15 ...' (llama.cpp menu)."""
    ggml = [p for p in c if p in GGML_TYPES and c[p]]
    return "  ".join(f"{p} {c.get(p, 0)}" for p in ["raw"] + (ggml or ["8-bit", "4-bit"]))


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
    plan["size"] = size_summary(plan["blocks"], plan["other"]["params"], group_size_of(plan), raw_bits_of(plan),
                                plan["other"])
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
    validate_other(plan["other"], path)
    check_one_menu(plan, path)


def validate_matrices(b: dict, path) -> None:
    shapes, matrices = b.get("shapes"), b.get("matrices")
    where = f"block {b['index']}"
    check_shapes(shapes, where, path)
    if matrices is not None:
        if not isinstance(matrices, dict):
            raise EWQError(f"{path}: {where} 'matrices' must be an object like "
                           f'{{"self_attn.q_proj": "4-bit"}}, got {type(matrices).__name__}')
        if not shapes:
            raise EWQError(f"{path}: {where} has per-matrix entries but no 'shapes'; regenerate the plan "
                           f"with main_cache_model.py (plans of this version list every matrix)")
    for name, shape in (shapes or {}).items():
        precision = (matrices or {}).get(name, b["precision"])
        check_entry(name, shape, precision, where, path)
    for name in matrices or {}:
        if name not in shapes:
            raise EWQError(f"{path}: {where} names matrix '{name}', which the model does not have; "
                           f"its matrices are {', '.join(shapes)}")


def check_shapes(shapes, where: str, path) -> None:
    if shapes is not None and not (isinstance(shapes, dict) and all(
            isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v) for v in shapes.values())):
        raise EWQError(f"{path}: {where} 'shapes' must map matrix names to [out, in]; regenerate the plan")


def check_entry(name: str, shape, precision, where: str, path) -> None:
    """One matrix's precision: known, and one its shape can take (ggml types need whole blocks per row)."""
    if precision not in PRECISIONS:
        raise EWQError(f"{path}: {where} matrix '{name}' has unknown precision {precision!r}; "
                       f"use one of {', '.join(PRECISIONS)}")
    if not fits(precision, shape):
        raise EWQError(f"{path}: {where} matrix '{name}' ({shape[0]}x{shape[1]}) cannot take {precision}: its rows are "
                       f"not whole blocks of {ggml_block(precision)[0]} (llama.cpp would write another type); "
                       f"choose Q8_0, Q5_0 or Q4_0 (blocks of 32) for it")


def validate_other(other: dict, path) -> None:
    """The embeddings/head a llama.cpp plan quantizes: `other.matrices` names tensors listed in `other.shapes`."""
    matrices = other.get("matrices")
    if matrices is None:
        return
    shapes = other.get("shapes")
    check_shapes(shapes, "other", path)
    if not isinstance(matrices, dict) or not shapes:
        raise EWQError(f"{path}: 'other.matrices' must map tensor names listed in 'other.shapes' to precisions; "
                       f"regenerate the plan")
    for name, precision in matrices.items():
        if name not in shapes:
            raise EWQError(f"{path}: 'other.matrices' names '{name}', which the plan's model does not have; "
                           f"it has {', '.join(shapes)}")
        check_entry(name, shapes[name], precision, "other", path)


def check_one_menu(plan: dict, path) -> None:
    """A plan names the torch executors' precisions (8-bit/4-bit) or llama.cpp's types, never both."""
    used = precisions_used(plan)
    if used & {"8-bit", "4-bit"} and used & set(GGML_TYPES):
        raise EWQError(f"{path} mixes 8-bit/4-bit with llama.cpp types ({', '.join(sorted(used & set(GGML_TYPES)))}); "
                       f"a plan is for the torch executors or for llama.cpp: use one menu")


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
        f"blocks     {format_counts(c)}",
    ] + ([f"matrices   {format_counts(mc)}"]
         if (mc := plan.get("matrix_counts")) and any(b.get("matrices") for b in plan["blocks"]) else []) + [
        f"outside    {name} {p}" for name, p in other_matrices(plan).items()] + [
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

