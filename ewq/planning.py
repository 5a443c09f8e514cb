"""Stage 3: choose a plan, a precision per block or per matrix, and write the plan file (plan.py).

The entropy rule (the published PoC's): with mu, sigma the mean and population standard deviation
of the block entropies,  H >= mu -> raw;  mu - k*sigma <= H < mu -> 8-bit;  H < mu - k*sigma -> 4-bit.
When every block has the same entropy (sigma = 0) every block stays raw.

With a size target (or at any granularity other than block), `allocated_plan` picks precisions under a
byte budget by entropy order, by position, or by measured sensitivity (allocate.py, sensitivity.py).
"""

import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import allocate, sensitivity
from .analysis import analyze, on_q4_1_grid
from .backends import GROUP_SIZES, QuantSettings, get_backend
from .backends.llamacpp import FLOAT_MINIMUM, PRECISIONS, check_speed, checked_decode_cost, decode_cost_table, is_builtin
from .checkpoint import open_checkpoint
from .common import EWQError, check_writable_dir, write_json_atomic
from .device import pick_device, pick_dtype
from .plan import (
    DEFAULT_GROUP_SIZE,
    build_plan,
    estimated_bytes,
    counts,
    load_plan,
    matrix_counts,
    plan_filename,
    raw_bits_entry,
    raw_bits_of,
    size_summary,
)
from .source import resolve_model

RULE = "H >= mu -> raw; mu - k*sigma <= H < mu -> 8-bit; H < mu - k*sigma -> 4-bit"
METHODS = ("entropy", "sensitivity", "position")


def entropy_rule(entropies, k: float):
    """Precision per block from its entropy; returns (precisions, stats). k >= 0 is checked by make_plan."""
    if min(entropies) == max(entropies):  # sigma = 0: nothing stands out, keep everything raw
        mu, sigma = entropies[0], 0.0
    else:
        mu, sigma = statistics.fmean(entropies), statistics.pstdev(entropies)
    low = mu - k * sigma
    precisions = ["raw" if h >= mu else "8-bit" if h >= low else "4-bit" for h in entropies]
    return precisions, {"mean": mu, "std": sigma, "raw_threshold": mu, "four_bit_threshold": low}



def default_raw_bits(kind: str, backend: str) -> int:
    """Bits of a raw weight in the dtype benchmark.py runs by default on this machine (device.pick_dtype)."""
    return torch.finfo(pick_dtype(None, pick_device("auto"), backend, kind)).bits



def entropy_plan(source, ckpt, analysis, entropy: str, k: float, bins: int, raw_bits: int = 16) -> dict:
    precisions, stats = entropy_rule(analysis.block_entropies, k)
    method = {"name": "entropy", "entropy": entropy, "bins": bins if entropy == "histogram" else None,
              "k": k, "rule": RULE, **raw_bits_entry(raw_bits)}
    return build_plan(source, ckpt, analysis.fingerprint, method, precisions, analysis.block_entropies, stats,
                      analysis.seconds)



