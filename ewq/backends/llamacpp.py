"""llama.cpp as an optional executor: a GGUF file run by llama.cpp (through llama-cpp-python's ctypes binding of
the C API), behind the small part of a transformers causal LM that EWQ's decoder suite uses, so the same code
(generate.generate_exact / run_suite, quality.compute_reference / evaluate) times and scores it like the torch rows.

    model = LlamaCppModel("m.gguf")                     # threads: torch.get_num_threads(), as the torch rows
    model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, streamer=s, ...)  # [1, n + N]
    model(windows).logits                               # [b, n, vocab] float32, every position

What it is, exactly
  * generate: greedy, the argmax of llama.cpp's float32 logits (numpy, first index on ties, as torch.argmax);
    no sampler, no seed, nothing random. min_new_tokens works as in transformers (its MinNewTokensLength
    processor): the EOS ids of `generation_config` are masked out of the argmax until that many tokens exist, so
    with min_new_tokens = max_new_tokens (generate_exact) exactly N tokens come and EOS never wins; past
    min_new_tokens an EOS ends the generation, as transformers does for one sequence. The streamer gets the prompt
    ids first, then each new token the moment it exists (generate_exact's first-token clock is the 2nd put), then
    end(). One sequence (batch 1); the KV cache is cleared at the start of every call. Like transformers, no
    forward pass runs after the last token is chosen: N tokens cost one prefill and N-1 one-token decodes.
  * __call__: every row of the batch is its own sequence, evaluated alone from an empty cache (rows are
    independent, as in a transformers forward without padding) in pieces of n_batch tokens, with logits at
    every position; padding (an attention_mask with zeros) is refused.
  * Threads n_threads for both prompt and decode; flash attention and the rest are llama.cpp's defaults (as
    llama-bench uses them), but for the weights' repacking, off on CPUs with AMX (amx_cpu: llama.cpp's AMX kernel
    crashes there; config.weights_repacked says which); the model is memory-mapped (its pages count in the process's RSS once read).
    llama.cpp's threads meet at a barrier after every op: with more runnable processes than cores, 2 threads were
    seen 5-20x slower than 1, so time it on idle cores, or compare at n_threads=1 too.
  * Cost over llama.cpp itself: ~70-80 us per token outside llama_decode (logits view, numpy argmax over the
    vocabulary, the streamer's tensor; mostly cache misses right after a decode) and ~0.5 ms per call; decode
    tok/s through it matched llama-bench tg64 on the same file within noise (SmolLM2-135M Q8_0, 1 thread: 95.2
    vs 95.4 tok/s).
  * CPU only. `.to("cuda")` is refused: this executor does not offload layers (even where the installed
    llama-cpp-python could), so its rows stay CPU rows.

llama-cpp-python is NOT in requirements.txt: `require()` tells how to install it (one EWQError line) and this
module imports without it. Tested with llama-cpp-python 0.3.36 (llama.cpp vendored in its sdist).

The same module is the executor's face to the rest of EWQ (ewq/backends' interface): a plan for llama.cpp names
ggml types (Q8_0, Q6_K, Q5_K, Q4_K, Q5_0, Q4_0, ...); a torch-menu plan's 8-bit and 4-bit run as Q8_0 and Q4_0 (the
closest formats: symmetric, blocks of 32). For sensitivity sweeps and plan checks its layers are emulated in torch,
bit for bit (ewq.ggml_quants): an nn.Linear whose weight is the format's round trip. For a benchmark the plan is
written as a GGUF (ewq.export) and run here (`build_model`).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..common import EWQError
from ..ggml_types import LLAMA_CPP_PYTHON_VERSION, NEEDS_IMPORTANCE
from . import as_linear

# measured: `pip wheel` of the sdist with -DGGML_NATIVE=ON took 7.5 CPU-minutes (7m02s user + 0m30s sys), 19.6 min
# wall on a 2-core machine shared with other jobs (load average ~10); llama-cpp-python 0.3.36, gcc 12, ninja
BUILD_TIME = "about 5-20 minutes on 2 CPU cores"
INSTALL = (f'pip download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} -d /tmp/llama && '
           f'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -v /tmp/llama/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz')
DEFAULT_N_CTX = 2048
DEFAULT_N_BATCH = 512
TOKEN_NULL = -1  # LLAMA_TOKEN_NULL

_backend_ready = False

# the sweep's menu, the whole ladder from 8.5 down to 2.625 bits per weight (each offered only to matrices whose rows
# are whole blocks of it: IQ4_NL and the legacy types blocks of 32, the k-quants and IQ4_XS 256), and FLOAT_MINIMUM
# (Q5_1/Q4_1, a float minimum per 32), which a sensitivity plan measures too unless the checkpoint's weights sit on
# a Q4_1 grid (ewq.analysis.on_q4_1_grid: it went through GGUF Q4_1, as the embedded SmolLM2 did), where they re-find
# it and would look falsely lossless.
PRECISIONS = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_0", "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K")
FLOAT_MINIMUM = ("Q5_1", "Q4_1")
TORCH_MENU_AS = {"8-bit": "Q8_0", "4-bit": "Q4_0"}
# the 3-bit i-quants (3.06 / 3.44 bits per weight, rows of whole 256-blocks): their grid searches make them the
# slowest to emulate (~5 us per weight on one core, 4x IQ4_XS, 20x Q3_K), so a sweep measures them only when asked
# (--formats) or when the --target preset itself uses them
IQ3 = ("IQ3_XXS", "IQ3_S")
# IQ2_XS (2.31 bits per weight, rows of whole 256-blocks), rounded only with an importance matrix and the slowest to
# emulate (~7 us per weight): measured only when asked, or when the --target preset is an IQ2/IQ1 one
IQ2 = ("IQ2_XS",)
# what a plan for this executor may name: every ggml type the exporter writes, and the torch menu's two
ACCEPTS = PRECISIONS + FLOAT_MINIMUM + IQ3 + IQ2 + tuple(TORCH_MENU_AS)
# Relative time per weight of llama.cpp's CPU matrix-vector kernels, each format's own (Q4_0 = 1): the decode time
# of a token is about the summed weights x this of their formats. From tg64 of one-type files (llama-quantize --pure)
# of a random 1.1B-shaped llama, medians at 1 and 2 threads averaged, on this repository's 2-core AVX2 EPYC (python
# bench/decode_cost.py; docs/RESULTS.md, "Decode cost per format"). Other CPUs order the formats differently
# (AVX-512, ARM, GPUs): re-measure there. F16/BF16: a plan's "raw" matrices.
DECODE_COST = {"BF16": 2.95, "F16": 2.93, "Q8_0": 1.86, "Q6_K": 1.47, "Q5_K": 1.40, "Q4_K": 1.09, "Q5_0": 1.65,
               "Q4_0": 1.0, "Q5_1": 1.79, "Q4_1": 1.46, "IQ4_NL": 0.96, "IQ4_XS": 1.32, "Q3_K": 1.18, "Q2_K": 0.76,
               # a later run beside Q4_0 (docs/results/decode_cost/decode_cost_iq3.json): the 3-bit i-quants'
               # grid lookups make them the slowest quantized formats on this CPU
               "IQ3_XXS": 2.21, "IQ3_S": 2.63,
               # decode_cost_iq2.json (IQ2_XS 1.80; IQ3_XXS measured 2.36 beside it)
               "IQ2_XS": 1.80}
# The same, measured the same way on a 2-core Xeon VM with AVX-512 VNNI and AMX (docs/results/decode_cost/
# decode_cost_xeon_avx512.json, round 11): Q4_0/Q4_1 run llama.cpp's repacked AVX-512 kernels there while Q5_0/Q5_1
# and IQ4_NL have none, so the order differs from the AVX2 one (Q5_0 4.6x Q4_0, not 1.65x). Planned by the AVX2
# table, that CPU's files decoded at 0.46-0.88x the presets' speed; by this one, 0.98-1.29x.
DECODE_COST_AVX512_AMX = {"BF16": 5.1482, "F16": 4.0627, "Q8_0": 2.0008, "Q6_K": 3.0689, "Q5_K": 2.9901,
                          "Q4_K": 1.8117, "Q5_0": 4.5864, "Q4_0": 1.0, "Q5_1": 4.3236, "Q4_1": 1.1306,
                          "IQ4_NL": 2.7994, "IQ4_XS": 2.0646, "Q3_K": 2.2212, "Q2_K": 1.4683, "IQ3_XXS": 3.997,
                          "IQ3_S": 4.3592, "IQ2_XS": 2.6885}
# which built-in table times a plan made on this CPU: the kernels llama.cpp picks follow these flags (AMX-capable
# Xeons also take AMX's AVX-512 VNNI layouts); a CPU matching neither is timed by the AVX2 table, with a warning
BUILTIN_DECODE_COST = {
    "avx512_amx": ({"avx512f", "avx512_vnni", "amx_int8"}, DECODE_COST_AVX512_AMX,
                   "Intel Xeon, AVX-512 VNNI + AMX (ewq.backends.llamacpp.DECODE_COST_AVX512_AMX)"),
    "avx2": ({"avx2"}, DECODE_COST, "AMD EPYC, AVX2 (ewq.backends.llamacpp.DECODE_COST)"),
}
# --speed, a plan sized by a llama-quantize preset: "preset", also no slower to decode than the preset's file (by
# DECODE_COST); a number F, at least F x the preset's speed (0.95: up to 1/0.95 of its decode time); "any", the
# size is the only limit
SPEEDS = ("preset", "any")
# the attribute a float layer carries its importance in while the sweep quantizes it (ewq.sensitivity sets it)
IMPORTANCE_ATTR = "ewq_importance"
COMPILES = False
COMPILE_NOTE = "llama.cpp runs its own kernels; nothing to compile in torch"
SAVE_METHOD = None


def ggml_type(precision: str) -> str:
    return TORCH_MENU_AS.get(precision, precision)


def check_speed(speed) -> str | float:
    """--speed as a plan records it: "preset", "any", or the fraction F of the preset's speed the file must reach."""
    text = str(speed).strip().lower()
    if text in SPEEDS:
        return text
    try:
        fraction = float(text)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction <= 4:
        raise EWQError(f"--speed takes preset, any, or the fraction of the preset's decode speed the file must reach "
                       f"(0.95: at least 0.95x its tokens/s), got {speed!r}")
    return "preset" if fraction == 1 else fraction


