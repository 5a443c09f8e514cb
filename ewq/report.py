"""Stage 7: one comparison table (and plots) from benchmark result JSONs.

    python -m ewq.report benchmark_results/            # newest result of each variant in the folder
    python -m ewq.report a.json b.json --allow-mixed

Per variant: weight GB, peak memory GB, decode tokens/s, prefill s, change vs the original in %,
average bits per block weight, perplexity, KL(original || variant), top-1 agreement, and agreement of
the greedy suite outputs with the original's. Written to benchmark_results/report_<time>.md with two
PNG plots (matplotlib): the plan's per-block entropy coloured by precision, and size vs KL.
"""

import json
import statistics
import sys
import time
from pathlib import Path

from .common import ArgumentParser, EWQError, run_cli, unique_path, write_text_atomic
from .plan import METRIC_LABELS, load_plan, sensitivity_metric
from .probes import competed, format_instruction_set
from .quality import output_agreement
from .result import RESULT_SCHEMA_VERSION

COLORS = {"raw": "#4C72B0", "8-bit": "#DD8452", "4-bit": "#C44E52"}


def collect(paths) -> list:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*_benchmark_*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise EWQError(f"{p} does not exist; give result JSON files or folders that hold them")
    if not files:
        raise EWQError(f"no benchmark result JSON in {', '.join(map(str, paths))}; run benchmark_original.py and "
                       f"benchmark.py first")
    results, damaged = [], []
    for f in files:
        try:
            r = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(r, dict) or r.get("schema_version") != RESULT_SCHEMA_VERSION or r.get("kind") not in ("ewq", "original"):
                raise ValueError(f"not an EWQ benchmark result of schema_version {RESULT_SCHEMA_VERSION}")
            for field in ("variant", "created", "model", "environment", "memory", "speed", "settings", "tests"):
                r[field]  # noqa: B018  (a KeyError names the missing field)
            r["model"]["fingerprint"], r["environment"]["device_name"]  # noqa: B018
        except (OSError, ValueError, KeyError, TypeError) as e:
            damaged.append(f"{f} ({type(e).__name__}: {str(e)[:80]})")
            continue
        r["_file"] = str(f)
        results.append(r)
    for d in damaged:  # one line each; the good results are still reported
        sys.stderr.write(f"warning: skipped a damaged result file: {d}\n")
    if not results:
        raise EWQError(f"none of the {len(files)} result files could be read (see the warnings above); "
                       f"run the benchmarks again")
    return results


def newest_per_variant(results) -> list:
    latest = {}
    for r in sorted(results, key=lambda r: (r["created"], r["_file"])):
        latest[(r["model"]["fingerprint"], r["environment"]["device_name"], r["variant"])] = r
    return list(latest.values())


def sections(results, allow_mixed: bool) -> list:
    """Results that compare like for like: one section per (model weights, device and its instruction set), in
    order of first appearance (two machines of the same name may differ in AVX-512). With allow_mixed, one table."""
    if allow_mixed:
        return [results]
    groups = {}
    for r in results:
        isa = json.dumps(r["environment"].get("instruction_set"), sort_keys=True)
        groups.setdefault((r["model"]["fingerprint"], r["environment"]["device_name"], isa), []).append(r)
    return list(groups.values())


def mode_of(result) -> str:
    """How a result ran: 'llama.cpp', 'compiled' or 'eager'. A variant is compared with the original run the
    same way: a compiled variant against the compiled original, never against the eager one."""
    env = result["environment"]
    if env.get("backend") == "llama.cpp":
        return "llama.cpp"
    return "compiled" if env.get("compiled") else "eager"


def executor_label(result) -> str:
    env = result["environment"]
    if result["kind"] == "original":
        return f"original, {mode_of(result)}"
    return env.get("backend", "?") + ("" if mode_of(result) == "llama.cpp" else f", {mode_of(result)}")


def originals_by_mode(results) -> dict:
    return {mode_of(r): r for r in results if r["kind"] == "original"}