def make_plan(model: str, method: str = "entropy", entropy: str = "histogram", k: float = 1.0, bins: int = 128,
              target_bits=None, max_weight_gb=None, calib_tokens=None, calib_text=None, quant_type: str = "nf4",
              force: bool = False, models_dir="models", out_dir="quantized_models", progress: bool = True,
              backend: str = "bitsandbytes", group_size: int = DEFAULT_GROUP_SIZE, granularity: str = "block",
              device: str = "cpu", calib_sentences=None, int8_activations: bool = False, sweep: str = "fast",
              formats=(), target=None, target_bpw=None, imatrix: str = "calibration", speed: str = "preset",
              decode_cost=None):
    """checkpoint -> analysis -> (sensitivity) -> plan file. Returns (path, plan, reused).

    Without a size target, `entropy` at block granularity applies the mu/sigma rule; every other method
    (and granularity) aims at the size of that rule's plan, so methods compare at equal size by default.
    llama.cpp plans also take the targets llama.cpp names: `target` a llama-quantize preset (the GGUF EWQ writes is
    no larger than the file that preset gives this checkpoint) or `target_bpw` (bits per weight of the file's
    tensors, as llama-quantize prints it). `imatrix` (llama.cpp): the importance the rounding is weighted with, as
    llama-quantize --imatrix: "calibration" (EWQ's own from the calibration text), a llama.cpp imatrix file, or
    "none" (plain rounding). `speed` (a sensitivity plan for a preset): "preset", the file must also decode no
    slower than the preset's by llama.cpp's CPU kernel cost per format (this CPU family's built-in table:
    ewq.backends.llamacpp.BUILTIN_DECODE_COST); a number F, at least F x the preset's speed; "any", the size is the
    only limit. `decode_cost`: the kernel cost table measured on the CPU the file will run on (bench/decode_cost.py's
    decode_cost.json) instead of the built-in one."""
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
    if sweep not in sensitivity.SWEEPS:
        raise EWQError(f"unknown sweep '{sweep}'; choose one of {', '.join(sensitivity.SWEEPS)}")
    if formats and backend != "llama.cpp":
        raise EWQError("--formats applies to --backend llama.cpp only (the torch executors' menu is 8-bit and 4-bit)")
    if imatrix not in ("calibration", "none"):
        if backend != "llama.cpp":
            raise EWQError("--imatrix applies to --backend llama.cpp only (it weights ggml's rounding)")
        if not Path(imatrix).is_file():
            raise EWQError(f"--imatrix {imatrix}: no such file (an importance matrix from llama-imatrix)")
    speed = check_speed(speed)
    file_target = llamacpp_target(target, target_bpw, target_bits, max_weight_gb, backend)
    if file_target is not None and "preset" in file_target and method == "sensitivity":
        file_target["speed"] = speed  # part of the plan's identity: a plan made without the limit is another plan
    kernel_costs = checked_decode_cost(decode_cost, target, speed)
    if decode_cost is not None and method != "sensitivity":
        raise EWQError("--decode-cost times a sensitivity plan's formats; drop it for --method " + method)
    if kernel_costs is not None and method == "sensitivity":
        file_target["decode_cost"] = kernel_costs  # so is the table it was timed by (measured, or this CPU's built-in)
    default_menu = backend == "llama.cpp" and not formats
    if default_menu and target is not None:
        formats = get_backend(backend).preset_formats(target, imatrix != "none")  # an IQ3/IQ2 preset: its i-quants
    settings = QuantSettings(backend=backend, quant_type=quant_type, group_size=group_size, formats=tuple(formats),
                             int8_activations=int8_activations, imatrix=imatrix if backend == "llama.cpp" else "none")
    if method == "sensitivity":
        get_backend(backend)  # an unknown backend is refused before any weight is read
    if backend == "llama.cpp":
        get_backend(backend).menu(settings)  # so is an unknown format
    out_dir = check_writable_dir(out_dir)
    source = resolve_model(model, models_dir)
    ckpt = open_checkpoint(source.path)
    if default_menu and method == "sensitivity" and ckpt.kind == "decoder" and not on_q4_1_grid(ckpt):
        # the float-minimum formats are measured too, unless the weights sit on the Q4_1 grid they would re-find
        settings = replace(settings, formats=(settings.formats or PRECISIONS) + FLOAT_MINIMUM)
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
    has_target = target_bits is not None or max_weight_gb is not None or file_target is not None
    if method == "entropy" and not has_target and granularity == "block" and backend != "llama.cpp":
        plan = rule_plan
    else:
        plan = allocated_plan(source, ckpt, analysis, rule_plan, method, entropy, k, bins, target_bits, max_weight_gb,
                              settings, granularity, calib_tokens, calib_text, out_dir, device, progress, calib_sentences,
                              sweep, file_target)
    path = out_dir / plan_filename(plan)
    if path.exists() and not force:
        try:
            return path, load_plan(path), True
        except EWQError:
            pass  # an unreadable old file is replaced below
    write_json_atomic(path, plan)
    return path, plan, False