def builtin_family(flags) -> str | None:
    """The BUILTIN_DECODE_COST family a CPU with these /proc/cpuinfo flags belongs to; None for one we have not
    measured (AVX-512 without AMX, ARM, ...)."""
    for family, (needs, _, _) in BUILTIN_DECODE_COST.items():
        if needs <= set(flags) and (family != "avx2" or "avx512f" not in flags):
            return family
    return None


def decode_cost_table(path=None) -> dict:
    """{"table": {ggml type: time per weight relative to Q4_0}, "source": where it was measured}: the built-in table of
    this CPU's family (BUILTIN_DECODE_COST; the AVX2 one for a CPU of no measured family), or the table
    bench/decode_cost.py measured on the CPU the file will run on (its decode_cost.json: each format's
    cost_vs_q4_0_mean), for --decode-cost FILE. A table lacking a type the plan or its preset needs is refused when
    the plan is timed (planning.llamacpp_decode_limit)."""
    if path is None:
        from ..probes import cpu_info

        _, table, where = BUILTIN_DECODE_COST[builtin_family(cpu_info()[1]) or "avx2"]
        return {"table": dict(table), "source": f"{BUILTIN_SOURCE}: {where}"}
    import json

    path = Path(path)
    fix = "give the decode_cost.json that bench/decode_cost.py writes"
    try:
        measured = json.loads(path.read_text())
        rows = measured["formats"]
        table = {r["format"]: float(r["cost_vs_q4_0_mean"]) for r in rows if r.get("cost_vs_q4_0_mean") is not None}
    except FileNotFoundError:
        raise EWQError(f"--decode-cost {path}: no such file; {fix}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise EWQError(f"--decode-cost {path} is not a decode cost table; {fix}") from None
    if measured.get("schema_version") != 1 or table.get("Q4_0") != 1.0 or not all(v > 0 for v in table.values()):
        raise EWQError(f"--decode-cost {path} is not a decode cost table measured against Q4_0 (schema_version 1, "
                       f"Q4_0 = 1); {fix} (with Q4_0 among its --formats)")
    cpu = measured.get("cpu") or {}
    flags = ", ".join(f for f, on in (cpu.get("flags") or {}).items() if on)
    return {"table": {k: round(v, 4) for k, v in sorted(table.items())},
            "source": f"measured: {cpu.get('model_name', 'unknown CPU')}{f' ({flags})' if flags else ''}"}


BUILTIN_SOURCE = "built-in"  # how a table's "source" starts when EWQ chose it, not the user's --decode-cost


def is_builtin(costs: dict | None) -> bool:
    """Whether a plan's kernel cost table (decode_cost_table's record; none in plans older than the record) is one of
    EWQ's built-in tables rather than one measured on the user's CPU: a built-in table lacking a type lifts the speed
    limit, a measured one is refused; only a built-in one earns builtin_table_warning."""
    return str((costs or {}).get("source", BUILTIN_SOURCE)).startswith(BUILTIN_SOURCE)


def checked_decode_cost(path, preset, speed) -> dict | None:
    """The kernel cost table a plan is timed by, as it records it (decode_cost_table: --decode-cost FILE, or without it
    this CPU's built-in one); None where no speed limit applies (no --target PRESET, or --speed any). --decode-cost
    there is refused in one line, before any checkpoint is read."""
    if preset is None or check_speed(speed) == "any":
        if path is not None:
            raise EWQError("--decode-cost times the file against its preset's: it needs --target PRESET and a --speed "
                           "other than any")
        return None
    return decode_cost_table(path)


def builtin_table_warning() -> str | None:
    """A line for a plan timed by a built-in table on a CPU of no family we measured (BUILTIN_DECODE_COST): the AVX2
    table then stands in, and on an AVX-512 CPU it can be far off (docs/RESULTS.md, round 11: 0.46x the preset's
    speed). None on an AVX2-only or an AVX-512 + AMX x86 CPU."""
    from ..probes import cpu_info

    name, flags = cpu_info()
    if builtin_family(flags) is not None:
        return None
    why = "has AVX-512 but no AMX" if "avx512f" in flags else "is not an AVX2 x86 CPU"
    return (f"note: the speed limit used the built-in kernel costs of an AVX2 CPU; this CPU ({name or 'unknown'}) "
            f"{why}, where llama.cpp's formats can order otherwise: measure its own with python bench/decode_cost.py "
            f"(~15 minutes) and plan again with --decode-cost DIR/decode_cost.json")


def raw_type(ckpt) -> str:
    """The lossless 16-bit type a plan's "raw" matrices are written in (F16 for fp16 weights, BF16 otherwise)."""
    dtypes = {t.dtype for b in ckpt.blocks for t in b.matrices}
    return "F16" if dtypes == {"F16"} else "BF16"


def check(settings, dtype, device: str) -> None:
    if device != "cpu":
        raise EWQError("the llama.cpp emulation runs on the CPU here; pass --device cpu")


def cannot_save(precisions, device: str):
    return "a llama.cpp plan is saved as a GGUF file: python -m ewq.export gguf --plan PLAN --model M --out OUT.gguf"


def unsupported(shape, precision: str, settings):
    from ..ggml_quants import can_quantize

    if not can_quantize(tuple(shape), ggml_type(precision)):
        return f"rows of {shape[1]} are not whole {ggml_type(precision)} blocks"
    return None


def round_trip(weight: torch.Tensor, precision: str, settings=None, importance=None) -> torch.Tensor:
    """The weight after one trip through the ggml format (float32), exactly as llama-quantize writes it (with
    --imatrix when `importance`, float [cols], is given)."""
    from ..ggml_quants import quantize_dequantize

    return quantize_dequantize(weight.detach().float().cpu(), ggml_type(precision), importance=importance)


def round_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A product's input as llama.cpp's CPU kernels round it for a matrix of this format (Q8_0 / Q8_1 per 32 values,
    Q8_K per 256 for the k- and i-quants: ewq.ggml_quants.round_activations), in x's dtype."""
    from ..ggml_quants import round_activations

    return round_activations(x, ggml_type(precision))


class GgmlLinear(torch.nn.Linear):
    """A matrix as llama.cpp's CPU kernels multiply by it: the weight after the format's round trip, and every input
    rounded first to the type the format's dot products take (round_input). Without the second, a sweep misses what
    llama.cpp adds: on SmolLM2 most of a Q8_0 file's KLD, and a k-quant down_proj's input rounding costs more than
    its weights' (docs/RESULTS.md, round 13)."""

    def __init__(self, lin: torch.nn.Linear, precision: str):
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        self.weight, self.bias, self.precision = lin.weight, lin.bias, precision

    def forward(self, x):
        return super().forward(round_input(x, self.precision))


def quantize_layer(module, precision: str, settings, dtype, device: str = "cpu"):
    """The layer as llama.cpp computes it (GgmlLinear): the format's round trip as its weight, rounded with the
    importance the layer carries (IMPORTANCE_ATTR), if any, as the file will be; its input rounded per call."""
    lin = as_linear(module, torch.float32, "cpu")
    lin.weight.data = round_trip(lin.weight.data, precision, importance=getattr(module, IMPORTANCE_ATTR, None)).to(dtype)
    if lin.bias is not None:
        lin.bias.data = lin.bias.data.to(dtype)
    return GgmlLinear(lin, ggml_type(precision)).to(device)


def state_bytes(module) -> int:
    return 0


def dequantize(module):
    return module.weight.float()  # the layer holds the format's round trip already (its input rounding: round_input)


LAYER_DTYPE = torch.float32  # the emulation is exact in float32; rounding it to bf16 would add its own error


def menu(settings) -> tuple:
    """The formats a sweep measures and a plan chooses from: --formats, else PRECISIONS. A format rounded only with
    an importance matrix (IQ2_XS) is refused for a plan rounded without one (--no-imatrix)."""
    chosen = checked_formats(tuple(getattr(settings, "formats", ()) or ()) or PRECISIONS)
    plain = [f for f in chosen if f in NEEDS_IMPORTANCE]
    if plain and (getattr(settings, "imatrix", "none") or "none") == "none":
        raise EWQError(f"{', '.join(plain)} is rounded only with an importance matrix (ggml refuses without one, as "
                       f"llama-quantize does); drop --no-imatrix, or {', '.join(plain)} from --formats")
    return chosen


def preset_formats(preset, weighted: bool = True) -> tuple:
    """The menu for a plan sized by a preset when --formats is not given: () (PRECISIONS) unless the preset is one
    of the i-quant presets below 4 bits, whose own mix has these types: IQ3_* presets add IQ3_XXS / IQ3_S, IQ2_* and
    IQ1_* presets IQ2_XS too (rounded with importance: `weighted`), so EWQ may choose what the preset it is compared
    with uses."""
    from ..presets import preset_ftype

    ftype = "" if preset is None else preset_ftype(preset)
    if any(f"_IQ{n}_" in ftype for n in (1, 2)):
        return PRECISIONS + IQ3 + (IQ2 if weighted else ())
    return PRECISIONS + IQ3 if "_IQ3_" in ftype else ()


def checked_formats(chosen: tuple, flag: str = "--formats") -> tuple:
    unknown = [f for f in chosen if f not in ACCEPTS or f in TORCH_MENU_AS]
    if unknown or not chosen:
        raise EWQError(f"{flag} names {', '.join(unknown) or 'nothing'}; llama.cpp's formats here are "
                       f"{', '.join(a for a in ACCEPTS if a not in TORCH_MENU_AS)}")
    return chosen


def parse_formats(text: str | None, flag: str = "--formats") -> tuple:
    """A comma list of ggml types as the command lines take it ("q8_0, Q4_K"), upper-cased and checked; () when
    the flag was not given (the default menu)."""
    if text is None:
        return ()
    return checked_formats(tuple(f.strip().upper() for f in text.split(",") if f.strip()), flag)


def imatrix_key(settings) -> dict:
    """What the rounding's importance is, for caches and plans: absent for plain rounding (older keys stay valid)."""
    source = getattr(settings, "imatrix", "none") or "none"
    if source == "none":
        return {}
    if source == "calibration":
        return {"imatrix": "calibration: mean squared input per column of each block matrix on the calibration text"}
    from hashlib import sha256

    path = Path(source)
    if not path.is_file():
        raise EWQError(f"--imatrix {source}: no such file")
    return {"imatrix": {"file": path.name, "sha256": sha256(path.read_bytes()).hexdigest()}}


# how the emulation rounds a product's input (in caches' keys: sweeps measured without it are not reused)
ACTIVATIONS = "rounded as llama.cpp's CPU kernels do: Q8_0/Q8_1 per 32 for the 32-weight types, Q8_K per 256 for k/i-quants"


def formats(settings) -> dict:
    how = "with the importance matrix (llama-quantize --imatrix)" if imatrix_key(settings) else "no importance matrix"
    return {"menu": list(menu(settings)), "8-bit": "Q8_0", "4-bit": "Q4_0",
            "emulation": f"ewq.ggml_quants: ggml's quantizers ({how}), bit-exact on x86-64", **imatrix_key(settings),
            "activations": ACTIVATIONS}


def require():
    """The llama_cpp module, or one EWQError line saying how to install it."""
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 -- ImportError, or its shared library failing to load (OSError, RuntimeError)
        why = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise EWQError(f"the llama.cpp executor needs the optional package llama-cpp-python (not in requirements.txt; "
                       f"{why}); build it from its sdist, which compiles llama.cpp ({BUILD_TIME}): {INSTALL}") from None
    return llama_cpp


def file_bytes_by_type(gguf_path, reader=None) -> dict:
    """{ggml type name: bytes of tensor data of that type} in a GGUF file, largest first (read with gguf-py)."""
    from ..presets import read_gguf

    sizes = Counter()
    for t in (reader or read_gguf(gguf_path)).tensors:
        sizes[t.tensor_type.name] += int(t.n_bytes)
    return dict(sizes.most_common())


def file_weight_bytes(gguf_path) -> dict:
    """The result's memory figures from the file: bytes per ggml type, of the blocks' matrices, and in all."""
    from ..presets import read_gguf

    reader = read_gguf(gguf_path)  # parsed once for both figures
    blocks = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    by_type = file_bytes_by_type(gguf_path, reader)
    return {"by_type": by_type, "blocks": blocks, "total": sum(by_type.values())}


def amx_cpu() -> bool:
    """Whether this CPU reports AMX, where the llama.cpp this backend builds (0c1e570) must not repack the weights
    for it: its AMX matrix kernel, used for batches of tokens (a prompt), died with SIGSEGV/SIGILL on the first
    quantized product on this repository's AVX-512 + AMX Xeon (docs/RESULTS.md, rounds 11-12; llama-bench -p 64 too,
    --repack 0 ran), as it does on other Sapphire Rapids machines (ggml-org/llama.cpp#20824; the fix proposed in
    #26954 requests the tile permission per thread). Without the extra buffer types the same products run in the
    AVX-512 kernels: the weights and results are the same, one token's decode can be slower than repacked."""
    from ..probes import cpu_info

    return bool({"amx_int8", "amx_tile"} & cpu_info()[1])


def _quiet(llama_cpp) -> None:
    """llama.cpp logs every load to stderr; keep errors only (llama-cpp-python's own switch, when it has one)."""
    try:
        from llama_cpp._logger import set_verbose
    except ImportError:
        return
    set_verbose(False)


class LlamaCppModel:
    """A GGUF file run by llama.cpp, duck-typing a transformers causal LM for EWQ's decoder suite (see module doc)."""

    def __init__(self, gguf_path, n_threads: int | None = None, n_ctx: int = DEFAULT_N_CTX,
                 n_batch: int = DEFAULT_N_BATCH, generation_config=None, tokenizer=None, verbose: bool = False):
        global _backend_ready
        lc = require()
        self._lc = lc
        self._model = self._ctx = self._batch = None
        path = Path(gguf_path)
        if not path.is_file():
            raise EWQError(f"GGUF file {path} does not exist")
        if n_ctx < 2 or n_batch < 1:
            raise EWQError(f"n_ctx must be at least 2 and n_batch at least 1, got {n_ctx} and {n_batch}")
        self.n_threads = int(n_threads or torch.get_num_threads())
        self.n_ctx, self.n_batch = int(n_ctx), int(min(n_batch, n_ctx))
        if not verbose:
            _quiet(lc)
        if not _backend_ready:
            lc.llama_backend_init()
            _backend_ready = True

        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0  # CPU rows: nothing offloaded even where the build could
        self.repacked = not amx_cpu()
        mp.use_extra_bufts = self.repacked  # (llama-cli --no-repack on an AMX CPU: see amx_cpu)
        self._model = lc.llama_model_load_from_file(str(path).encode(), mp)
        if not self._model:
            raise EWQError(f"llama.cpp could not load {path} (not a GGUF file, or an architecture or type this "
                           f"llama.cpp does not know); run with verbose=True to see its log")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = self.n_ctx, self.n_batch, min(self.n_batch, 512), 1
        cp.n_threads = cp.n_threads_batch = self.n_threads
        cp.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise EWQError(f"llama.cpp could not create a context of {self.n_ctx} tokens for {path}")
        self._mem = lc.llama_get_memory(self._ctx)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self._vocab))
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        for i in range(self.n_batch):  # every slot: one sequence, id 0 (fixed for the life of the batch)
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0

        self.gguf_path = path
        self.config = self._make_config(path)
        self.generation_config = self._make_generation_config(generation_config, tokenizer)
        self.name_or_path = str(path)

    # ---- what transformers models have ----

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # of the logits; the weights' types are the file's (file_bytes_by_type)

    def can_generate(self) -> bool:
        return True

    def eval(self):
        return self

    def train(self, mode: bool = True):
        if mode:
            raise EWQError("a llama.cpp model cannot be trained")
        return self

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device", kwargs.get("dtype"))
        if target is None or (isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"):
            return self
        if isinstance(target, torch.dtype):
            raise EWQError(f"a llama.cpp model's types are fixed by its GGUF file; it cannot be cast to {target}")
        raise EWQError(f"the llama.cpp executor runs on the CPU only (no layers are offloaded; "
                       f"GPU offload in this llama-cpp-python build: {bool(self._lc.llama_supports_gpu_offload())}); "
                       f"pass --device cpu, not {target}")

    def __call__(self, input_ids, attention_mask=None, **kwargs):
        """Logits at every position, float32 [b, n, vocab]; each row its own sequence from an empty cache."""
        ids = self._check_ids(input_ids, attention_mask, "forward")
        b, n = ids.shape
        if n > self.n_ctx:
            raise EWQError(f"{n} tokens do not fit the llama.cpp context of {self.n_ctx}; pass a larger n_ctx")
        logits = torch.empty(b, n, self.n_vocab, dtype=torch.float32)
        rows = ids.tolist()
        for r, row in enumerate(rows):
            self.reset()
            for start in range(0, n, self.n_batch):
                piece = row[start:start + self.n_batch]
                self._decode(piece, start, all_logits=True)
                ptr = self._lc.llama_get_logits(self._ctx)
                logits[r, start:start + len(piece)] = torch.from_numpy(
                    np.ctypeslib.as_array(ptr, shape=(len(piece), self.n_vocab)))
        return SimpleNamespace(logits=logits)

    forward = __call__

    def generate(self, input_ids=None, attention_mask=None, max_new_tokens=None, min_new_tokens=None,
                 do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1, streamer=None,
                 pad_token_id=None, eos_token_id=None, generation_config=None, use_cache=True, **kwargs):
        """Greedy decoding of one prompt: LongTensor [1, n + new tokens] (see the module doc for the contract)."""
        if kwargs:
            raise EWQError(f"the llama.cpp executor does not take generate({', '.join(sorted(kwargs))}=...)")
        if do_sample or (num_beams or 1) != 1:
            raise EWQError("the llama.cpp executor decodes greedily only (do_sample=False, num_beams=1)")
        config = generation_config or self.generation_config
        if max_new_tokens is None:
            max_new_tokens = getattr(config, "max_new_tokens", None)
        if not max_new_tokens or max_new_tokens < 1:
            raise EWQError("generate() needs max_new_tokens of at least 1")
        ids = self._check_ids(input_ids, attention_mask, "generate")
        if ids.shape[0] != 1:
            raise EWQError(f"the llama.cpp executor generates one sequence at a time, got a batch of {ids.shape[0]}")
        prompt = ids[0].tolist()
        n = len(prompt)
        if n < 1:
            raise EWQError("generate() needs a prompt of at least one token")
        if n + max_new_tokens > self.n_ctx:
            raise EWQError(f"{n} prompt + {max_new_tokens} new tokens do not fit the llama.cpp context of {self.n_ctx}; "
                           f"pass a larger n_ctx")
        eos = self._eos_set(eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None))
        min_new = int(min_new_tokens or 0)

        self.reset()
        if streamer is not None:
            streamer.put(ids.cpu())
        # the prompt, in pieces of n_batch; logits of its last token only
        for start in range(0, n, self.n_batch):
            self._decode(prompt[start:start + self.n_batch], start, all_logits=False)
        out = []
        lc, ctx, batch, n_vocab = self._lc, self._ctx, self._batch, self.n_vocab
        address, logits = None, None
        for i in range(max_new_tokens):
            # the last token's logits; the numpy view is remade only if llama.cpp moved its output buffer (making
            # a view costs ~30 us right after a decode has flushed the caches, a tenth of the per-token overhead)
            where = ctypes.cast(lc.llama_get_logits_ith(ctx, -1), ctypes.c_void_p).value
            if not where:
                raise EWQError("llama.cpp returned no logits for the last token")
            if where != address:
                address, logits = where, np.ctypeslib.as_array((ctypes.c_float * n_vocab).from_address(where))
            token = int(logits.argmax())
            if i < min_new and token in eos:  # transformers' min_new_tokens: EOS cannot be chosen yet
                masked = logits.copy()
                masked[list(eos)] = -np.inf
                token = int(masked.argmax())
            out.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
            if i + 1 == max_new_tokens or token in eos:
                break
            # one token at position n + i (the batch's seq ids are set once in __init__)
            batch.token[0], batch.pos[0], batch.logits[0], batch.n_tokens = token, n + i, 1, 1
            rc = lc.llama_decode(ctx, batch)
            if rc != 0:
                raise EWQError(f"llama_decode failed with code {rc} at position {n + i}")
        if streamer is not None:
            streamer.end()
        return torch.tensor([prompt + out], dtype=torch.long)

    # ---- llama.cpp ----

    def reset(self) -> None:
        """Empty the KV cache (metadata only: cells are marked free, no memset)."""
        self._lc.llama_memory_clear(self._mem, False)

    def _decode(self, tokens, pos0: int, all_logits: bool) -> None:
        batch = self._batch
        last = len(tokens) - 1
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.logits[i] = 1 if all_logits or i == last else 0
        batch.n_tokens = len(tokens)
        rc = self._lc.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EWQError(f"llama_decode failed with code {rc} on {len(tokens)} tokens at position {pos0}")

    def _check_ids(self, input_ids, attention_mask, what: str) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype.is_floating_point:
            raise EWQError(f"{what}: input_ids must be integer token ids [batch, tokens], got {tuple(ids.shape)} "
                           f"{ids.dtype}")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
            raise EWQError(f"{what}: the llama.cpp executor takes no padding (attention_mask must be all ones)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab):
            raise EWQError(f"{what}: token ids must be in [0, {self.n_vocab}) for {self.gguf_path.name}")
        return ids.cpu()

    def _eos_set(self, eos) -> set:
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, (list, tuple, set)) else [eos])}

    def _meta(self, key: str):
        buf = ctypes.create_string_buffer(512)
        n = self._lc.llama_model_meta_val_str(self._model, key.encode(), buf, ctypes.sizeof(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _make_config(self, path: Path):
        lc, m = self._lc, self._model
        desc = ctypes.create_string_buffer(256)
        lc.llama_model_desc(m, desc, ctypes.sizeof(desc))
        values = {
            "model_type": self._meta("general.architecture"), "name": self._meta("general.name"),
            "vocab_size": self.n_vocab, "hidden_size": int(lc.llama_model_n_embd(m)),
            "num_hidden_layers": int(lc.llama_model_n_layer(m)), "num_attention_heads": int(lc.llama_model_n_head(m)),
            "num_key_value_heads": int(lc.llama_model_n_head_kv(m)),
            "max_position_embeddings": int(lc.llama_model_n_ctx_train(m)),
            "gguf_path": str(path), "gguf_description": desc.value.decode("utf-8", "replace"),
            "file_type": self._meta("general.file_type"), "n_ctx": self.n_ctx, "n_batch": self.n_batch,
            "n_threads": self.n_threads, "executor": "llama.cpp", "weights_repacked": self.repacked,
            "llama_cpp_python_version": getattr(self._lc, "__version__", None),
        }
        config = SimpleNamespace(**values)
        config.to_dict = lambda: dict(values)
        return config

    def _make_generation_config(self, given, tokenizer):
        """Token ids from the caller's GenerationConfig, else the GGUF's tokenizer.ggml.*, else the HF tokenizer."""
        from transformers import GenerationConfig

        if given is not None:
            return given

        def gguf_id(fn):
            t = int(fn(self._vocab))
            return None if t == TOKEN_NULL else t

        ids = {"bos_token_id": gguf_id(self._lc.llama_vocab_bos), "eos_token_id": gguf_id(self._lc.llama_vocab_eos),
               "pad_token_id": gguf_id(self._lc.llama_vocab_pad)}
        if tokenizer is not None:
            ids = {key: getattr(tokenizer, key, None) if value is None else value for key, value in ids.items()}
        return GenerationConfig(do_sample=False, **ids)

    # ---- lifetime ----

    def close(self) -> None:
        lc = getattr(self, "_lc", None)
        if lc is None:
            return
        if getattr(self, "_batch", None) is not None:
            lc.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            lc.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lc.llama_model_free(self._model)
            self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):  # at interpreter exit the binding may already be gone
            self.close()

    def __repr__(self) -> str:
        return f"LlamaCppModel({str(self.gguf_path)!r}, n_threads={self.n_threads}, n_ctx={self.n_ctx})"