def suite_agreement(result, original) -> dict | None:
    if original is None:
        return None
    ref = {(t["task"], t["prompt"]): t for t in original["tests"]}
    scores = [output_agreement(t["token_ids"], ref[k]["token_ids"], t["text"], ref[k]["text"])
              for t in result["tests"] if (k := (t["task"], t["prompt"])) in ref]
    if not scores:
        return None
    return {k: statistics.fmean(s[k] for s in scores) for k in scores[0]} | {"prompts": len(scores)}


def pct(value, base):
    return None if base in (None, 0) or value is None else 100 * (value / base - 1)


def rows(results) -> list:
    """One table row per result; changes (Δ) are against the original run in the same mode."""
    originals = originals_by_mode(results)
    out = []
    order = sorted(results, key=lambda r: (r["kind"] != "original", mode_of(r), -r["memory"]["weight_bytes"]))
    for r in order:
        m, s, q = r["memory"], r["speed"], r.get("quality") or {}
        original = originals.get(mode_of(r))
        o = original or {}
        suite = suite_agreement(r, original)
        smaller = o and m["weight_gb"] < o["memory"]["weight_gb"]
        faster = o and s["decode_tok_s_median"] > o["speed"]["decode_tok_s_median"]
        out.append({
            "variant": r["variant"], "executor": executor_label(r), "kind": r["kind"],
            "smaller_and_faster": "✓" if r["kind"] != "original" and smaller and faster else "",
            "speedup": s["decode_tok_s_median"] / o["speed"]["decode_tok_s_median"] if o else None,
            "weight_ratio": m["weight_gb"] / o["memory"]["weight_gb"] if o else None,
            "precisions": precision_counts(r.get("plan")),
            "weight_gb": m["weight_gb"],
            "weight_change_pct": pct(m["weight_gb"], o.get("memory", {}).get("weight_gb")),
            "peak_gb": m["peak_allocated_gb"],
            "peak_change_pct": pct(m["peak_allocated_gb"], o.get("memory", {}).get("peak_allocated_gb")),
            "decode_tok_s": s["decode_tok_s_median"],
            "decode_change_pct": pct(s["decode_tok_s_median"], o.get("speed", {}).get("decode_tok_s_median")),
            "prefill_s": s["prefill_s_median"],
            "bandwidth_pct": s.get("bandwidth_fraction") and 100 * s["bandwidth_fraction"],
            "bits_per_weight": m["block_avg_bits_per_weight"],
            "perplexity": q.get("perplexity"), "kl_mean": q.get("kl_mean"), "top1_agreement": q.get("top1_agreement"),
            "suite_prefix": (suite or {}).get("prefix_match"), "suite_rouge_l": (suite or {}).get("rouge_l"),
        })
    return out


def precision_counts(plan) -> str:
    """raw/8/4 counts of a result's plan: per matrix (suffix m) for per-matrix plans, else per block."""
    if not plan or not plan.get("counts"):
        return "all raw"
    per_matrix = bool(plan.get("matrices")) and plan.get("matrix_counts")
    c = plan["matrix_counts"] if per_matrix else plan["counts"]
    return f"{c['raw']}/{c['8-bit']}/{c['4-bit']}" + (" m" if per_matrix else "")


def fmt(v, spec):
    """A number for a table: `spec` is a format spec, with a trailing % or × kept as a unit; None is "–"."""
    if v is None:
        return "–"
    if spec and spec[-1] in "%×":
        return format(v, spec[:-1]) + spec[-1]
    return format(v, spec) if spec else str(v)