def llamacpp_decode_limit(ckpt, items, sizes, target: dict, shape, preset) -> tuple | None:
    """(times, preset time, limit, where the kernel costs were measured) for a plan held to its preset's decode
    speed (target["speed"] "preset", or a fraction F of it: the limit is the preset's time / F): each item's decode
    time in each format it can take (its weights x the kernel cost of the format, from target["decode_cost"]'s table:
    --decode-cost's or this CPU's built-in one; nothing for the token embeddings of a model with its own head: one row
    of them is read per token) and the preset file's (`preset`: presets.preset_size of `shape`). None without the
    limit, or when a built-in table lacks a type the plan or the preset needs (target["speed"] then says so); a
    measured table (--decode-cost) that lacks one is refused."""
    from . import presets
    from .backends.llamacpp import ggml_type, raw_type

    speed = target.get("speed")
    if not (speed == "preset" or isinstance(speed, float)):
        return None
    measured = target.get("decode_cost") or decode_cost_table()
    cost, source = measured["table"], measured["source"]
    weights = presets.decode_weights(shape)
    types = preset.types
    raw = raw_type(ckpt)
    missing = sorted(({types[n] for n in weights} | {raw} | {ggml_type(p) for s in sizes for p in s if p != "raw"})
                     - set(cost))
    if missing and is_builtin(measured):  # (a preset of formats we never timed: IQ1_S, IQ2_XXS, ...)
        target["speed"] = f"any: no kernel cost measured for {', '.join(missing)}"
        return None
    if missing:
        raise EWQError(f"--decode-cost: the table has no cost for {', '.join(missing)}, which this plan or its preset "
                       f"may use; measure them too (python bench/decode_cost.py --formats ...) or narrow --formats")
    gguf_name = {t.hf: t.name for t in shape.tensors if t.hf}
    times = []
    for it, s in zip(items, sizes):
        decoded = it["block"] is not None or gguf_name.get(it["matrix"]) in weights
        times.append({p: decoded * it["params"] * cost[raw if p == "raw" else ggml_type(p)] for p in s})
    preset_time = sum(w * cost[types[n]] for n, w in weights.items())
    return times, preset_time, preset_time / (1.0 if speed == "preset" else speed), source


def llamacpp_target(preset, target_bpw, target_bits, max_weight_gb, backend: str) -> dict | None:
    """The plan's record of a target named as llama.cpp names it ({"preset": "Q4_K_M"} or {"target_bpw": 4.5}), None
    without one; refuses, before any weight is read, a second target, another backend, an unknown preset."""
    if preset is None and target_bpw is None:
        return None
    given = [f for f, v in (("--target", preset), ("--target-bpw", target_bpw), ("--target-bits", target_bits),
                            ("--max-weight-gb", max_weight_gb)) if v is not None]
    if len(given) > 1:
        raise EWQError(f"give one size target, not {' and '.join(given)}")
    if backend != "llama.cpp":
        raise EWQError(f"{given[0]} sizes a GGUF file: it applies to --backend llama.cpp only; use --target-bits or "
                       f"--max-weight-gb with --backend {backend}")
    if preset is not None:
        from .presets import preset_ftype

        preset_ftype(preset)  # an unknown name is one line
        return {"preset": str(preset).strip().upper()}
    if not (math.isfinite(target_bpw) and target_bpw > 0):
        raise EWQError(f"--target-bpw must be a positive number of bits per weight, got {target_bpw}")
    return {"target_bpw": target_bpw}


# the quantize.imatrix.* keys an importance-weighted GGUF carries (llama-quantize's four), reserved at 256 characters
# a string value so the file stays within its target whatever file and dataset names they record
IMATRIX_KV_RESERVE = {"quantize.imatrix.file": "x" * 256, "quantize.imatrix.dataset": "x" * 256,
                      "quantize.imatrix.entries_count": 0, "quantize.imatrix.chunks_count": 0}


