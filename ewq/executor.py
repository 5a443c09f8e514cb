"""Which executor and mode (eager or compiled) runs a quantized model fastest on this machine, by measurement.

The same plan decodes 2x faster than the original on one CPU and no faster on another (docs/RESULTS.md: an
AVX-512 machine vs an AVX2 one), so no default can be right everywhere. Instead, before anything is quantized,
a short probe times each candidate's kernels at the model's own layer shapes: the matrices of a few blocks
(enough to leave the caches, as decoding does), one token at a time for a decoder (a matrix-vector product per
layer) or a batch of 32 sentences for an encoder, in the run dtype, quantized all to 8-bit and all to 4-bit,
beside the same layers unquantized in the same mode. The candidate whose quantized layers are fastest wins;
the probe is cached per machine (device, instruction set, threads, library versions, shapes, and the dtype and
settings each candidate is measured with), like the read bandwidth, so it runs once.

Candidates are the faithful executors: weight-only or outlier-aware ones (torchao int8/int4, bitsandbytes
LLM.int8/nf4), eager, and torchao compiled (bitsandbytes does not compile). torch's dynamic int8 is not a
candidate for decoders: one activation scale per tensor broke SmolLM2 (KL 1.37, docs/RESULTS.md); for encoders
neither is it (cosine 0.94 to the original embeddings), so an encoder's default is measured among the others.
"""

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass

import torch

from . import __version__
from .backends import QuantSettings, get_backend
from .common import EWQError, write_json_atomic
from .probes import (
    busy_cores,
    cache_dir,
    device_name,
    format_instruction_set,
    instruction_set,
    synchronize,
)

PROBE_BYTES = 64 << 20  # stack enough blocks to hold this many weight bytes: more than a CPU's last-level cache
MAX_PROBE_BLOCKS = 8
TIMED_CALLS = 12
ENCODER_TOKENS = 32 * 32  # a batch of 32 sentences of about 32 tokens


