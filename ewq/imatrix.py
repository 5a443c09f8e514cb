"""Importance matrices as llama.cpp makes and reads them: the importance of each input column of each matrix, the
mean of the squared inputs it saw on calibration text (what `llama-imatrix` collects and `llama-quantize --imatrix`
weights its rounding with, ewq.ggml_quants' `importance=`).

    im = load_imatrix("model.imatrix.gguf")      # llama-imatrix's GGUF format, or its legacy .dat
    im.importance["blk.0.attn_q.weight"]         # float32 [cols], exactly what llama-quantize passes to ggml
    check_imatrix(im, {gguf_name: (rows, cols)}) # EWQError (one line) for an imatrix of another model
    im.gguf_metadata()                           # the quantize.imatrix.* keys llama-quantize writes into its output
    save_imatrix(im, "out.imatrix.gguf")         # GGUF (llama-quantize reads it); a name ending .dat: legacy format

    collector = ImportanceCollector()            # from EWQ's own calibration pass:
    with collector.watching(block, prefix="model.layers.3"):   # hooks on every nn.Linear of the block
        block(hidden)                            # every forward adds sum(x^2) per input column and the token count
    im = collector.imatrix(hf_to_gguf, datasets=["corpus name"], chunk_count=n_windows, chunk_size=window)

What llama.cpp does (llama-cpp-python 0.3.36's vendored llama.cpp: tools/imatrix/imatrix.cpp,
common/imatrix-loader.cpp, tools/quantize/quantize.cpp, src/llama-quant.cpp):
  * llama-imatrix hooks every matrix multiplication whose weight is named `blk.*` (and `output.weight` only with
    --process-output; never token_embd, which is a row lookup): per input column the sum of x^2 over the tokens,
    and the token count. GGUF format (the default): tensors NAME.in_sum2 [cols] and NAME.counts [1], keys
    imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size. Legacy .dat: int32 entry count; per entry name,
    ncall, nval, nval floats (sum/count * ncall); then the chunk count and the dataset name.
  * llama-quantize reads either and normalises to the mean (GGUF: in_sum2 / counts, a column of count 0 -> 1;
    legacy: values / ncall), then for each tensor whose name is in the imatrix with exactly ne0 values passes it to
    ggml_quantize_chunk; a name that is missing is quantized without (it logs "did not find weights"), a size that
    differs is an error (except token_embd). It writes quantize.imatrix.file (the path as given),
    quantize.imatrix.dataset (the first dataset), quantize.imatrix.entries_count and, when known,
    quantize.imatrix.chunks_count.
EWQ is stricter where llama-quantize is silent: an imatrix none of whose `blk.*` entries are the model's matrices,
or with an entry the model does not have, or a column count that differs, is refused as one of another model.
"""

from __future__ import annotations

import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .common import EWQError

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
# the keys llama-quantize (tools/quantize/quantize.cpp) writes into a file it made with --imatrix
KEY_FILE = "quantize.imatrix.file"
KEY_DATASET = "quantize.imatrix.dataset"
KEY_ENTRIES = "quantize.imatrix.entries_count"
KEY_CHUNKS = "quantize.imatrix.chunks_count"


