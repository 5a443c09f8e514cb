"""Compare ewq.ggml_quants with ggml's own quantizer, bit for bit. Not a test: it needs a built llama.cpp.

    python bench/check_ggml_quants.py /path/to/llama.cpp            # the tree (finds build/bin/libggml-base.so)
    python bench/check_ggml_quants.py /path/to/libggml-base.so --types Q4_K,Q6_K --timing
    python bench/check_ggml_quants.py /path/to/llama.cpp --imatrix  # with an importance per column, as --imatrix

For every type it quantizes the same float32 matrices with ggml_quantize_chunk(type, ..., imatrix=NULL) (what
llama-quantize calls without --imatrix) and dequantizes with ggml's type traits to_float, then prints the max abs
difference to ewq's quantize_dequantize, the share of bit-identical values (so -0.0 vs 0.0 counts as a difference)
and the share of identical bytes between ggml's blocks and ewq's quantize_to_bytes.

Matrices: Gaussian ones of a few shapes, plus real SmolLM2 tensors (fp16 -> float32, as llama-quantize converts
them). A tensor whose row length the type cannot take is reshaped to rows the type can take ("reshaped" in the
output): the emulation is per block, so this still checks every block of the tensor.

End to end, against a whole llama-quantize run (the type choices and fallbacks included):

    python bench/check_ggml_quants.py LLAMA_CPP --gguf-pair model-f16.gguf model-Q4_K_M.gguf --real 0

checks every quantized tensor of the output file, byte for byte, against the emulation of the type llama-quantize
chose, applied to the same tensor of the source file; for a file made with `llama-quantize --imatrix I.gguf`, add
`--imatrix-file I.gguf` (the emulation then gets the same importance per tensor).
"""

import argparse
import os
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ["EWQ_GGML_LIB"] = "off"  # the emulation is what is checked: never let it round with ggml itself
from ewq import ggml_quants as G  # noqa: E402
from ewq.ggml_native import GgmlLibrary as Ggml  # noqa: E402  (ggml_quantize_chunk and to_float, via ctypes)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "smollm2-135m" / "model.safetensors"


def find_lib(path: Path) -> Path:
    if path.is_file():
        return path
    for cand in ("build/bin/libggml-base.so", "bin/libggml-base.so", "libggml-base.so",
                 "build/bin/libggml-base.dylib", "build/ggml/src/libggml-base.so"):
        if (path / cand).is_file():
            return path / cand
    sys.exit(f"no libggml-base under {path} (build llama.cpp first, or pass the library file)")