@dataclass
class Layout:
    """What the probe needs of a model: one block's matrices [out, in], the number of blocks, the kind."""
    shapes: list
    blocks: int
    kind: str

    @classmethod
    def of_checkpoint(cls, ckpt) -> "Layout":
        return cls([(ckpt.rows(t), t.numel // ckpt.rows(t)) for t in ckpt.blocks[0].matrices], len(ckpt.blocks),
                   ckpt.kind)

    @classmethod
    def of_plan(cls, plan: dict) -> "Layout":
        """A saved quantized model's layout, from its plan (its file holds packed, not [out, in], tensors)."""
        return cls([tuple(v) for v in plan["blocks"][0]["shapes"].values()], len(plan["blocks"]),
                   plan["model"].get("kind", "decoder"))


@dataclass
class Choice:
    backend: str
    compile: bool
    why: str
    probe: dict | None = None

    @property
    def label(self) -> str:
        return f"{self.backend}, {'compiled' if self.compile else 'eager'}"


def candidates(kind: str, device: str) -> list:
    """(backend, compile) pairs worth timing here."""
    out = [("torchao", False), ("torchao", True), ("bitsandbytes", False)]
    if kind == "encoder":  # --compile is not offered for encoders (eager only)
        out = [c for c in out if not c[1]]
    return out


def probe_blocks(layout: Layout) -> int:
    """How many blocks to stack so the probe's weights leave the caches, as decoding's do."""
    block_bytes = 2 * sum(o * i for o, i in layout.shapes)
    return max(1, min(layout.blocks, MAX_PROBE_BLOCKS, math.ceil(PROBE_BYTES / block_bytes)))


def _stack(shapes, blocks: int, precision: str, settings: QuantSettings, dtype, device: str):
    """The probe's layers: one block's matrices with seeded N(0, 0.02^2) weights (the same for every precision, so
    errors compare), quantized once and copied for the other blocks (separate memory, as a model's blocks are:
    quantizing each copy anew would cost the probe minutes of HQQ for no other figure)."""
    backend = get_backend(settings.backend)
    generator = torch.Generator().manual_seed(0)
    one = []
    for out_f, in_f in shapes:
        lin = torch.nn.Linear(in_f, out_f, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out_f, in_f, generator=generator) * 0.02)
        if precision != "raw" and not backend.unsupported((out_f, in_f), precision, settings):
            lin = backend.quantize_layer(lin, precision, settings, dtype, device)
        one.append(lin.eval())
    return one + [copy.deepcopy(layer) for _ in range(blocks - 1) for layer in one]


def _runner(layers, tokens: int, dtype, device: str, compiled: bool):
    """(a function running every layer once, its inputs)."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(tokens, layer.in_features, generator=generator).to(dtype=dtype, device=device)
              for layer in layers]

    def run(xs):
        return [layer(x) for layer, x in zip(layers, xs)]

    return (torch.compile(run, dynamic=False) if compiled else run), inputs


def time_stacks(stacks: dict, tokens: int, dtype, device: str, compiled: bool) -> tuple:
    """({name: seconds per pass}, {name: outputs}) for stacks of layers timed in interleaved rounds, the fastest
    call of each kept: other processes slow some calls (on 2 busy cores, by 30x), never speed one up, and
    interleaving makes a slow spell hit every stack alike."""
    runners = {name: _runner(layers, tokens, dtype, device, compiled) for name, layers in stacks.items()}
    best = {name: math.inf for name in stacks}
    with torch.inference_mode():
        for fn, xs in runners.values():  # warm-up (and compilation)
            for _ in range(2):
                fn(xs)
        for _ in range(TIMED_CALLS):
            for name, (fn, xs) in runners.items():
                synchronize(device)
                start = time.perf_counter()
                fn(xs)
                synchronize(device)
                best[name] = min(best[name], time.perf_counter() - start)
        outputs = {name: [layer(x) for layer, x in zip(stacks[name], xs)] for name, (fn, xs) in runners.items()}
    return best, outputs


def relative_error(outputs, reference) -> float:
    num = sum((o.float() - r.float()).pow(2).sum().item() for o, r in zip(outputs, reference))
    den = sum(r.float().pow(2).sum().item() for r in reference)
    return math.sqrt(num / den) if den else 0.0


def run_probe(layout: Layout, device: str, dtype_of, progress: bool = True, wanted=None) -> dict:
    """Time the candidates (those in `wanted`, default all), each in the dtype it would run in (dtype_of(backend)),
    its 8-bit and 4-bit layers interleaved with the unquantized ones in the same mode; returns the probe record."""
    shapes, blocks = layout.shapes, probe_blocks(layout)
    tokens = ENCODER_TOKENS if layout.kind == "encoder" else 1
    if progress:
        print(f"probing the executors on {device_name(device)} at this model's layer shapes ({blocks} blocks of "
              f"{len(shapes)} matrices, {tokens} token{'s' if tokens > 1 else ''} per call; once per machine, cached)",
              flush=True)
    busy = busy_cores(device)
    if busy >= 0.5:
        print(f"warning: other processes keep about {busy:.1f} cores busy: the probe's timings are unreliable now; it "
              f"is measured again at the next run on a quiet machine", flush=True)
    rows = []
    for backend, compiled in candidates(layout.kind, device):
        if wanted is not None and (backend, compiled) not in wanted:
            continue
        settings = QuantSettings(backend)
        dtype = dtype_of(backend)
        try:
            get_backend(backend).check(settings, dtype, device)
            stacks = {p: _stack(shapes, blocks, p, settings, dtype, device) for p in ("raw", "8-bit", "4-bit")}
            seconds, outputs = time_stacks(stacks, tokens, dtype, device, compiled)
            row = {"backend": backend, "compile": compiled, "dtype": str(dtype).replace("torch.", ""),
                   "float_ms": 1000 * seconds["raw"]}
            for precision in ("8-bit", "4-bit"):
                key = precision.replace("-", "")
                row[f"{key}_ms"] = 1000 * seconds[precision]
                row[f"speedup_{key}"] = seconds["raw"] / seconds[precision]
                row[f"rel_error_{key}"] = relative_error(outputs[precision], outputs["raw"])  # a broken kernel shows
        except Exception as e:  # a candidate that cannot run here is reported, not fatal
            row = {"backend": backend, "compile": compiled, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        rows.append(row)
    return {"candidates": rows, "shapes": [list(s) for s in shapes], "blocks": blocks, "tokens": tokens,
            "timing": f"fastest of {TIMED_CALLS} interleaved calls per stack", "busy_cores": busy}


def probe_key(layout: Layout, device: str, dtype_of) -> dict:
    import importlib.metadata

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    backends = dict.fromkeys(b for b, _ in candidates(layout.kind, device))
    dtypes = {b: str(dtype_of(b)).replace("torch.", "") for b in backends}
    # what each candidate is measured with (run_probe: the backend's default settings), so a change of a default
    # measures again instead of ranking by timings of other formats
    settings = {b: QuantSettings(b).key() for b in backends}
    return {"device_name": device_name(device), "instruction_set": instruction_set(device),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "torchao": version("torchao"),
            "bitsandbytes": version("bitsandbytes"), "dtypes": dtypes, "settings": settings, "kind": layout.kind,
            "shapes": [list(s) for s in layout.shapes], "blocks": probe_blocks(layout), "ewq": __version__}


def cached_probe(layout: Layout, device: str, dtype_of, progress: bool = True, wanted=None) -> tuple:
    """(probe record, cache path); each candidate is measured once per machine, model shapes and library versions
    (only the `wanted` ones when the user's flags narrow the choice; the others when they are first needed)."""
    key = probe_key(layout, device, dtype_of)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "executors" / f"probe_{digest}.json"
    wanted = set(wanted if wanted is not None else candidates(layout.kind, device))
    probe = None
    try:
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            probe = cached["probe"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if probe is not None and probe.get("busy_cores", 0) >= 0.5 and busy_cores(device) < 0.5:
        probe = None  # measured on a busy machine, and this one is quiet: measure again
    have = {(r["backend"], r["compile"]) for r in (probe or {}).get("candidates", [])}
    if probe is None or not wanted <= have:
        fresh = run_probe(layout, device, dtype_of, progress, wanted - have)
        probe = {**fresh, "candidates": (probe or {}).get("candidates", []) + fresh["candidates"]}
        write_json_atomic(path, {"key": key, "probe": probe,
                                 "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return probe, path


def quantized_ms(row: dict) -> float:
    """The figure candidates are ranked by: the mean time of their all-8-bit and all-4-bit layers."""
    return (row["8bit_ms"] + row["4bit_ms"]) / 2


def choose(layout: Layout, device: str, dtype_of, progress: bool = True, backend: str | None = None,
           compile: bool | None = None) -> Choice:
    """The fastest faithful executor and mode here; `backend` or `compile` (the user's flags) narrow the choice."""
    wanted = [c for c in candidates(layout.kind, device)
              if (backend is None or c[0] == backend) and (compile is None or c[1] == compile)]
    probe, path = cached_probe(layout, device, dtype_of, progress, wanted)
    usable = [r for r in probe["candidates"] if "error" not in r and (backend is None or r["backend"] == backend)
              and (compile is None or r["compile"] == compile)]
    if not usable:
        failed = "; ".join(f"{r['backend']}: {r['error']}" for r in probe["candidates"] if "error" in r)
        raise EWQError(f"no executor could run on {device} here{f' ({failed})' if failed else ''}; pass --backend "
                       f"explicitly")
    best = min(usable, key=lambda r: (quantized_ms(r), r["compile"]))
    others = ", ".join(f"{r['backend']} {'compiled' if r['compile'] else 'eager'} "
                       f"{r['speedup_8bit']:.2f}x/{r['speedup_4bit']:.2f}x" for r in usable if r is not best)
    faster = best["speedup_8bit"] > 1 or best["speedup_4bit"] > 1
    why = (f"its 8-bit/4-bit layers at this model's shapes ran {best['speedup_8bit']:.2f}x/{best['speedup_4bit']:.2f}x "
           f"the unquantized layers in the same mode" + (f" (others: {others})" if others else "") +
           ("" if faster else "; no executor's quantized layers are faster than the unquantized ones on this machine") +
           f"; {format_instruction_set(instruction_set(device))}; probe cached in {path}")
    return Choice(best["backend"], best["compile"], why, probe)