@dataclass
class Imatrix:
    """Per GGUF tensor name: `sums` (float32 [cols], sum of x^2 per column as stored) and `counts` (what the sums are
    divided by: tokens for the GGUF format, ncall for the legacy one). `importance` is the normalised mean."""
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    datasets: list = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: str | None = None

    @property
    def importance(self) -> dict:
        """{GGUF name: float32 [cols]} as llama-quantize's load_imatrix computes it (float32 division)."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name]
            if c > 0:
                out[name] = (s / np.float32(c)).astype(np.float32)
            else:  # GGUF: no data -> 1; legacy: the raw values
                out[name] = s.astype(np.float32) if self.legacy else np.ones_like(s, dtype=np.float32)
        return out

    def gguf_metadata(self, file: str | None = None) -> dict:
        """The quantize.imatrix.* key-values llama-quantize writes (strings cut to 127 bytes as it does)."""
        meta = {KEY_FILE: str(file if file is not None else (self.path or ""))[:127]}
        if self.datasets:
            meta[KEY_DATASET] = str(self.datasets[0])[:127]
        meta[KEY_ENTRIES] = len(self.sums)
        if self.chunk_count > 0:
            meta[KEY_CHUNKS] = int(self.chunk_count)
        return meta


# ------------------------------------------------------------------------------------------------ reading

def load_imatrix(path) -> Imatrix:
    """An imatrix file of either format llama-imatrix writes; one EWQError line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise EWQError(f"imatrix file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    im = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    im.path = str(path)
    if not im.sums:
        raise EWQError(f"{path}: the imatrix has no entries")
    return im


def _load_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 -- gguf-py raises ValueError/struct errors on damaged files
        raise EWQError(f"{path}: not a readable GGUF imatrix ({type(e).__name__}: {e})") from None
    fields = reader.fields

    def scalar(key):
        fld = fields.get(key)
        return int(fld.parts[fld.data[0]][0]) if fld is not None else None

    if "imatrix.datasets" not in fields or scalar("imatrix.chunk_count") is None or \
            scalar("imatrix.chunk_size") is None:
        raise EWQError(f"{path}: a GGUF without the imatrix.* keys (llama-quantize refuses it too: 'missing imatrix "
                       f"metadata'); is it a model rather than an importance matrix?")
    ds = fields["imatrix.datasets"]
    datasets = [bytes(ds.parts[i]).decode("utf-8", "replace") for i in ds.data]
    sums, counts = {}, {}
    for t in reader.tensors:
        if t.name.endswith(SUMS_SUFFIX):
            sums[t.name[:-len(SUMS_SUFFIX)]] = np.asarray(t.data, dtype=np.float32).reshape(-1).copy()
        elif t.name.endswith(COUNTS_SUFFIX):
            counts[t.name[:-len(COUNTS_SUFFIX)]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise EWQError(f"{path}: mismatched sums and counts for {odd}")
    out = Imatrix(datasets=datasets, chunk_count=scalar("imatrix.chunk_count"),
                  chunk_size=scalar("imatrix.chunk_size"))
    for name, s in sums.items():
        c = counts[name]
        if c.size != 1:
            raise EWQError(f"{path}: {name} has {c.size} counts (a mixture of experts); EWQ plans dense models only")
        out.sums[name], out.counts[name] = s, int(np.rint(c[0]))  # std::lround
    return out


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise EWQError(f"{path}: neither a GGUF nor a legacy .dat imatrix (truncated at byte {pos})")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise EWQError(f"{path}: neither a GGUF nor a legacy .dat imatrix (entry count {n_entries})")
    out = Imatrix(legacy=True)
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length < 4096:
            raise EWQError(f"{path}: neither a GGUF nor a legacy .dat imatrix (name length {length})")
        name = take(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = take("<ii")
        if nval < 1:
            raise EWQError(f"{path}: entry {name} has {nval} values")
        out.sums[name] = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        if pos > len(data):
            raise EWQError(f"{path}: truncated in the values of {name}")
        out.counts[name] = ncall
    if pos + 4 <= len(data):
        (out.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                out.datasets.append(take(f"<{length}s")[0].decode("utf-8", "replace"))
    return out


# ------------------------------------------------------------------------------------------------ checking

def check_imatrix(im: Imatrix, shapes: dict, what: str = "the model") -> None:
    """Refuse an imatrix made for another model: `shapes` {GGUF name: (rows, cols)} of every matrix. Every entry must
    name one of the matrices with the same column count, and every `blk.*` matrix must have an entry (llama-imatrix
    covers them all)."""
    src = im.path or "the imatrix"
    unknown = sorted(n for n in im.sums if n not in shapes)
    if unknown:
        raise EWQError(f"{src} is an importance matrix of another model: it has {len(unknown)} entr"
                       f"{'y' if len(unknown) == 1 else 'ies'} {what} does not ({unknown[0]}, ...); "
                       f"make one for this model (llama-imatrix) or pass --no-imatrix")
    for name, s in im.sums.items():
        cols = shapes[name][-1]
        if s.size != cols:
            raise EWQError(f"{src} is an importance matrix of another model: {name} has {s.size} columns there, "
                           f"{cols} in {what}; make one for this model (llama-imatrix) or pass --no-imatrix")
    missing = sorted(n for n in shapes if n.startswith("blk.") and n not in im.sums)
    if missing:
        raise EWQError(f"{src} lacks {len(missing)} of {what}'s block matrices ({missing[0]}, ...): an importance "
                       f"matrix of another model (or a partial one); make one for this model or pass --no-imatrix")


# ------------------------------------------------------------------------------------------------ writing

def save_imatrix(im: Imatrix, path) -> Path:
    """Write `im` in llama-imatrix's GGUF format (or, for a name ending .dat, its legacy format), to a temporary file
    renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        (_save_legacy if path.suffix == ".dat" else _save_gguf)(im, Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _save_gguf(im: Imatrix, tmp: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp), arch="imatrix")  # gguf-py always writes general.architecture; llama.cpp ignores it
    w.add_type("imatrix")
    # llama-quantize needs the key; gguf-py writes no empty array, so "no dataset" is one empty name
    w.add_array("imatrix.datasets", [str(d) for d in im.datasets] or [""])
    w.add_uint32("imatrix.chunk_count", int(im.chunk_count))
    w.add_uint32("imatrix.chunk_size", int(im.chunk_size))
    for name in sorted(im.sums):
        imp = im.importance[name] if im.legacy else None  # legacy sums are ncall-scaled: store mean * count
        sums = im.sums[name] if imp is None else imp * np.float32(max(im.counts[name], 1))
        w.add_tensor(name + SUMS_SUFFIX, np.asarray(sums, dtype=np.float32).reshape(1, -1))
        w.add_tensor(name + COUNTS_SUFFIX, np.array([[float(im.counts[name])]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _save_legacy(im: Imatrix, tmp: Path) -> None:
    chunk = max(im.chunk_size, 1)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<i", len(im.sums)))
        for name in sorted(im.sums):
            imp = im.importance[name]
            count = im.counts[name]
            ncall = count if im.legacy else (count + chunk - 1) // chunk  # llama-imatrix: ceil(tokens / chunk)
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, imp.size))
            f.write((imp * np.float32(ncall)).astype("<f4").tobytes())
        f.write(struct.pack("<i", int(im.chunk_count)))
        ds = (im.datasets[-1] if im.datasets else "").encode()
        f.write(struct.pack("<i", len(ds)) + ds)


# ------------------------------------------------------------------------------------------------ collecting

class ImportanceCollector:
    """Sums of x^2 per input column (float64) and token counts, per matrix, from forward passes over nn.Linear layers
    (transformers' Conv1D too): what llama-imatrix collects, from EWQ's own calibration pass."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float64).square().sum(0).cpu()
            if name in self.sums:
                self.sums[name] += x2
            else:
                self.sums[name] = x2
            self.tokens[name] = self.tokens.get(name, 0) + x.numel() // x.shape[-1]
        return hook

    @contextmanager
    def watching(self, module, prefix: str = ""):
        """Collect from every linear layer of `module` while the context is open; names are `prefix.sub.weight`."""
        from transformers.pytorch_utils import Conv1D

        handles = []
        try:
            for sub, layer in module.named_modules():
                if isinstance(layer, (torch.nn.Linear, Conv1D)):
                    full = ".".join(p for p in (prefix, sub) if p) + ".weight"
                    handles.append(layer.register_forward_pre_hook(self._hook(full)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def imatrix(self, names: dict | None = None, datasets=(), chunk_count: int = 0, chunk_size: int = 0) -> Imatrix:
        """The collected sums as an Imatrix (GGUF-format semantics: counts are tokens). names maps the collected
        (checkpoint) names to GGUF names; entries it does not name are dropped (None: names kept as they are)."""
        out = Imatrix(datasets=list(datasets), chunk_count=chunk_count, chunk_size=chunk_size)
        for name, s in self.sums.items():
            gname = name if names is None else names.get(name)
            if gname is None:
                continue
            out.sums[gname] = s.to(torch.float32).numpy()
            out.counts[gname] = self.tokens[name]
        return out


def importance_by_checkpoint_name(im: Imatrix, names: dict) -> dict:
    """{checkpoint tensor name: torch float32 [cols]} for the entries of `im`, `names` mapping checkpoint -> GGUF."""
    imp = im.importance
    return {hf: torch.from_numpy(imp[g]) for hf, g in names.items() if g in imp}
