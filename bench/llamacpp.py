#!/usr/bin/env python
"""llama.cpp side by side: EWQ's GGUF files next to llama.cpp's own presets, measured by llama.cpp's own tools.

    python bench/llamacpp.py [--model models/smollm2-135m] [--out-dir benchmark_results/llamacpp]
                             [--threads 2 | --threads 1,2] [--chunks 8] [--ctx 512] [--llama-bin DIR | --sdist FILE]
                             [--presets Q8_0,Q6_K,...] [--calib-text FILE] [--eval-text FILE] [--no-imatrix]
                             [--no-ewq] [--gguf FILE ...] [--plans PLAN ...]

The ladder (default): at each preset of --presets (Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, Q3_K_M, Q2_K) four files:
llama.cpp's preset without and with an importance matrix (llama-imatrix on the same calibration text EWQ measures
on), and EWQ at that preset's file size without and with importance (`python -m ewq.export gguf --model M --target
PRESET --out F [--no-imatrix]`: the plan made from scratch, the file no larger than the preset's); compared at file
size, never by preset name (a preset's rows that are not whole blocks fall back to bigger formats).

1. Tools: llama-quantize, llama-perplexity, llama-bench, llama-imatrix, built once from the llama-cpp-python 0.3.36 sdist (its
   vendored llama.cpp; cmake, Release, -DGGML_NATIVE=ON) into --cache-dir (default ~/.cache/ewq/llama.cpp-0.3.36)
   and reused while the binaries are there; the sdist is --sdist, else the copy in the cache dir, else
   `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`. --llama-bin DIR uses binaries already built.
   The build took 3.5 minutes on 2 idle cores and 14.6 on 2 cores shared with other jobs (~6.5 CPU-minutes; the
   time is printed and kept in the cache's build.json).
2. Files: the BF16 GGUF of --model written by EWQ's exporter (ewq.gguf_export; byte-identical to llama.cpp's
   convert_hf_to_gguf --outtype bf16, without its sentencepiece dependency; --reference-type F16 for the lossless
   file of an fp16 checkpoint: BF16 drops 3 mantissa bits, KLD ~2e-4 on SmolLM2), then the presets from it with
   llama-quantize, without and (unless --no-imatrix) with `--imatrix` from `llama-imatrix -c 256` run on the
   calibration text: exactly the --calib-tokens tokens EWQ's sweep calibrates on (the end of --calib-text, default
   lee_background.cor), decoded and written to the out dir; the EWQ rows (unless --no-ewq); --gguf FILE adds GGUF
   files as they are, and --plans PLAN adds EWQ plans, each exported with `python -m ewq.export gguf --plan PLAN`.
3. Quality: llama-perplexity on a slice from the MIDDLE of --eval-text (default lee_background.cor, gensim's test
   corpus), refused when it shares any 64 characters with the calibration text (the JSON and the printout give its
   exact bytes [start, end) and sha256; it is written to the out dir):
   first `--kl-divergence-base` with the reference file (BF16 unless --reference-type; saves its logits and gives
   its PPL), then `--kl-divergence` for every file, the reference included (a self-check: its KLD must be 0): mean
   KL(reference || file) in nats, the
   share of positions where the top token is the same, and PPL. llama-perplexity scores the second half of each
   chunk only: --chunks x (ctx - 1 - ctx/2) tokens (8 x 255 = 2040 by default), on the same tokens for every file.
4. Speed: `llama-bench -p 0 -n 64 -t THREADS -r 3 -o json` (tg64: decode from an empty context), --rounds times
   per file, the files interleaved (reverse order on odd rounds) so drifting load from other processes hits every
   row alike; tok/s is the median of all samples, ± their standard deviation, min/max in the JSON, with the 1-minute
   load average before each call. --threads 1,2 measures both thread counts in the same llama-bench calls (one
   column each; llama-perplexity and llama-quantize use the largest). Multi-threaded llama.cpp needs idle cores: its
   threads meet at a barrier after every op (hundreds per token), so with more runnable processes than cores -t 2
   was seen 5-20x slower than -t 1 (a warning is printed when the load average exceeds the cores).
5. Prints a markdown table (file, MB = 1e6 bytes, tg64 tok/s, mean KLD, same-top, PPL) with the CPU's model name and
   instruction-set flags, and writes llamacpp_<model>.json (schema_version 1; units in the field names).

Not a CI test: it needs a C++ toolchain and cmake (or --llama-bin) and minutes of CPU. A checkpoint whose weights
once went through a GGUF quantization (SmolLM2-135M's went through Q4_1) can make formats of the same family
(Q4_1, and Q4_K / Q5_K: groups with a float minimum) look unfairly good on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ewq.common import ArgumentParser, EWQError, run_cli, write_json_atomic
from ewq.ggml_types import LLAMA_CPP_PYTHON_VERSION as VERSION
from ewq.ggml_types import TOOLS_CACHE as DEFAULT_CACHE
from ewq.presets import file_stats, preset_size

SCHEMA_VERSION = 1
PRESETS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")  # the ladder people download
OVERLAP_CHARS = 64  # evaluation text sharing this many characters in a row with the calibration text is refused
TOOLS = ("llama-quantize", "llama-perplexity", "llama-bench", "llama-imatrix")
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_MTMD=OFF",
               "-DLLAMA_BUILD_UI=OFF"]
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx")
CORPUS = ("gensim", "gensim/test/test_data/lee_background.cor")


def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd, what: str, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run a command; a failure is one EWQError line with the tail of its output."""
    try:
        p = subprocess.run([str(c) for c in cmd], capture_output=capture, text=True, check=False, **kw)
    except OSError as e:
        raise EWQError(f"{what}: cannot run {cmd[0]}: {e.strerror or e}") from None
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout or "").strip().splitlines()[-3:]) if capture else ""
        raise EWQError(f"{what} failed (exit {p.returncode}): {tail}")
    return p


# ---- 1. the tools ----

def cached_tools(bin_dir: Path) -> bool:
    return all((bin_dir / t).is_file() and os.access(bin_dir / t, os.X_OK) for t in TOOLS)