def matrices(model: Path, n_real: int, seed: int):
    """(label, float32 [rows, cols]) pairs: Gaussian, then SmolLM2 tensors."""
    g = torch.Generator().manual_seed(seed)
    for shape in ((64, 256), (576, 1536), (300, 4096)):
        yield f"gauss{shape[0]}x{shape[1]}", torch.randn(*shape, generator=g) * 0.02
    yield "gauss-heavy-tail 256x512", torch.distributions.StudentT(3.0).sample((256, 512)) * 0.02
    if not model.is_file() or n_real <= 0:
        return
    from safetensors import safe_open

    with safe_open(str(model), "pt") as f:
        keys = f.keys()
        names = [k for k in keys if k.endswith("weight") and len(f.get_slice(k).get_shape()) == 2]
        # a spread of tensor kinds and layers, embedding last (it is big)
        embed = [k for k in names if "embed" in k]
        other = [k for k in names if "embed" not in k]
        pick = other[:: max(1, len(other) // max(1, n_real - 1))][: max(0, n_real - 1)] + embed[:1]
        for k in pick:
            yield k, f.get_tensor(k).float()


def fit_rows(w: torch.Tensor, block: int):
    """Reshape so the row length is a multiple of block (per-block emulation: same blocks, other rows)."""
    if w.shape[1] % block == 0:
        return w, False
    for cols in (1536, 1024, 512, 256, 32):
        if cols % block == 0 and w.numel() % cols == 0:
            return w.reshape(-1, cols), True
    return None, True


def synthetic_importance(cols: int, seed: int) -> torch.Tensor:
    """Per-column importance shaped like real ones (mean squared activations): log-normal spread over columns, a
    few outlier columns 100x larger, and one column at exactly 0 (a dead input)."""
    g = torch.Generator().manual_seed(seed + cols)
    imp = torch.exp(torch.randn(cols, generator=g) * 1.5) * 0.01
    imp[torch.randint(0, cols, (max(1, cols // 100),), generator=g)] *= 100
    imp[cols // 2] = 0.0
    return imp


def check_gguf_pair(source: Path, quantized: Path, imatrix_file: Path | None = None):
    """Every quantized tensor of a llama-quantize output vs the emulation of the same type on the source tensor (with
    the importance llama-quantize --imatrix FILE gave each tensor the file names, as ewq.imatrix reads it)."""
    from ewq.imatrix import load_imatrix

    importance = load_imatrix(imatrix_file).importance if imatrix_file else {}
    src = {t.name: t for t in gguf.GGUFReader(str(source)).tensors}
    counts, bad, with_imp = {}, [], 0
    for t in gguf.GGUFReader(str(quantized)).tensors:
        name = t.tensor_type.name
        if name not in G.EMULATED_TYPES:
            continue
        s = src[t.name]
        w = torch.from_numpy(np.asarray(s.data).astype(np.float32)).reshape(int(s.shape[1]), int(s.shape[0]))
        imp = importance.get(t.name)
        mine = G.quantize_to_bytes(w, name, importance=imp)
        raw = np.asarray(t.data).view(np.uint8).reshape(mine.shape)
        values = G.quantize_dequantize(w, name, importance=imp).numpy()
        ref = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float32).reshape(values.shape)
        ok = np.array_equal(mine, raw) and np.array_equal(values.view(np.uint32), ref.view(np.uint32))
        counts[name] = counts.get(name, 0) + 1
        with_imp += imp is not None and G.uses_importance(name)
        if not ok:
            bad.append(f"{t.name} ({name})")
    print(f"\n{quantized.name}: quantized tensors per type {counts} ({with_imp} rounded with importance); "
          f"differing from the emulation: {len(bad)} {bad[:10]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llama_cpp", type=Path, help="llama.cpp tree with a build, or the libggml-base library")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a safetensors file of real weights")
    ap.add_argument("--real", type=int, default=8, help="how many real tensors (0: Gaussian only)")
    ap.add_argument("--types", default=",".join(G.EMULATED_TYPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--timing", action="store_true", help="also time 576x1536 and 4096x4096 per type")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--imatrix", action="store_true",
                    help="pass an importance per column (synthetic: log-normal, outlier and zero columns) to both "
                         "ggml_quantize_chunk and the emulation: llama-quantize --imatrix's rounding")
    ap.add_argument("--gguf-pair", nargs=2, type=Path, metavar=("SOURCE", "QUANTIZED"),
                    help="also compare a llama-quantize output with the emulation of its source, tensor by tensor")
    ap.add_argument("--imatrix-file", type=Path, default=None,
                    help="with --gguf-pair: the imatrix file llama-quantize was given (--imatrix FILE)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ggml = Ggml(find_lib(args.llama_cpp))
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    if not args.imatrix:  # ggml aborts the process on these without an importance (GGML_ASSERT)
        skipped = [t for t in types if t in G.NEEDS_IMPORTANCE]
        types = [t for t in types if t not in G.NEEDS_IMPORTANCE]
        if skipped:
            print(f"{', '.join(skipped)}: rounded only with an importance matrix; checked with --imatrix")
    mats = list(matrices(args.model, args.real, args.seed))

    print(f"{'type':6} {'matrix':44} {'values':>9} {'max|diff|':>10} {'identical':>10} {'bytes eq':>9} "
          f"{'ewq s':>7} {'ggml s':>7}")
    worst = {}
    for name in types:
        block = G.TYPES[name].block_size
        for label, w in mats:
            wf, reshaped = fit_rows(w, block)
            if wf is None:
                print(f"{name:6} {label[:44]:44} (no row length fits block {block}; skipped)")
                continue
            imp = synthetic_importance(wf.shape[1], args.seed) if args.imatrix else None
            t0 = time.perf_counter()
            mine = G.quantize_dequantize(wf, name, importance=imp).numpy()
            t_ewq = time.perf_counter() - t0
            t0 = time.perf_counter()
            q = ggml.quantize(wf.numpy(), name, None if imp is None else imp.numpy())
            ref = ggml.dequantize(q, name, wf.shape)
            t_ggml = time.perf_counter() - t0
            packed = G.quantize_to_bytes(wf, name, importance=imp)
            diff = float(np.abs(mine - ref).max())
            same = float((mine.view(np.uint32) == ref.view(np.uint32)).mean())
            bytes_eq = float((packed == q).mean())
            prev_diff, prev_same = worst.get(name, (0.0, 1.0))
            worst[name] = max(prev_diff, diff), min(prev_same, same)
            tag = label + (" (reshaped)" if reshaped else "")
            print(f"{name:6} {tag[:44]:44} {mine.size:9d} {diff:10.3g} {same:10.6f} {bytes_eq:9.6f} "
                  f"{t_ewq:7.3f} {t_ggml:7.3f}")
    print(f"\nsummary (worst over all matrices; importance: {'synthetic per column' if args.imatrix else 'none'}):")
    for name, (diff, same) in worst.items():
        verdict = "bit-exact" if same == 1.0 else "DIFFERS"
        print(f"  {name:6} max|diff| {diff:.3g}  identical {same:.6f}  {verdict}")

    if args.gguf_pair:
        check_gguf_pair(*args.gguf_pair, args.imatrix_file)

    if args.timing:
        print("\nemulation time per matrix (s), torch threads =", args.threads)
        g = torch.Generator().manual_seed(1)
        for shape in ((576, 1536), (4096, 4096)):
            w = torch.randn(*shape, generator=g) * 0.02
            imp = synthetic_importance(shape[1], args.seed) if args.imatrix else None
            for name in types:
                t0 = time.perf_counter()
                G.quantize_dequantize(w, name, importance=imp)
                print(f"  {shape[0]}x{shape[1]} {name:6} {time.perf_counter() - t0:7.3f}")


if __name__ == "__main__":
    main()