# (header, row key, format): one row per result, as `rows` and `encoder_rows` build them
DECODER_COLUMNS = (
    ("variant", "variant", None), ("executor", "executor", None), ("smaller & faster", "smaller_and_faster", None),
    ("raw/8/4 (blocks; m: matrices)", "precisions", None),
    ("weight GB", "weight_gb", ".3f"), ("Δ weight", "weight_change_pct", "+.1f%"), ("peak GB", "peak_gb", ".3f"),
    ("Δ peak", "peak_change_pct", "+.1f%"), ("decode tok/s", "decode_tok_s", ".2f"),
    ("Δ decode", "decode_change_pct", "+.1f%"), ("BW %", "bandwidth_pct", ".0f"), ("prefill s", "prefill_s", ".3f"),
    ("bits/weight", "bits_per_weight", ".2f"), ("perplexity", "perplexity", ".3f"), ("KL", "kl_mean", ".4f"),
    ("top-1", "top1_agreement", ".3f"), ("suite prefix", "suite_prefix", ".3f"), ("ROUGE-L", "suite_rouge_l", ".3f"))
ENCODER_COLUMNS = (
    ("variant", "variant", None), ("raw/8/4 (blocks; m: matrices)", "precisions", None),
    ("weight GB", "weight_gb", ".3f"), ("Δ weight", "weight_change_pct", "+.1f%"), ("peak GB", "peak_gb", ".3f"),
    ("sent/s batch 1", "b1", ".1f"), ("sent/s batch 32", "b32", ".1f"), ("× original (batch 32)", "b32_speedup", ".2f×"),
    ("latency p50 ms", "p50_ms", ".1f"), ("latency p95 ms", "p95_ms", ".1f"), ("bits/weight", "bits_per_weight", ".2f"),
    ("cosine mean", "cosine_mean", ".4f"), ("cosine min", "cosine_min", ".4f"), ("top-10", "top10", ".3f"))


ADVICE_COLUMNS = (
    ("bits/weight", "size", ".1f"), ("use", "variant", None), ("executor", "executor", None),
    ("weight GB", "weight_gb", ".3f"), ("× original's weights", "weight_ratio", ".2f×"),
    ("decode tok/s", "decode_tok_s", ".2f"), ("× original (same mode)", "speedup", ".2f×"), ("KL", "kl_mean", ".4f"),
    ("top-1", "top1_agreement", ".3f"), ("smaller & faster", "smaller_and_faster", None))


def recommendations(table) -> list:
    """Per size (block bits per weight, to the nearest 0.5), the measured variant with the lowest KL; on a tie
    the faster one. Largest size first."""
    best = {}
    for t in table:
        if t["kind"] == "original" or t["kl_mean"] is None:
            continue
        size = round(t["bits_per_weight"] * 2) / 2
        rank = (t["kl_mean"], -(t["speedup"] or 0))
        if size not in best or rank < (best[size]["kl_mean"], -(best[size]["speedup"] or 0)):
            best[size] = {**t, "size": size}
    return [best[k] for k in sorted(best, reverse=True)]


def advice(table, isa: str) -> list:
    """Plain words: which variant to use and what it costs, or why none is faster here."""
    winners = [t for t in table if t["smaller_and_faster"] and t["kl_mean"] is not None]
    if winners:
        t = min(winners, key=lambda t: (t["kl_mean"], t["weight_gb"]))
        return [f"Use {t['variant']} ({t['executor']}): {t['weight_ratio']:.2f}× the original's weight bytes and "
                f"{t['speedup']:.2f}× its decode speed, both run the same way on this machine ({isa}), at a measured "
                f"cost of KL {t['kl_mean']:.4f} per token and top-1 agreement {t['top1_agreement']:.3f} with the "
                f"original."]
    quantized = [t for t in table if t["kind"] != "original" and t["speedup"] is not None]
    if not quantized:
        return ["No quantized variant has an original run the same way among these results: run "
                "benchmark_original.py in the same mode (--compile or --eager) to compare speed."]
    fastest = max(quantized, key=lambda t: t["speedup"])
    return [f"No quantized variant here is both smaller and faster than the original run the same way on this "
            f"machine ({isa}): the fastest, {fastest['variant']} ({fastest['executor']}), decodes at "
            f"{fastest['speedup']:.2f}× the original. Quantized weights are read faster only where the executor's "
            f"kernels unpack them at memory speed: on a CPU that needs AVX-512 (VNNI, BF16) for torchao's int8/int4 "
            f"and compiled decoding; eager bitsandbytes dequantizes on every call. The sizes and KL above still hold."]