def find_sdist(args, cache: Path) -> Path:
    if args.sdist:
        sdist = Path(args.sdist).expanduser()
        if not sdist.is_file():
            raise EWQError(f"--sdist {sdist} does not exist")
        return sdist
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        log(f"downloading the llama-cpp-python {VERSION} sdist into {cache}")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={VERSION}", "-d", cache], "pip download of the llama-cpp-python sdist")
    if not sdist.is_file():
        raise EWQError(f"pip download did not leave {sdist.name} in {cache}; pass --sdist FILE")
    return sdist


def build_tools(args) -> tuple[Path, dict]:
    """(directory of llama-quantize / llama-perplexity / llama-bench, how they came to be)."""
    if args.llama_bin:
        bin_dir = Path(args.llama_bin).expanduser().resolve()
        if not cached_tools(bin_dir):
            raise EWQError(f"--llama-bin {bin_dir} lacks one of {', '.join(TOOLS)}")
        log(f"llama.cpp tools: using {bin_dir} (given with --llama-bin, not built here)")
        return bin_dir, {"source": "given", "bin_dir": str(bin_dir)}
    cache = Path(args.cache_dir).expanduser()
    bin_dir, stamp = cache / "build" / "bin", cache / "build.json"
    if cached_tools(bin_dir):
        info = json.loads(stamp.read_text()) if stamp.is_file() else {}
        log(f"llama.cpp tools: reusing {bin_dir} (built in {info.get('build_s', '?')} s on {info.get('built', '?')})")
        return bin_dir, {**info, "source": "cache", "bin_dir": str(bin_dir)}
    if not shutil.which("cmake"):
        raise EWQError("building llama.cpp needs cmake (apt-get install cmake, or pip install cmake), or pass --llama-bin DIR")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        raise EWQError("building llama.cpp needs a C++ compiler (apt-get install g++), or pass --llama-bin DIR")
    cache.mkdir(parents=True, exist_ok=True)
    sdist = find_sdist(args, cache)
    src_root = cache / "src"
    src = src_root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        log(f"unpacking {sdist} into {src_root}")
        with tarfile.open(sdist) as tar:
            tar.extractall(src_root, filter="data")
        if not (src / "CMakeLists.txt").is_file():
            raise EWQError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt; is it the llama-cpp-python {VERSION} sdist?")
    jobs = str(os.cpu_count() or 2)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    log(f"building {', '.join(TOOLS)} from {src} (cmake {' '.join(CMAKE_FLAGS)}; {jobs} jobs; minutes)")
    start = time.perf_counter()
    build_log = cache / "build.log"
    with open(build_log, "w") as f:
        for cmd in ([*["cmake", "-S", src, "-B", cache / "build"], *generator, *CMAKE_FLAGS],
                    ["cmake", "--build", cache / "build", "--target", *TOOLS, "-j", jobs]):
            f.write("$ " + " ".join(map(str, cmd)) + "\n")
            f.flush()
            p = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, check=False)
            if p.returncode != 0:
                raise EWQError(f"building llama.cpp failed (exit {p.returncode}); see {build_log}")
    build_s = time.perf_counter() - start
    if not cached_tools(bin_dir):
        raise EWQError(f"the build finished but {bin_dir} lacks one of {', '.join(TOOLS)}; see {build_log}")
    info = {"build_s": round(build_s, 1), "built": datetime.now(UTC).isoformat(timespec="seconds"),
            "sdist": str(sdist), "cmake_flags": CMAKE_FLAGS, "jobs": int(jobs), "build_log": str(build_log)}
    write_json_atomic(stamp, info)
    log(f"llama.cpp tools built in {build_s:.0f} s ({build_s / 60:.1f} min) into {bin_dir}")
    return bin_dir, {**info, "source": "built", "bin_dir": str(bin_dir)}


# ---- the machine ----

def cpu_info() -> dict:
    from ewq.probes import cpu_info as read_cpuinfo

    name, flags = read_cpuinfo()
    has = {f: f in flags for f in CPU_FLAGS if f != "amx"}
    has["amx"] = any(f.startswith("amx") for f in flags)
    return {"model_name": name or platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(), "flags": has,
            "amx_flags": sorted(f for f in flags if f.startswith("amx"))}


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ---- 2. the files ----

def reused(out: Path, args) -> bool:
    """--reuse: a file an earlier run of the same command left in --out-dir is measured as it is (said so)."""
    if args.reuse and out.is_file():
        log(f"reusing {out.name} ({out.stat().st_size / 1e6:.1f} MB), made by an earlier run (--reuse)")
        return True
    return False


def export_reference(model: Path, out: Path, gguf_type: str, args) -> Path:
    from ewq.gguf_export import export_gguf

    if reused(out, args):
        return out

    start = time.perf_counter()
    r = export_gguf(model, out, {}, default_type=gguf_type, progress=False)
    log(f"wrote {out.name} ({r['bytes'] / 1e6:.0f} MB) with ewq.gguf_export in {time.perf_counter() - start:.0f} s")
    return out


def quantize(bin_dir: Path, src: Path, out: Path, preset: str, threads: int, imatrix: Path | None, args) -> Path:
    if reused(out, args):
        return out
    start = time.perf_counter()
    extra = ["--imatrix", imatrix] if imatrix else []
    run([bin_dir / "llama-quantize", *extra, src, out, preset, threads], f"llama-quantize {' '.join(map(str, extra))} {preset}")
    log(f"wrote {out.name} ({out.stat().st_size / 1e6:.1f} MB) with llama-quantize {preset}"
        f"{' and an importance matrix' if imatrix else ''} in {time.perf_counter() - start:.0f} s")
    return out