def llamacpp_budget(source, items, sizes, target: dict, menu, shape, preset, imatrix: bool = False) -> float:
    """Bytes the planned matrices (`items`, whole tensors) may take so that the GGUF EWQ writes meets `target`:
    a preset's file (header and 32-byte padding of every tensor counted; `target` gains the preset's file_bytes,
    bits per weight and whether it was sized with an importance matrix) or bits per weight of all the file's tensors
    (llama-quantize's figure: tensor bytes x 8 / every element, norms included). Refuses a target below the smallest
    file the menu allows, in one line. `shape`: presets.model_shape of the checkpoint; `preset`: the preset's
    presets.preset_size (None for --target-bpw)."""
    from . import presets

    fixed = [t for t in shape.tensors if t.type == "F32"]  # norms, biases, rope factors: F32 in every file
    fixed_bytes = sum(4 * t.numel for t in fixed)
    n_elements = sum(t.numel for t in shape.tensors)
    if sum(it["params"] for it in items) + sum(t.numel for t in fixed) != n_elements:
        raise EWQError(f"{source.id}: the plan's matrices and the GGUF's tensors do not add up; a llama.cpp target "
                       f"needs every matrix planned")
    smallest = sum(min(s[p] for p in s if p != "raw") if len(s) > 1 else s["raw"] for s in sizes)
    if "preset" in target:
        target.update(file_bytes=preset.file_bytes, preset_bpw=round(preset.bpw, 4), imatrix=imatrix)
        header = presets.header_bytes(source.path, extra_kv=IMATRIX_KV_RESERVE if imatrix else None)
        # every tensor is padded to 32 bytes: the F32 ones exactly, the planned ones at most 31 bytes each
        overhead = header + sum(presets.pad(4 * t.numel) for t in fixed) + (presets.GGUF_ALIGNMENT - 1) * len(items)
        budget, what = preset.file_bytes - overhead, f"--target {target['preset']} ({preset.file_bytes} bytes)"
        least = f"{math.ceil(smallest + overhead)} bytes"
    else:
        budget = target["target_bpw"] * n_elements / 8 - fixed_bytes
        what = f"--target-bpw {target['target_bpw']:g}"
        least = f"{8 * (smallest + fixed_bytes) / n_elements:.4f} bits per weight"
    if budget < smallest:
        raise EWQError(f"the size target cannot be met: the smallest GGUF the formats {', '.join(menu)} allow (every "
                       f"matrix in its smallest format) is {least}, more than {what}; ask for at least that, or add "
                       f"smaller formats with --formats")
    return budget


def menu_of(settings, method: str) -> tuple:
    """What items may be lowered to, largest first: llama.cpp's formats for a llama.cpp plan (--formats), whatever
    the method; otherwise the executor's own (it measures them) for sensitivity plans, 8-bit then 4-bit for the
    ordered ones."""
    backend = settings.backend
    if backend == "llama.cpp":
        menu = get_backend(backend).menu(settings)
    elif method == "sensitivity":
        menu = get_backend(backend).PRECISIONS
    else:
        return allocate.TORCH_MENU
    return tuple(sorted(menu, key=lambda p: -estimated_bytes(1 << 20, 1, p)))