def markdown_table(table, columns=DECODER_COLUMNS) -> str:
    lines = ["| " + " | ".join(head for head, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(t[key], spec) for _, key, spec in columns) + " |" for t in table]
    return "\n".join(lines)


def plan_of(result, need_entropy_stats: bool = True):
    """The plan file a result was made with, if it is still there (for the entropy and research plots)."""
    path = (result.get("plan") or {}).get("path")
    if not path or not Path(path).is_file():
        return None
    try:
        plan = load_plan(path)
    except EWQError:
        return None
    if need_entropy_stats and not (plan.get("stats") and all("entropy" in b for b in plan["blocks"])):
        return None
    return plan


def plot_entropy(plan, path: Path, plt) -> None:
    blocks = plan["blocks"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar([b["index"] for b in blocks], [b["entropy"] for b in blocks], color=[COLORS[b["precision"]] for b in blocks])
    from matplotlib.patches import Patch

    st, m = plan["stats"], plan["method"]
    mu = ax.axhline(st["mean"], color="black", lw=1, label="μ (raw at or above)")
    low = ax.axhline(st["four_bit_threshold"], color="black", lw=1, ls="--", label=f"μ − {m['k']:g}σ (4-bit below)")
    handles = [mu, low] + [Patch(color=c, label=p) for p, c in COLORS.items()]
    lo = min(b["entropy"] for b in blocks)
    hi = max(b["entropy"] for b in blocks)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9) - 1e-6, hi + 0.1 * (hi - lo + 1e-9) + 1e-6)
    ax.set_xlabel("block")
    ax.set_ylabel(f"{m['entropy']} entropy")
    ax.set_title(f"{plan['model']['id']}: block entropy and chosen precision")
    ax.legend(handles=handles, fontsize=7, ncol=5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_size_vs_kl(table, path: Path, plt) -> None:
    """Weight bytes against KL, each point labelled with its decode speed and its speed-up over the original run
    the same way: the picture a user reads faster than the table."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for t in table:
        if t["kl_mean"] is None:
            continue
        fast = t["smaller_and_faster"]
        ax.scatter(t["weight_gb"], t["kl_mean"], s=40, marker="*" if fast else "o", color="#2a9d8f" if fast else "#555")
        speed = f"{t['decode_tok_s']:.1f} tok/s" + (f" ({t['speedup']:.2f}× {t['executor'].split(', ')[-1]})"
                                                     if t["speedup"] is not None else "")
        ax.annotate(f"{t['variant']}\n{speed}", (t["weight_gb"], t["kl_mean"]), fontsize=6.5, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xlabel("weight GB")
    ax.set_ylabel("mean KL(original ‖ variant) per token")
    ax.set_title("size vs quality, decode speed beside each point (★ smaller and faster than the original)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def size_group(result) -> float:
    """Results compare 'at equal size' when their plans aimed at the same average bits per weight."""
    plan = result.get("plan") or {}
    target = (plan.get("method") or {}).get("target") or {}
    bits = target.get("target_bits") or plan.get("estimated_avg_bits_per_weight")
    return round(bits, 2) if bits else 16.0


def research_section(results, report_path: Path, plt) -> list:
    """Does entropy predict measured sensitivity? Correlations, a scatter plot, and equal-size comparisons."""
    sens = next((p for r in reversed(results) if (r.get("plan") or {}).get("name") == "sensitivity"
                 and (p := plan_of(r, need_entropy_stats=False))), None)
    lines = ["", "## Does entropy predict sensitivity?", ""]
    if sens is None:
        return lines + ["No result of a `--method sensitivity` plan among these files: run "
                        "`python main_cache_model.py --method sensitivity` and benchmark its plan."]
    blocks, m = sens["blocks"], sensitivity_metric(sens)
    label = METRIC_LABELS[m]
    kl4 = [b.get(f"{m}_4bit") for b in blocks]
    kl8 = [b.get(f"{m}_8bit") for b in blocks]
    cal = sens["method"]["calibration"]
    text = (f"{cal['sentences']} calibration sentences" if "sentences" in cal
            else f"{cal['windows']} calibration windows of {cal['window']} tokens")
    lines.append(f"Block sensitivity of {sens['model']['id']}: {label} (original vs one block quantized) on "
                 f"{text} from the end of {cal['corpus']} (disjoint from the evaluation text).")
    lines += ["", f"| entropy | Spearman ρ vs 4-bit {label} | Spearman ρ vs 8-bit {label} |", "|---|---|---|"]
    for kind in ("histogram", "softmax"):
        h = [b["entropies"][kind] for b in blocks]
        rho = [fmt(spearman(h, x), "+.3f") if None not in x else "– (not measured)" for x in (kl4, kl8)]
        lines.append(f"| {kind} | {rho[0]} | {rho[1]} |")
    lines.append("\nThe EWQ hypothesis predicts a positive ρ (high entropy = sensitive).")
    if plt is not None and None not in kl4:
        p = report_path.with_name(report_path.stem + "_entropy_vs_sensitivity.png")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for ax, kind in zip(axes, ("histogram", "softmax")):
            ax.scatter([b["entropies"][kind] for b in blocks], kl4, s=18)
            for b in blocks:
                ax.annotate(str(b["index"]), (b["entropies"][kind], b[f"{m}_4bit"]), fontsize=6)
            ax.set_yscale("log")
            ax.set_xlabel(f"{kind} entropy of the block")
            ax.set_ylabel(f"{label} when the block alone is 4-bit")
        fig.suptitle("block entropy vs measured 4-bit sensitivity")
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        lines.append(f"\n![entropy vs sensitivity]({p.name})")
    checked = [(r, c) for r in results if (c := (r.get("plan") or {}).get("checks")) and f"predicted_{m}" in c]
    if checked:
        lines += ["", f"Checks of the sensitivity plans ({label} on the calibration text unless said): is the sum of "
                  "single measurements a good prediction, and does the plan beat random plans of the same size?", "",
                  f"| variant | predicted {label} | measured {label} | measured / predicted | mean of random plans | "
                  f"random / measured | {label} on the evaluation text |", "|---|---|---|---|---|---|---|"]
        for r, c in checked:
            pred, meas, rand = c[f"predicted_{m}"], c[f"measured_{m}"], c[f"random_mean_{m}"]
            ratio = meas / pred if pred else None
            gain = rand / meas if meas else None
            lines.append(f"| {r['variant']} | {pred:.4f} | {meas:.4f} | {fmt(ratio, '.2f')} "
                         f"| {rand:.4f} ({', '.join(f'{x:.4f}' for x in c[f'random_plans_{m}'])}) "
                         f"| {fmt(gain, '.1f')}× | {fmt(loss_of(r), '.4f')} |")
    encoder = m == "cosine_loss"
    extra = ("cosine mean", "top-10") if encoder else ("perplexity", "top-1")
    lines += ["", "Equal size: variants grouped by the average bits per weight their plans aim at.", "",
              f"| target bits | variant | raw/8/4 (blocks; m: matrices) | {label} | {extra[0]} | {extra[1]} |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (-size_group(r), loss_of(r) or 0)):
        q, c = r.get("quality") or {}, r.get("plan")
        counts = precision_counts(c)
        more = (fmt(q.get("cosine_mean"), ".4f"), fmt(q.get("top10_agreement"), ".3f")) if encoder else \
            (fmt(q.get("perplexity"), ".3f"), fmt(q.get("top1_agreement"), ".3f"))
        lines.append(f"| {size_group(r):.2f} | {r['variant']} | {counts} | {fmt(loss_of(r), '.4f')} | {more[0]} | {more[1]} |")
    return lines


def loss_of(result):
    """The quality loss a result measured: KL for decoders, mean 1 - cosine for encoders (None if not measured)."""
    q = result.get("quality") or {}
    return q.get("cosine_loss_mean") if result.get("encoder") else q.get("kl_mean")


def encoder_rows(results) -> list:
    original = next((r for r in results if r["kind"] == "original"), None) or {}
    o = original.get("encoder") or {}
    out = []
    for r in sorted(results, key=lambda r: (r["kind"] != "original", -r["memory"]["weight_bytes"])):
        e, m, q = r["encoder"], r["memory"], r.get("quality") or {}
        out.append({
            "variant": r["variant"], "precisions": precision_counts(r.get("plan")),
            "weight_gb": m["weight_gb"],
            "weight_change_pct": pct(m["weight_gb"], (original.get("memory") or {}).get("weight_gb")),
            "peak_gb": m["peak_allocated_gb"], "b1": e["batch_1"]["sentences_per_s"], "b32": e["batch_32"]["sentences_per_s"],
            "b32_speedup": e["batch_32"]["sentences_per_s"] / o["batch_32"]["sentences_per_s"] if o else None,
            "p50_ms": 1000 * e["latency_batch_1_s_median"], "p95_ms": 1000 * e["latency_batch_1_s_p95"],
            "bits_per_weight": m["block_avg_bits_per_weight"], "cosine_mean": q.get("cosine_mean"),
            "cosine_min": q.get("cosine_min"), "top10": q.get("top10_agreement"),
        })
    return out


def build_report(results, out_dir, allow_mixed: bool = False) -> tuple:
    """(markdown text, report path, notes): one section per model and device (one table with allow_mixed).
    Plots are written beside the report."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path = unique_path(out_dir, f"report_{stamp}", ".md")
    groups = sections(results, allow_mixed)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    title = groups[0][0]["model"]["id"] if len(groups) == 1 else f"{len(groups)} models/devices"
    text, notes = [f"# EWQ report — {title}"], []
    if plt is None:
        notes.append("plots skipped: matplotlib is not installed (pip install matplotlib)")
    report_notes = list(notes)
    for n, group in enumerate(groups):
        stem = report_path.stem + (f"_{n + 1}" if len(groups) > 1 else "")
        part, part_notes = report_section(group, report_path.with_name(stem), plt, heading=len(groups) > 1)
        # a section's notes (busy CPU, missing original) name its own variants: they close that section, not the report
        text += part + [f"\n- {n}" for n in dict.fromkeys(part_notes)]
        notes += part_notes
    text += [f"\n- {n}" for n in report_notes]
    text.append("\nResult files: " + ", ".join(Path(r["_file"]).name for r in results))
    return "\n".join(text) + "\n", report_path, notes


def report_section(results, stem: Path, plt, heading: bool) -> tuple:
    """The table, quality note, plots and research section of results from one model on one device."""
    first = results[0]
    env, settings = first["environment"], first["settings"]
    if first.get("encoder"):
        return encoder_section(results, stem, plt, heading)
    table = rows(results)
    notes = []
    if not any(r["kind"] == "original" for r in results):
        notes.append("no original result: changes in % and suite agreement need benchmark_original.py")
    if not any(r.get("quality") for r in results):
        notes.append("no quality figures: run the benchmarks with --quality")
    busy = [r["variant"] for r in results if competed(r["environment"])]
    if busy:
        notes.append(f"measured while other processes competed for the CPU (load average above this run's threads), so "
                     f"their speeds are low and noisy: {', '.join(busy)}")
    isa = format_instruction_set(env.get("instruction_set"))
    text = [""] + ([f"## {first['model']['id']} on {env['device_name']}", ""] if heading else [])
    best = recommendations(table)
    if best:
        text += ["### What should I use?", "", "Per size, the measured variant closest to the original (lowest KL); "
                 "speed against the original run the same way (eager, compiled, or llama.cpp), on "
                 f"{env['device_name']} ({isa}).", "", markdown_table(best, ADVICE_COLUMNS), ""] + advice(table, isa) + [
                 "", "### All variants", ""]
    text += [
        f"Device: {env['device_name']} ({env['device']}, {env['dtype']}; {isa}); torch {env['torch']}, transformers "
        f"{env['transformers']}, bitsandbytes {env.get('bitsandbytes')}, torchao {env.get('torchao', '–')}. Suite: "
        f"{settings['prompts']} prompts ({', '.join(settings['tasks'])}), {settings['max_new_tokens']} new tokens, "
        f"{settings['repeats']} repeats, greedy. Δ columns compare with the original run the same way.",
        "", markdown_table(table), ""]
    q = next((r["quality"] for r in results if r.get("quality")), None)
    if q:
        text.append(f"Quality on {q['eval_tokens']} tokens of {q['corpus']} ({q['windows']} windows of {q['window']}); "
                    f"KL over the original's top-{q['kl_top_k']} plus a pooled tail. Suite prefix = share of greedy "
                    f"tokens equal to the original's before the first divergence.")
    bw = next((r["speed"].get("device_read_bandwidth_gb_s") for r in results if r["speed"].get("device_read_bandwidth_gb_s")), None)
    if bw:
        text.append(f"Roofline: the device reads {bw:.1f} GB/s (measured); 'BW %' is weight bytes × decode tok/s as a "
                    f"share of it.")
    if plt is not None:
        rule_plan = next((plan for r in results if (plan := plan_of(r))), None)
        if rule_plan:
            p = stem.with_name(stem.name + "_entropy.png")
            plot_entropy(rule_plan, p, plt)
            text.append(f"\n![block entropy]({p.name})")
        if any(t["kl_mean"] is not None for t in table):
            p = stem.with_name(stem.name + "_size_vs_kl.png")
            plot_size_vs_kl(table, p, plt)
            text.append(f"\n![size vs KL]({p.name})")
    if any((r.get("plan") or {}).get("name") in ("sensitivity", "position") for r in results):
        text += research_section(results, stem, plt)
    return text, notes


def encoder_section(results, stem: Path, plt, heading: bool) -> tuple:
    """An encoder's section: sentences/s and latency beside fidelity to the original's embeddings."""
    first = results[0]
    env, settings = first["environment"], first["settings"]
    e = first["encoder"]
    notes = [] if any(r["kind"] == "original" for r in results) else [
        "no original result: the speed-up column needs benchmark_original.py"]
    q = next((r["quality"] for r in results if r.get("quality")), None)
    text = [""] + ([f"## {first['model']['id']} on {env['device_name']}", ""] if heading else []) + [
        f"Device: {env['device_name']} ({env['device']}, {env['dtype']}); torch {env['torch']}, transformers "
        f"{env['transformers']}, torchao {env.get('torchao', '–')}. Encoder: {settings['speed_sentences']} sentences "
        f"embedded at batch 1 and 32 ({settings['order']}), {settings['repeats']} repeats, {e['pooling']} pooling.",
        "", markdown_table(encoder_rows(results), ENCODER_COLUMNS), ""]
    if q:
        text.append(f"Fidelity on {q['sentences']} sentences of {q['corpus']}: cosine to the original's embedding of "
                    f"the same sentence; top-10 = share of each sentence's 10 nearest neighbours that stay its neighbours.")
    if any((r.get("plan") or {}).get("name") in ("sensitivity", "position") for r in results):
        text += research_section(results, stem, plt)
    return text, notes


def main(argv=None):
    p = ArgumentParser(prog="python -m ewq.report", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", default=["benchmark_results"], help="result JSON files or folders (default benchmark_results/)")
    p.add_argument("--allow-mixed", action="store_true",
                   help="one table across models and devices (default: one section per model and device)")
    p.add_argument("--all", action="store_true", help="every result, not only the newest of each variant")
    p.add_argument("--out-dir", default="benchmark_results", help="where report_<time>.md and the plots go")
    args = p.parse_args(argv)
    results = collect(args.paths)
    if not args.all:
        results = newest_per_variant(results)
    text, path, _ = build_report(results, args.out_dir, args.allow_mixed)
    write_text_atomic(path, text)
    print(text)
    print(path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