def make_imatrix(bin_dir: Path, reference: Path, calib_file: Path, out: Path, threads: int, args) -> Path:
    """llama-imatrix on the calibration text, in chunks of 256 tokens (EWQ's calibration windows), against the
    reference file the presets are quantized from."""
    if reused(out, args):
        return out
    start = time.perf_counter()
    run([bin_dir / "llama-imatrix", "-m", reference, "-f", calib_file, "-o", out, "-c", 256, "-b", 256,
         "-t", threads, "--no-ppl"], "llama-imatrix")
    log(f"wrote {out.name} with llama-imatrix in {time.perf_counter() - start:.0f} s")
    return out


def export_target(model: Path, preset: str, out: Path, plans_dir: Path, args, weighted: bool,
                  gptq: bool = False) -> dict:
    """EWQ at a preset's file size: `python -m ewq.export gguf --model M --target PRESET --out F`, the plan made from
    scratch (with its own importance from the calibration text, or --no-imatrix; gptq: the same plan's file rounded
    with --rounding gptq on --gptq-tokens tokens). Returns the row's file and plan."""
    if reused(out, args):
        return {"file": out, "plan": None, "reused": True}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ewq.export", "gguf", "--model", model, "--target", preset, "--out", out,
           "--plans-dir", plans_dir, "--calib-tokens", args.calib_tokens, "--no-progress",
           *(["--calib-text", args.calib_text] if args.calib_text else []), *([] if weighted else ["--no-imatrix"]),
           *(["--formats", ",".join(args.ewq_formats)] if args.ewq_formats else []), "--speed", str(args.ewq_speed),
           *(["--decode-cost", args.ewq_decode_cost] if args.ewq_decode_cost else []),
           *(["--rounding", "gptq", "--gptq-tokens", args.gptq_tokens] if gptq else [])]
    p = run(cmd, f"python -m ewq.export gguf --target {preset}", cwd=REPO)
    plan = next((line[len("plan: "):] for line in p.stdout.splitlines() if line.startswith("plan: ")), None)
    log(f"wrote {out.name} ({out.stat().st_size / 1e6:.1f} MB) with EWQ at {preset}'s size"
        f"{' with importance' if weighted else ''}{', rounded by GPTQ' if gptq else ''} in {time.perf_counter() - start:.0f} s (plan {plan})")
    return {"file": out, "plan": plan, "export_s": round(time.perf_counter() - start, 1),
            "command": " ".join(map(str, cmd[1:]))}


def export_plan(plan: Path, model: Path, out: Path) -> Path:
    start = time.perf_counter()
    run([sys.executable, "-m", "ewq.export", "gguf", "--plan", plan, "--model", model, "--out", out, "--no-progress"],
        f"python -m ewq.export gguf --plan {plan}", cwd=REPO)
    if not out.is_file():
        raise EWQError(f"python -m ewq.export gguf --plan {plan} wrote no {out}")
    log(f"wrote {out.name} ({out.stat().st_size / 1e6:.0f} MB) from plan {plan} in {time.perf_counter() - start:.0f} s")
    return out


def file_bytes_by_type(path: Path) -> dict:
    from ewq.backends.llamacpp import file_bytes_by_type as by_type

    return by_type(path)


# ---- 3. the text ----

def corpus_path(given) -> Path:
    if given:
        return Path(given)
    import importlib.metadata

    try:
        return Path(importlib.metadata.distribution(CORPUS[0]).locate_file(CORPUS[1]))
    except importlib.metadata.PackageNotFoundError:
        raise EWQError("the default corpus needs gensim: pip install --no-deps gensim==4.4.0 (or pass --eval-text FILE)") from None


def calibration_slice(calib_text, model: Path, n_tokens: int) -> dict:
    """The text EWQ's sweep calibrates on (ewq.quality.make_windows from the end of the corpus, windows of 256 tokens,
    as ewq.sensitivity.Calibration takes them), decoded ("text": what llama-imatrix reads)."""
    from transformers import AutoTokenizer

    from ewq.quality import load_corpus, make_windows

    corpus = load_corpus(calib_text)
    tok = AutoTokenizer.from_pretrained(model)
    windows = make_windows(tok, corpus, n_tokens, 256, from_end=True)
    text = tok.decode(windows.reshape(-1).tolist())
    return {"corpus": corpus.name, "corpus_sha256": corpus.sha256, "position": "end of corpus",
            "tokens": int(windows.numel()), "windows": int(windows.shape[0]),
            "sha256": hashlib.sha256(text.encode()).hexdigest(), "text": text}


def check_overlap(calib: str, evaluation: str, eval_name: str) -> None:
    """Refuse evaluation text that shares OVERLAP_CHARS characters in a row (whitespace runs counted as one space)
    with the calibration text: quality must be judged on text neither the sweep nor the importance matrix saw."""
    squash = lambda t: " ".join(t.split())
    c, e = squash(calib), squash(evaluation)
    seen = {c[i:i + OVERLAP_CHARS] for i in range(max(0, len(c) - OVERLAP_CHARS + 1))}
    hit = next((i for i in range(max(0, len(e) - OVERLAP_CHARS + 1)) if e[i:i + OVERLAP_CHARS] in seen), None)
    if hit is not None:
        raise EWQError(f"the evaluation text ({eval_name}) overlaps the calibration text (\"{e[hit:hit + 40]}...\"): "
                       f"judge quality on text neither calibration nor the importance matrix used; pass another "
                       f"--eval-text or --calib-text")