def planned_other_shapes(ckpt, backend: str) -> dict:
    """The embeddings and output head ({name: [rows, cols]}) a llama.cpp plan quantizes too (llama.cpp does)."""
    if backend != "llama.cpp":
        return {}
    return {t.name: [t.shape[0], t.numel // t.shape[0]] for t in ckpt.other if len(t.shape) == 2}


def allocated_plan(source, ckpt, analysis, rule_plan, method, entropy, k, bins, target_bits, max_weight_gb, settings,
                   granularity, calib_tokens, calib_text, out_dir, device, progress, calib_sentences=None,
                   sweep: str = "fast", file_target: dict | None = None) -> dict:
    """A plan that fits a size target, chosen per block or per matrix by entropy order, position or measured KL."""
    blocks, other = rule_plan["blocks"], rule_plan["other"]["params"]
    group_size, raw_bits = settings.group_size, raw_bits_of(rule_plan)
    if file_target is not None:
        target = dict(file_target)
    elif target_bits is not None or max_weight_gb is not None:
        target = {"target_bits": target_bits} if target_bits is not None else {"max_weight_gb": max_weight_gb}
    else:
        target = {"target_bits": rule_plan["size"]["avg_bits_per_weight"],
                  "from": f"the size of the {entropy} entropy rule plan (k={k:g})"}
    menu = menu_of(settings, method)
    other_shapes = planned_other_shapes(ckpt, settings.backend)
    items = allocate.plan_items(blocks, granularity, other_shapes)
    sizes = allocate.item_sizes(items, group_size, raw_bits, menu)
    # a target the executor cannot reach is refused before anything is measured
    if file_target is not None:
        # an importance-weighted plan ("calibration" or a file; "none": plain rounding) aims at the preset as
        # llama-quantize makes it with an importance matrix: some presets choose other types then
        from . import presets

        weighted = getattr(settings, "imatrix", "none") not in ("none", None)
        shape = presets.model_shape(source.path)  # the GGUF's tensors, and the preset's file of them: read once
        preset = presets.preset_size(source.path, target["preset"], weighted, shape=shape) if "preset" in target else None
        budget = llamacpp_budget(source, items, sizes, target, menu, shape, preset, weighted)
        decode = llamacpp_decode_limit(ckpt, items, sizes, target, shape, preset)
    else:
        budget = allocate.budget_bytes(blocks, other, target.get("target_bits"), target.get("max_weight_gb"),
                                       group_size, menu, settings.backend, raw_bits, items)
        decode = None
    method_info = {"name": method, "target": target, "granularity": granularity, **raw_bits_entry(raw_bits)}
    if group_size != DEFAULT_GROUP_SIZE:
        method_info["group_size"] = group_size
    extra, checks, cached, timing = None, None, None, {}
    if settings.backend == "llama.cpp":
        method_info.update(backend=settings.backend, formats=settings.key())
    levels = " then ".join(menu)
    if method == "entropy":
        if granularity == "block":
            scores = list(analysis.block_entropies)
        else:
            names = [f"{ckpt.block_prefix}.{it['block']}.{it['matrix']}.weight" for it in items if it["block"] is not None]
            scores = [analysis.matrix_entropies[n][entropy] for n in names]
        scores += [math.inf] * len(other_shapes)  # the embeddings and head are lowered last
        order = sorted(range(len(items)), key=lambda i: (scores[i], i))
        precisions = allocate.ordered_allocation(order, sizes, budget, menu)
        method_info.update(entropy=entropy, bins=bins if entropy == "histogram" else None,
                           allocator=f"ordered: lowest entropy lowered first, all to {levels}")
    elif method == "position":
        rank = {b: r for r, b in enumerate(allocate.position_order(len(blocks)))}
        rank[None] = len(blocks)  # the embeddings and head are lowered last
        order = sorted(range(len(items)), key=lambda i: (rank[items[i]["block"]], i))
        precisions = allocate.ordered_allocation(order, sizes, budget, menu)
        method_info["allocator"] = "ordered: middle blocks lowered first; first and last blocks keep the most bits"
    else:
        precisions, checks, extra, cached, timing = sensitivity_allocation(
            source, ckpt, analysis, items, sizes, budget, menu, settings, granularity, calib_tokens, calib_text,
            out_dir, device, progress, calib_sentences, sweep, method_info, decode)
    plan = build_plan(source, ckpt, analysis.fingerprint, method_info, [b["precision"] for b in blocks],
                      analysis.block_entropies, None, analysis.seconds)
    if other_shapes:
        plan["other"].update(shapes=other_shapes, note="norms and biases are never quantized; a llama.cpp plan "
                                                       "quantizes the embeddings and output head too, as llama.cpp does")
    allocate.write_precisions(plan["blocks"], items, precisions, plan["other"])
    if extra is not None:
        metric = method_info["metric"]
        by_block = {}
        for it, r in zip(items, extra):
            by_block.setdefault(it["block"], []).append((it["matrix"], r))
        field = {p: f"{metric}_{p.replace('-', '')}" for p in menu}  # kl_8bit, kl_4bit; kl_Q8_0, kl_Q6_K, ...
        for b in plan["blocks"]:
            measured_rows = by_block[b["index"]]
            if granularity == "block":
                r = measured_rows[0][1]
                b.update({field[p]: _round(r.get(p)) for p in menu})
            else:  # a block's sensitivity summarised as the sum over its matrices; per matrix in `matrix_<metric>`
                b.update({field[p]: _round(sum(r[p] for _, r in measured_rows)) if all(p in r for _, r in measured_rows)
                          else None for p in menu})
                b[f"matrix_{metric}"] = {m: {p: _round(v) for p, v in r.items()} for m, r in measured_rows}
            b["entropies"] = {kind: round(v[b["index"]], 9) for kind, v in analysis.by_kind.items()}
        if None in by_block:
            plan["other"][f"matrix_{metric}"] = {m: {p: _round(v) for p, v in r.items()} for m, r in by_block[None]}
    plan["counts"] = counts(plan["blocks"])
    plan["matrix_counts"] = matrix_counts(plan["blocks"])
    plan["size"] = size_summary(plan["blocks"], other, group_size, raw_bits, plan["other"])
    if checks:
        plan["checks"] = {k: (_round(v) if isinstance(v, float) else [_round(x) for x in v] if isinstance(v, list) else v)
                          for k, v in checks.items()}
    if cached is not None:  # under "run": not part of the plan's identity
        plan["run"].update(sensitivity_cached=cached, **timing)
        if settings.backend == "llama.cpp":  # the same bytes either way; the time differs ~2x
            from .ggml_native import describe

            plan["run"]["ggml_rounding"] = describe()
    return plan


def sensitivity_allocation(source, ckpt, analysis, items, sizes, budget, menu, settings, granularity, calib_tokens,
                           calib_text, out_dir, device, progress, calib_sentences, sweep, method_info,
                           decode=None) -> tuple:
    """Measure every item (sensitivity.measure, cached), pick the minimum-damage plan within the budget, and grade
    it and random plans of the same size on the calibration text. Returns (precisions, checks, per-item rows, cached?,
    seconds of the sweep and of the checks); fills method_info."""
    calibration = sensitivity.Calibration(source, ckpt, analysis.fingerprint, calib_tokens or sensitivity.CALIB_TOKENS,
                                          calib_text, 256, settings, granularity, device,
                                          calib_sentences or sensitivity.CALIB_SENTENCES, sweep, menu)
    metric = calibration.metric
    start = time.perf_counter()
    rows, key, cached = sensitivity.measure(calibration, items, out_dir, progress)
    sweep_s = time.perf_counter() - start
    costs = [{p: 0.0 if p == "raw" else r.get(p, math.inf) for p in s} for r, s in zip(rows, sizes)]
    if decode is None:
        precisions = allocate.optimal_allocation(costs, sizes, budget)
    else:  # no slower than the preset either: the decode time each item takes in each format, and the preset's
        times, preset_time, limit, table = decode
        precisions = allocate.timed_allocation(costs, sizes, budget, times, limit)
        unlimited = allocate.optimal_allocation(costs, sizes, budget)
        method_info["decode_cost"] = {
            "plan": round(sum(t[p] for t, p in zip(times, precisions)) / preset_time, 4),
            "without_limit": round(sum(t[p] for t, p in zip(times, unlimited)) / preset_time, 4),
            "unit": "x the preset's file: summed weights x llama.cpp CPU kernel time per weight of their format",
            "table": table}
    how = "estimated to second order (Fisher, fast sweep)" if calibration.sweep_kind == "fast" else "measured"
    if calibration.imatrix_file is not None:  # the file export rounds with by default (python -m ewq.export gguf)
        method_info["imatrix"] = {"file": str(Path(calibration.imatrix_file).resolve()),
                                  "entries": len(calibration.imatrix.sums)}
    method_info.update(calibration=key, backend=settings.backend, formats=settings.key(), metric=metric,
                       allocator=f"exact: minimum summed {granularity} {metric} within the byte budget (Pareto DP)")
    if calibration.sweep_kind == "fast":
        method_info["sweep"] = f"fast: single-item {metric} {how}"
    if settings.backend == "bitsandbytes":
        method_info["quant_type"] = settings.quant_type
    predicted = sum(c[p] for c, p in zip(costs, precisions))
    if not math.isfinite(predicted):
        raise EWQError(f"the {settings.backend} backend has no 4-bit, and this size target needs some; "
                       f"choose a target of at least 8.1 bits or another --backend")
    randoms = [allocate.random_allocation(sizes, budget, seed, menu) for seed in range(sensitivity.RANDOM_PLANS)]
    start = time.perf_counter()
    measured = sensitivity.measure_plans(calibration, items, [precisions] + randoms, progress)
    checks_s = time.perf_counter() - start
    checks = {f"predicted_{metric}": predicted, f"measured_{metric}": measured[0],
              f"random_plans_{metric}": measured[1:], f"random_mean_{metric}": sum(measured[1:]) / len(randoms),
              "windows": "calibration",
              "note": f"predicted = sum of single-item {metric}; random = same size, random order"}
    return precisions, checks, rows, cached, {"sensitivity_s": round(sweep_s, 1), "checks_s": round(checks_s, 1)}


def _round(v):
    return None if v is None else round(v, 9)