def text_slice(corpus: Path, model: Path, n_tokens: int) -> tuple[dict, bytes]:
    """Whole lines from the middle of the corpus holding at least n_tokens tokens (+2%) by the model's tokenizer."""
    from transformers import AutoTokenizer

    raw = corpus.read_bytes()
    tok = AutoTokenizer.from_pretrained(model)
    count = lambda b: len(tok(b.decode("utf-8"), add_special_tokens=False).input_ids)
    want = int(n_tokens * 1.02) + 16
    total = count(raw)
    if total < want:
        raise EWQError(f"{corpus.name} has {total} tokens, fewer than the {want} needed; lower --chunks or --ctx")
    nbytes = int(len(raw) * want / total)
    while True:
        start = max(0, (len(raw) - nbytes) // 2)
        start = 0 if start == 0 else raw.index(b"\n", start) + 1  # the next whole line
        end = raw.find(b"\n", min(len(raw), start + nbytes))
        end = len(raw) if end < 0 else end + 1
        piece = raw[start:end]
        got = count(piece)
        if got >= want or (start == 0 and end == len(raw)):
            break
        nbytes = int(nbytes * 1.1)
    return {"corpus": corpus.name, "corpus_path": str(corpus), "corpus_bytes": len(raw),
            "corpus_sha256": hashlib.sha256(raw).hexdigest(), "corpus_tokens": total,
            "start_byte": start, "end_byte": end, "bytes": end - start, "sha256": hashlib.sha256(piece).hexdigest(),
            "tokens": got}, piece


# ---- measurements ----

FLOAT = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def grab(pattern: str, text: str, what: str, n: int = 1):
    m = re.search(pattern, text)
    if not m:
        raise EWQError(f"could not find {what} in llama-perplexity's output")
    return tuple(float(m.group(i + 1)) for i in range(n)) if n > 1 else float(m.group(1))


def perplexity_flags() -> list:
    """llama-perplexity's extra flags on this CPU: --no-repack where the CPU reports AMX (the backend's amx_cpu, which
    makes EWQ's own llama.cpp executor skip the repacking for the same reason). This llama.cpp's AMX matrix kernel
    (the weights repacked for it, used for batches of tokens) dies with SIGILL at its first `tilezero` on this
    repository's 2-core Xeon VM, whose cpuid reports amx_tile/amx_int8 (every quantized file; BF16 and tg64 were
    unaffected); without the repacked layout the same product runs in the AVX-512 kernels."""
    from ewq.backends.llamacpp import amx_cpu

    return ["--no-repack"] if amx_cpu() else []


def perplexity_base(bin_dir: Path, bf16: Path, text: Path, base: Path, args) -> dict:
    start = time.perf_counter()
    p = run([bin_dir / "llama-perplexity", "-m", bf16, "-f", text, "--kl-divergence-base", base, "-c", args.ctx,
             "--chunks", args.chunks, "-t", max(args.threads), "-tb", max(args.threads), "--seed", 0,
             *args.perplexity_flags],
            "llama-perplexity --kl-divergence-base")
    out = p.stdout + p.stderr
    chunks = int(grab(r"over (\d+) chunks", out, "the chunk count"))
    if chunks != args.chunks:
        raise EWQError(f"llama-perplexity used {chunks} chunks, not {args.chunks}: the text slice is too short")
    system = re.search(r"system_info: (.*)", out)
    ppl, unc = grab(rf"Final estimate: PPL = {FLOAT} \+/- {FLOAT}", out, "the final PPL", 2)
    log(f"base logits of {bf16.name}: PPL {ppl:.4f} over {chunks} chunks of {args.ctx} ({time.perf_counter() - start:.0f} s)")
    return {"ppl": ppl, "ppl_unc": unc, "chunks": chunks, "system_info": system.group(1).strip() if system else None}


def perplexity_kld(bin_dir: Path, gguf: Path, base: Path, args) -> dict:
    start = time.perf_counter()
    p = run([bin_dir / "llama-perplexity", "-m", gguf, "--kl-divergence-base", base, "--kl-divergence",
             "-c", args.ctx, "--chunks", args.chunks, "-t", max(args.threads), "-tb", max(args.threads), "--seed", 0,
             *args.perplexity_flags], f"llama-perplexity --kl-divergence on {gguf.name}")
    out = p.stdout + p.stderr
    ppl, ppl_unc = grab(rf"Mean PPL\(Q\)\s*:\s*{FLOAT}\s*±\s*{FLOAT}", out, "Mean PPL(Q)", 2)
    kld, kld_unc = grab(rf"Mean\s+KLD:\s*{FLOAT}\s*±\s*{FLOAT}", out, "Mean KLD", 2)
    same, same_unc = grab(rf"Same top p:\s*{FLOAT}\s*±\s*{FLOAT}\s*%", out, "Same top p", 2)
    r = {"ppl": ppl, "ppl_unc": ppl_unc, "kld_mean": kld, "kld_mean_unc": kld_unc,
         "kld_median": grab(rf"Median\s+KLD:\s*{FLOAT}", out, "Median KLD"),
         "kld_p99": grab(rf"99\.0%\s+KLD:\s*{FLOAT}", out, "99.0% KLD"),
         "kld_max": grab(rf"Maximum KLD:\s*{FLOAT}", out, "Maximum KLD"),
         "same_top_pct": same, "same_top_pct_unc": same_unc, "ppl_s": round(time.perf_counter() - start, 1)}
    log(f"  {gguf.name}: KLD {kld:.5f}, same top {same:.2f}%, PPL {ppl:.4f} ({r['ppl_s']:.0f} s)")
    return r


def bench_tg(bin_dir: Path, gguf: Path, args) -> dict:
    """{threads: tok/s samples} of one llama-bench call (every thread count of --threads), and what it reported."""
    load = loadavg()
    p = run([bin_dir / "llama-bench", "-m", gguf, "-p", 0, "-n", args.n_gen, "-t", ",".join(map(str, args.threads)),
             "-r", args.repetitions, "-o", "json"], f"llama-bench on {gguf.name}")
    try:
        rows = [r for r in json.loads(p.stdout) if r.get("n_gen") == args.n_gen and r.get("n_prompt") == 0]
        samples = {t: next([float(x) for x in r["samples_ts"]] for r in rows if r.get("n_threads") == t)
                   for t in args.threads}
    except (ValueError, StopIteration, KeyError, TypeError):
        raise EWQError(f"llama-bench printed no tg{args.n_gen} result for {gguf.name} at threads "
                       f"{args.threads}") from None
    return {"samples": samples, "loadavg_1m": load, "build_commit": rows[0].get("build_commit"),
            "cpu_info": rows[0].get("cpu_info")}


# ---- the run ----

def markdown(rows: list, args) -> str:
    one = len(args.threads) == 1
    heads = [f"tg{args.n_gen} tok/s" + ("" if one else f" -t {t}") for t in args.threads]
    lines = [f"| file | MB | {' | '.join(heads)} | mean KLD | same-top | PPL |",
             "|---|---:|" + "---:|" * len(heads) + "---:|---:|---:|"]
    for r in rows:
        tg = [f"{s['tg_tok_s_median']:.1f} ± {s['tg_tok_s_sd']:.1f} (max {s['tg_tok_s_max']:.1f})" for s in r["speed"]]
        kld = f"{r['kld_mean']:.4f}".replace("-0.0000", "0.0000")  # the reference's self-check prints -0.000000
        lines.append(f"| {r['name']} | {r['file_bytes'] / 1e6:.1f} | {' | '.join(tg)} | {kld} | "
                     f"{r['same_top_pct']:.1f}% | {r['ppl']:.3f} |")
    return "\n".join(lines)


def ladder_markdown(rows: list, args) -> str:
    """Rung by rung: the preset, with an importance matrix, and EWQ's files at its size; KLD and tg medians as
    multiples of the importance-matrix preset's (the GGUFs people download for 4-5 bits are made with one)."""
    heads = [f"tg{args.n_gen} tok/s -t {t}" for t in args.threads]
    lines = [f"| rung | file | MB | bpw | mean KLD | × preset+imatrix | same top | {' | '.join(heads)} |",
             "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(heads)]
    for preset in dict.fromkeys(r["preset"] for r in rows if r.get("preset")):
        rung = [r for r in rows if r.get("preset") == preset]
        base = next((r for r in rung if r["kind"] == "preset+imatrix"), None)
        ref = base["kld_mean"] if base else None
        for r in rung:
            ratio = f"{r['kld_mean'] / ref:.2f}×" if ref and r["kind"] != "preset+imatrix" else ""
            # speed as a multiple of the importance-matrix preset's, measured in the same interleaved rounds
            tg = [f"{sp['tg_tok_s_median']:.1f}" + (f" ({sp['tg_tok_s_median'] / b['tg_tok_s_median']:.2f}×)"
                                                     if base and r is not base else "")
                  for sp, b in zip(r["speed"], base["speed"] if base else r["speed"])]
            lines.append(f"| {preset} | {r['kind']} | {r['file_bytes'] / 1e6:.1f} | {r['bpw']:.3f} | "
                         f"{r['kld_mean']:.4f} | {ratio} | {r['same_top_pct']:.1f}% | {' | '.join(tg)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = ArgumentParser(prog="python bench/llamacpp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "models" / "smollm2-135m"), help="Hugging Face checkpoint directory")
    p.add_argument("--out-dir", default=str(REPO / "benchmark_results" / "llamacpp"),
                   help="GGUF files, the text slice, the base logits and the JSON go here")
    p.add_argument("--threads", default="2", help="-t for llama-bench, or a comma list (1,2) measured side by side; "
                   "llama-perplexity and llama-quantize use the largest (default 2)")
    p.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks (default 8)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--n-gen", type=int, default=64, help="llama-bench -n (default 64: tg64)")
    p.add_argument("--repetitions", type=int, default=3, help="llama-bench -r (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="llama-bench calls per file, interleaved (default 2)")
    p.add_argument("--presets", default=",".join(PRESETS), help=f"llama-quantize presets (default {','.join(PRESETS)}; "
                   "empty for none); each also with an importance matrix and as EWQ files of its size")
    p.add_argument("--calib-text", default=None,
                   help="calibration text of EWQ's sweep and importance and of llama-imatrix (default gensim's "
                        "lee_background.cor; its end is used)")
    p.add_argument("--calib-tokens", type=int, default=512, help="calibration tokens (default 512, EWQ's default)")
    p.add_argument("--eval-text", default=None,
                   help="text KLD is measured on, a slice from its middle (default gensim's lee_background.cor); "
                        "refused when it overlaps the calibration text")
    p.add_argument("--no-imatrix", action="store_true",
                   help="no importance-matrix rows (neither llama-imatrix + llama-quantize --imatrix nor EWQ's)")
    p.add_argument("--no-ewq", action="store_true", help="no EWQ rows at the presets' sizes")
    p.add_argument("--ewq-formats", default=None, metavar="LIST",
                   help="the ggml types EWQ's rows choose from, comma-separated (python -m ewq.export gguf --formats; "
                        "default: its own menu, which leaves out Q4_1/Q5_1); the EWQ files are then named "
                        "...-ewq-<formats tag>-PRESET..., so they sit beside the default menu's in one --out-dir")
    p.add_argument("--ewq-speed", default="preset", metavar="preset|F|any",
                   help="python -m ewq.export gguf --speed: preset (default), EWQ's files also decode no slower than "
                        "the preset's by EWQ's kernel cost table; F, at least F x its speed; any: size is their only "
                        "limit (files named ...-ewq-any-PRESET... or ...-ewq-speedF-PRESET..., beside the default's)")
    p.add_argument("--ewq-decode-cost", default=None, metavar="FILE",
                   help="python -m ewq.export gguf --decode-cost: time EWQ's speed limit by this CPU's kernel costs "
                        "(bench/decode_cost.py's decode_cost.json) instead of the built-in table of this CPU's family (files named "
                        "...-ewq-dcXXXXXX-PRESET...)")
    p.add_argument("--ewq-gptq", action="store_true",
                   help="one more EWQ row per rung: the importance plan's file rounded with error feedback "
                        "(python -m ewq.export gguf ... --rounding gptq); llama-imatrix then calibrates on the same "
                        "--gptq-tokens tokens")
    p.add_argument("--gptq-tokens", type=int, default=12288,
                   help="--ewq-gptq: calibration tokens of the GPTQ rounding (default 12288, ewq.gptq's)")
    p.add_argument("--reuse", action="store_true",
                   help="measure the files an earlier run of the same command left in --out-dir as they are (the "
                        "reference, the importance matrix, presets, EWQ files; each reuse is printed), e.g. after an "
                        "interrupted run; without it every file is made again")
    p.add_argument("--gguf", nargs="+", default=[], metavar="FILE", help="more GGUF files, measured as they are")
    p.add_argument("--plans", nargs="+", default=[], metavar="PLAN",
                   help="EWQ plans, each exported with python -m ewq.export gguf")
    p.add_argument("--llama-bin", default=None, help="use llama.cpp binaries already built in DIR")
    p.add_argument("--sdist", default=None, help=f"the llama-cpp-python {VERSION} sdist (else downloaded with pip)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where the tools are built")
    p.add_argument("--keep-logits", action="store_true", help="keep the reference's logits file (about 200 MB)")
    p.add_argument("--reference-type", default="BF16", choices=("BF16", "F16", "F32"),
                   help="type of the reference file the presets are quantized from and KLD is measured against "
                        "(default BF16, llama.cpp's usual; F16 is lossless for an fp16 checkpoint)")
    return p.parse_args(argv)


def check_args(args) -> tuple[Path, list, list, list]:
    """(model, presets, --gguf files, --plans), every flag checked before anything is built or written; turns
    args.threads into a list of thread counts."""
    model = Path(args.model).resolve()
    if not (model / "config.json").is_file():
        raise EWQError(f"--model {model} is not a Hugging Face checkpoint directory (no config.json)")
    try:
        args.threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        raise EWQError(f"--threads takes a number or a comma list of numbers, got {args.threads!r}") from None
    if not args.threads or len(set(args.threads)) != len(args.threads):
        raise EWQError("--threads needs distinct thread counts")
    if min(*args.threads, args.chunks, args.n_gen, args.repetitions, args.rounds) < 1 or args.ctx < 8:
        raise EWQError("--threads, --chunks, --n-gen, --repetitions, --rounds must be positive and --ctx at least 8")
    presets = [s.strip().upper() for s in args.presets.split(",") if s.strip()]
    from ewq.presets import preset_ftype

    for preset in presets:
        preset_ftype(preset)  # an unknown name is one line before anything is built
    from ewq.backends.llamacpp import check_speed, decode_cost_table, parse_formats  # here: it imports torch

    if args.ewq_formats is not None:
        args.ewq_formats = list(parse_formats(args.ewq_formats, "--ewq-formats"))
    args.ewq_speed = check_speed(args.ewq_speed)
    if args.ewq_decode_cost is not None:
        if args.ewq_speed == "any":
            raise EWQError("--ewq-decode-cost times EWQ's files against the presets': drop --ewq-speed any")
        decode_cost_table(args.ewq_decode_cost)  # an unreadable table is one line before anything is built
    if args.calib_tokens < 2:
        raise EWQError(f"--calib-tokens must be at least 2, got {args.calib_tokens}")
    for flag, f in (("--calib-text", args.calib_text), ("--eval-text", args.eval_text)):
        if f is not None and not Path(f).is_file():
            raise EWQError(f"{flag} {f} does not exist")
    extra = [Path(f).resolve() for f in args.gguf]
    for f in extra:
        if not f.is_file():
            raise EWQError(f"--gguf {f} does not exist")
    plans = [Path(f).resolve() for f in args.plans]
    for f in plans:
        if not f.is_file():
            raise EWQError(f"--plans {f} does not exist")
    if plans:
        import importlib.util

        if importlib.util.find_spec("ewq.export") is None:
            raise EWQError("--plans needs `python -m ewq.export gguf`, which this checkout does not have yet; "
                           "export the plans yourself and pass them with --gguf")
    return model, presets, extra, plans


def cpu_flags(cpu: dict) -> str:
    return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())


def ladder_rows(name: str, presets: list, args, plain_refused=()) -> list:
    """The ladder's rows, rung by rung: (file name, kind, preset); kinds preset, preset+imatrix, ewq, ewq+imatrix
    (and ewq+imatrix+gptq with --ewq-gptq).
    plain_refused: presets llama-quantize will not make without an importance matrix (IQ3_XXS, IQ2_*): no "preset"
    row for them."""
    kinds = [k for k in ("preset", "preset+imatrix", "ewq", "ewq+imatrix") + (("ewq+imatrix+gptq",) if args.ewq_gptq else ())
             if not (args.no_imatrix and "imatrix" in k) and not (args.no_ewq and k.startswith("ewq"))]
    suffix = {"preset+imatrix": "-imatrix", "ewq+imatrix": "-imatrix", "ewq+imatrix+gptq": f"-imatrix-gptq{args.gptq_tokens}"}
    return [(f"{name}-{ewq_tag(args) if k.startswith('ewq') else ''}{p}{suffix.get(k, '')}.gguf",
             k, p) for p in presets for k in kinds if not (k == "preset" and p in plain_refused)]


def plain_refused(model: Path, presets: list, reference_type: str) -> list:
    """The presets whose file without --imatrix has tensors llama-quantize refuses to write so (said once)."""
    from ewq.presets import model_shape, needs_imatrix

    shape = model_shape(model, reference_type)
    refused = [p for p in presets if needs_imatrix(shape, preset_size(model, p, False, reference_type, shape=shape).types)]
    if refused:
        log(f"no plain row for {', '.join(refused)}: llama-quantize requires an importance matrix for their types")
    return refused


def rounding_tag() -> str:
    """'r<6 hex>-' of how EWQ's sweep rounds for llama.cpp (the backend's record of its weight emulation and of the
    activations' rounding, which also keys its sweep caches): files made by an EWQ whose sweep rounded otherwise are
    named apart, so --reuse never measures an earlier version's file as this one's."""
    from ewq.backends import QuantSettings, get_backend

    record = get_backend("llama.cpp").formats(QuantSettings(backend="llama.cpp", imatrix="none"))
    what = json.dumps({k: record.get(k) for k in ("emulation", "activations")}, sort_keys=True)
    return f"r{hashlib.sha256(what.encode()).hexdigest()[:6]}-"


def ewq_tag(args) -> str:
    """'ewq-' and the rounding_tag for the default menu and speed limit, with '<6 hex of the --ewq-formats list>-'
    for another menu and 'any-' without the speed limit, 'dc<6 hex of the file>-' timed by an --ewq-decode-cost table:
    files of different settings, or of another sweep, never share a name (nor does --reuse take one for the other)."""
    menu = f"{hashlib.sha256(','.join(args.ewq_formats).encode()).hexdigest()[:6]}-" if args.ewq_formats else ""
    speed = "" if args.ewq_speed == "preset" else "any-" if args.ewq_speed == "any" else f"speed{args.ewq_speed:g}-"
    table = f"dc{hashlib.sha256(Path(args.ewq_decode_cost).read_bytes()).hexdigest()[:6]}-" \
        if args.ewq_decode_cost else ""
    return f"ewq-{rounding_tag()}{menu}{speed}{table}"


def row_names(name: str, reference_type: str, presets: list, extra: list, plans: list, args) -> list:
    """The rows' file names, the reference first; two rows may not share one."""
    names = [f"{name}-{reference_type}.gguf", *(n for n, _, _ in ladder_rows(name, presets, args)),
             *(f.name for f in extra), *(f"{name}-plan-{p.stem}.gguf" for p in plans)]
    if len(set(names)) != len(names):
        raise EWQError(f"two rows would have the same file name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                       "rename the --gguf files or plans")
    return names


def make_files(args, model: Path, out_dir: Path, reference: str, presets: list, extra: list, plans: list,
               calib_file: Path) -> tuple:
    """(reference file, rows, bin_dir, tools, imatrix file): what EWQ writes first (a bad plan or flag fails before
    minutes of building), then the tools, llama-imatrix's importance matrix and the presets."""
    name = model.name
    bf16 = export_reference(model, out_dir / reference, args.reference_type, args)
    planned = [{"name": f"{name}-plan-{plan.stem}.gguf", "kind": "plan", "plan": str(plan),
                "file": export_plan(plan, model, out_dir / f"{name}-plan-{plan.stem}.gguf")} for plan in plans]
    ladder = ladder_rows(name, presets, args, plain_refused(model, presets, args.reference_type))
    ewq = {file: export_target(model, preset, out_dir / file, out_dir / "plans", args, "imatrix" in kind, "gptq" in kind)
           for file, kind, preset in ladder if kind.startswith("ewq")}
    bin_dir, tools = build_tools(args)
    threads = max(args.threads)
    imatrix = None if args.no_imatrix else make_imatrix(bin_dir, bf16, calib_file, out_dir / f"{name}.imatrix.gguf",
                                                        threads, args)
    rows = [{"name": bf16.name, "kind": "reference", "file": bf16}]
    for file, kind, preset in ladder:
        made = ewq[file] if kind.startswith("ewq") else \
            {"file": quantize(bin_dir, bf16, out_dir / file, preset, threads, imatrix if kind.endswith("imatrix") else None,
                              args)}
        if not kind.startswith("ewq"):  # what ewq.presets computes for it, without llama.cpp (--target's figure)
            made["computed_file_bytes"] = preset_size(model, preset, kind.endswith("imatrix"),
                                                      args.reference_type).file_bytes
            log(f"  ewq.presets computes {made['computed_file_bytes']} bytes for it; the file has "
                f"{made['file'].stat().st_size}")
        rows.append({"name": file, "kind": kind, "preset": preset, **made})
    rows += [{"name": f.name, "kind": "gguf", "file": f} for f in extra] + planned
    return bf16, rows, bin_dir, tools, imatrix


def measure_quality(rows: list, bin_dir: Path, bf16: Path, text: dict, model: Path, out_dir: Path, args) -> dict:
    """The base perplexity: deterministic, once per file; each row gets its KLD, same-top and PPL."""
    base_logits = out_dir / f"{model.name}-{args.reference_type}.kld-base.bin"
    base = perplexity_base(bin_dir, bf16, Path(text["file"]), base_logits, args)
    for r in rows:
        r.update(perplexity_kld(bin_dir, r["file"], base_logits, args))
    if not args.keep_logits:
        base_logits.unlink(missing_ok=True)
    return base


def texts(args, model: Path, out_dir: Path) -> tuple[dict, dict]:
    """(calibration, evaluation) texts, checked not to overlap before anything is written, then written to out_dir."""
    # llama-imatrix gets as much text as any EWQ row calibrates on: GPTQ's tokens too with --ewq-gptq (it
    # includes the sweep's, which are its end); the evaluation text is checked against all of it
    calib = calibration_slice(args.calib_text, model, max(args.calib_tokens, args.gptq_tokens if args.ewq_gptq else 0))
    corpus = corpus_path(args.eval_text)
    text, piece = text_slice(corpus, model, args.chunks * args.ctx)
    calib_text = calib.pop("text")
    check_overlap(calib_text, piece.decode("utf-8", "replace"), corpus.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib_file, text["file"] = out_dir / "calibration.txt", str(out_dir / f"{corpus.stem}.middle.txt")
    calib_file.write_text(calib_text, encoding="utf-8")
    calib["file"] = str(calib_file)
    Path(text["file"]).write_bytes(piece)
    log(f"calibration: the last {calib['tokens']} tokens of {calib['corpus']} -> {calib_file}")
    log(f"evaluation text: {text['corpus']} bytes [{text['start_byte']}, {text['end_byte']}) of {text['corpus_bytes']} "
        f"({text['tokens']} tokens; sha256 {text['sha256'][:16]}) -> {text['file']}")
    return calib, text


def measure_speed(rows: list, bin_dir: Path, args) -> dict:
    """tg tok/s in interleaved rounds (reverse order on odd ones); each row gets its statistics per thread count,
    the load averages and its bytes. Returns llama-bench's build facts."""
    samples = {r["name"]: {t: [] for t in args.threads} for r in rows}
    loads = {r["name"]: [] for r in rows}
    build = {}
    for k in range(args.rounds):
        for r in (rows if k % 2 == 0 else rows[::-1]):
            b = bench_tg(bin_dir, r["file"], args)
            for t, s in b["samples"].items():
                samples[r["name"]][t] += s
            loads[r["name"]].append(b["loadavg_1m"])
            build = {"build_commit": b["build_commit"], "cpu_info": b["cpu_info"]}
            log(f"  round {k + 1}: {r['name']}: tg{args.n_gen} "
                + ", ".join(f"{statistics.median(s):.1f} tok/s at -t {t}" for t, s in b["samples"].items())
                + f" (load {b['loadavg_1m']})")
    for r in rows:
        speed = []
        for t, s in samples[r["name"]].items():
            speed.append({"threads": t, "tg_tok_s_median": statistics.median(s), "tg_tok_s_mean": statistics.fmean(s),
                          "tg_tok_s_sd": statistics.stdev(s) if len(s) > 1 else 0.0, "tg_tok_s_min": min(s),
                          "tg_tok_s_max": max(s), "tg_tok_s_samples": s})
        # the first --threads count also flat on the row, for readers that want one number
        r.update({**{k: v for k, v in speed[0].items() if k != "tg_tok_s_samples"}, "speed": speed,
                  "loadavg_1m_before": loads[r["name"]], "file_bytes": r["file"].stat().st_size,
                  "bpw": file_stats(r["file"])["bpw"],
                  "tensor_bytes_by_type": file_bytes_by_type(r["file"]), "file": str(r["file"])})
    return build


def summary(rows: list, args, model: Path, cpu: dict, tools: dict, build: dict, base: dict, text: dict,
            bf16: Path, busy: list) -> dict:
    """The JSON's content (schema_version 1)."""
    from ewq.backends.llamacpp import decode_cost_table  # the built-in table EWQ's files were timed by, on this CPU

    return {
        "schema_version": SCHEMA_VERSION, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": str(model), "cpu": cpu, "llama_cpp": {**tools, **build, "version": f"llama-cpp-python {VERSION} (vendored)",
                                                        "system_info": base["system_info"]},
        "settings": {"threads": args.threads, "perplexity_threads": max(args.threads), "n_gen": args.n_gen, "repetitions": args.repetitions,
                     "rounds": args.rounds, "ctx": args.ctx, "chunks": args.chunks,
                     "scored_tokens": args.chunks * (args.ctx - 1 - args.ctx // 2), "kld_reference": bf16.name,
                     "kld_units": "nats", "mb": "1e6 bytes",
                     "ewq_formats": args.ewq_formats or "default menu", "ewq_speed": args.ewq_speed,
                     "ewq_decode_cost": args.ewq_decode_cost or decode_cost_table()["source"],
                     "perplexity_flags": getattr(args, "perplexity_flags", [])},
        "text": text, "base_ppl": base["ppl"], "base_ppl_unc": base["ppl_unc"], "rows": rows,
        "contended": bool(busy),
    }


def report(rows: list, args, result: dict, cpu: dict, tools: dict, build: dict, bf16: Path, text: dict, busy: list,
           out: Path) -> None:
    """The markdown table, how it was measured, a warning when other processes competed, where the JSON is."""
    print()
    print(markdown(rows, args))
    print()
    if any(r.get("preset") for r in rows):
        print(ladder_markdown(rows, args))
        print()
        print(f"importance: llama-imatrix and EWQ on the last {result['calibration']['tokens']} tokens of "
              f"{result['calibration']['corpus']}; EWQ rows: python -m ewq.export gguf --model M --target PRESET "
              f"--out F [--no-imatrix], each no larger than the preset's file as computed by ewq.presets")
    print(f"CPU: {cpu['model_name']} ({cpu['logical_cpus']} logical CPUs); flags: " + cpu_flags(cpu)
          + f"; llama.cpp {build.get('build_commit', '?')} ({tools['source']}: {tools['bin_dir']})")
    print(f"threads {','.join(map(str, args.threads))}; tg{args.n_gen}: median of {args.rounds} x {args.repetitions} llama-bench samples "
          f"± sd (max: the best sample, the least disturbed by other processes); KLD vs {bf16.name} on {args.chunks} x {args.ctx} tokens of {text['corpus']} bytes "
          f"[{text['start_byte']}, {text['end_byte']}) ({result['settings']['scored_tokens']} scored)")
    if busy:
        print(f"warning: the 1-minute load average was above the {cpu['logical_cpus']} CPUs before "
              f"{len(busy)} of the llama-bench calls (max {max(busy)}): other processes competed and the tok/s are "
              f"low and noisy; rerun on a quiet machine")
    print(f"wrote {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    model, presets, extra, plans = check_args(args)
    out_dir = Path(args.out_dir).resolve()
    names = row_names(model.name, args.reference_type, presets, extra, plans, args)
    calib, text = texts(args, model, out_dir)
    cpu = cpu_info()
    log(f"CPU: {cpu['model_name']}, {cpu['logical_cpus']} logical CPUs; " + cpu_flags(cpu))
    args.perplexity_flags = perplexity_flags()
    if args.perplexity_flags:
        log(f"llama-perplexity {' '.join(args.perplexity_flags)}: this CPU has AMX, whose kernel in this llama.cpp "
            f"dies with SIGILL in batched products (bench/llamacpp.py, perplexity_flags)")

    bf16, rows, bin_dir, tools, imatrix = make_files(args, model, out_dir, names[0], presets, extra, plans,
                                                     Path(calib["file"]))
    base = measure_quality(rows, bin_dir, bf16, text, model, out_dir, args)
    build = measure_speed(rows, bin_dir, args)

    busy = [x for r in rows for x in r["loadavg_1m_before"] if x is not None and x > (cpu["logical_cpus"] or 1)]
    result = summary(rows, args, model, cpu, tools, build, base, text, bf16, busy)
    result.update(calibration=calib, imatrix=str(imatrix) if imatrix else None)
    for r in rows:
        r["file"] = str(r["file"])
    out = write_json_atomic(out_dir / f"llamacpp_{model.name}.json", result)
    report(rows, args, result, cpu, tools, build, bf16, text, busy, out)
    return 0

if __name__ == "__main__":
    sys.exit(run_cli(main))
