"""A model that never exists whole: its skeleton on the meta device, its blocks read from the checkpoint one at a time.

What the sensitivity sweep needs of a model is a function from a block's input to its output, block after block,
plus what comes before the blocks (embeddings) and after them (final norm, head, pooling). `StreamedModel` gives
exactly that, holding at any moment:
  * the skeleton (transformers' own classes, built on the meta device from config.json: no weight);
  * the small tensors outside the blocks (norms, position tables, a BERT pooler), in the run dtype;
  * the token embeddings as the rows the calibration text uses (its token ids are renumbered to those rows), so an
    8B model's 128k-row table is never materialised;
  * the output head as a view of the memory-mapped checkpoint, multiplied chunk by chunk in the run dtype
    (`ChunkedHead`), in both directions of autograd;
  * the blocks materialised now (`block(i)`): one in use, plus recently used ones while they fit `cache_bytes`.
Tensors are read from the checkpoint's safetensors through a memory map (`mapped`): pages are the file's, shared and
dropped by the kernel under pressure; only what is converted to the run dtype is owned by the process.

The inputs each block receives besides the hidden states (attention masks, rotary tables, position ids) depend on
positions only, never on the hidden states' values: `capture` runs the model's own forward once with every block
replaced by a recorder that keeps them and passes the hidden states through. `finish` runs the model's forward again
with the blocks replaced by a replay of given final hidden states, so whatever the architecture does after its blocks
(final norm, head, soft-capping) is done by its own code.
"""

import functools
import mmap
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .apply import block_list, empty_model, release_freed_memory
from .common import EWQError

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
HEAD_CHUNK_ROWS = 8192  # rows of the output head converted at a time (8192 x 4096 fp32: 128 MB)
CACHE_BYTES = 512 << 20  # float blocks kept materialised beside the one in use (the exact sweep revisits them)


@functools.lru_cache(maxsize=None)
def _mapped_file(file) -> tuple:
    """(header, memory map, header length) of one safetensors file: parsed and mapped once, however many of its tensors
    are read (a block's dozen tensors, every block)."""
    from .checkpoint import read_header

    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return read_header(file), mm, n


def mapped(info) -> torch.Tensor:
    """A checkpoint tensor (checkpoint.TensorInfo) as a view of its memory-mapped file: nothing is read or copied
    until used. Copy-on-write mapping: torch wants a writable buffer; nothing writes to it."""
    headers, mm, n = _mapped_file(info.file)
    header = headers[info.name]
    start, end = header["data_offsets"]
    dtype = SAFETENSORS_DTYPES.get(header["dtype"])
    if dtype is None:
        raise EWQError(f"{info.file}: tensor {info.name} has dtype {header['dtype']}, which EWQ cannot read")
    count = (end - start) // torch.empty(0, dtype=dtype).element_size()
    flat = torch.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + start) if count else torch.empty(0, dtype=dtype)
    return flat.view(header["shape"])


def in_threads(fn, items, workers: int | None = None):
    """fn(item) for every item, yielded in order, computed up to `workers` (default: torch's thread count) at a time
    in threads, each with one torch thread: ggml's k-quant searches and HQQ are thousands of small tensor ops that keep
    one core busy and release the interpreter while they run. At most `workers` results wait unread (memory)."""
    items = list(items)
    workers = min(workers or torch.get_num_threads(), len(items))
    if workers <= 1:
        yield from map(fn, items)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            ahead, pending = iter(items), deque()

            def submit():
                item = next(ahead, None)
                if item is not None:
                    pending.append(pool.submit(fn, item))

            for _ in range(workers):
                submit()
            while pending:
                result = pending.popleft().result()
                submit()
                yield result
    finally:
        torch.set_num_threads(threads)


class _ChunkedMatmul(torch.autograd.Function):
    """x @ W.T with W's rows produced chunk by chunk (head.rows(a, b): read from the mapped checkpoint, converted, and
    rounded when a format is being tried); the backward produces them again, so no converted copy of W is kept."""

    @staticmethod
    def forward(ctx, x, head):
        ctx.head = head
        return torch.cat([x @ rows.T for rows in head.chunks()], dim=-1)

    @staticmethod
    def backward(ctx, grad):
        out = None
        for a, rows in zip(range(0, ctx.head.out_features, HEAD_CHUNK_ROWS), ctx.head.chunks()):
            part = grad[..., a:a + HEAD_CHUNK_ROWS] @ rows
            out = part if out is None else out + part
        return out, None


class ChunkedHead(nn.Module):
    """An output head (lm_head) over a mapped weight: logits in the run dtype, the weight never converted whole.
    `transform` (rows -> rows), when set, is applied to every chunk: a row-wise format's round trip (ggml formats
    quantize each row on its own, so rounding chunk by chunk is rounding the whole); `round_input` (x -> x), when
    set, to the input first: the rounding of the activations a quantized format's kernel does (llama.cpp's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        self.weight_rows, self.bias_values, self.dtype, self.device, self.transform = weight, bias, dtype, device, None
        self.round_input = None
        self.out_features = weight.shape[0]

    def rows(self, a: int, b: int) -> torch.Tensor:
        rows = self.weight_rows[a:b]
        return (rows if self.transform is None else self.transform(rows)).to(device=self.device, dtype=self.dtype)

    def chunks(self):
        """The weight's rows, HEAD_CHUNK_ROWS at a time (rounded in threads when a format is being tried)."""
        starts = range(0, self.out_features, HEAD_CHUNK_ROWS)
        rows = lambda a: self.rows(a, a + HEAD_CHUNK_ROWS)  # noqa: E731
        return in_threads(rows, starts) if self.transform is not None else map(rows, starts)

    def forward(self, x):
        if self.round_input is not None:
            x = self.round_input(x.float())
        out = _ChunkedMatmul.apply(x.to(self.dtype), self)
        return out if self.bias_values is None else out + self.bias_values.to(self.dtype)


class _Recorder(nn.Module):
    """Stands in for block `index` during `capture`: keeps the extra inputs it is called with, passes the hidden
    states through unchanged."""

    def __init__(self, store: list, index: int):
        super().__init__()
        self.store, self.index = store, index

    def forward(self, hidden, *args, **kwargs):
        self.store[self.index] = (args, kwargs)
        return hidden


class _Replay(nn.Module):
    """Stands in for the blocks during `finish`: the first returns the given final hidden states, the others pass them
    through."""

    def __init__(self, box: dict, first: bool):
        super().__init__()
        self.box, self.first = box, first

    def forward(self, hidden, *args, **kwargs):
        return self.box["hidden"] if self.first else hidden


class StreamedModel:
    """See the module docstring. `batches`: the model inputs (dicts of tensors), all known up front: the token
    embeddings are materialised for exactly the tokens they use."""

    def __init__(self, path, ckpt, dtype: torch.dtype, kind: str, batches: list, device: str = "cpu",
                 cache_bytes: int = CACHE_BYTES):
        self.ckpt, self.dtype, self.kind, self.device, self.cache_bytes = ckpt, dtype, kind, device, cache_bytes
        self.skeleton = empty_model(path, dtype, kind).eval()  # eval: no dropout (GPT-2 has it before its blocks)
        self.blocks = block_list(self.skeleton, ckpt.block_prefix)
        self.originals = list(self.blocks)  # the skeleton's blocks (meta), materialised in place by block()
        self.block_names = self._block_tensor_names()
        self._cache = OrderedDict()
        self._materialise_others()
        self.batches = self._renumbered(batches)

    # ---- reading the checkpoint ----

    def _checkpoint_tensor(self, name: str, within=None):
        """The TensorInfo whose name is `name`, or ends with '.name' (a BERT checkpoint's 'bert.' prefix)."""
        pool = within if within is not None else self.ckpt.other
        for t in pool:
            if t.name == name or t.name.endswith("." + name):
                return t
        return None

    def _block_tensor_names(self) -> list:
        """{name within the block: TensorInfo} for every block of the checkpoint."""
        out = []
        for block in self.ckpt.blocks:
            prefix = f"{self.ckpt.block_prefix}.{block.index}."
            out.append({t.name[len(prefix):]: t for t in block.matrices + block.others})
        return out

    def _read(self, info) -> torch.Tensor:
        t = mapped(info)
        return t.to(device=self.device, dtype=self.dtype) if t.is_floating_point() else t.to(self.device, copy=True)

    def _materialise_others(self):
        """Everything outside the blocks, but the token embeddings (rows, in _renumbered) and the output head."""
        model = self.skeleton
        self.embedding = model.get_input_embeddings()
        head = model.get_output_embeddings() if self.kind == "decoder" else None
        skip = {id(self.embedding.weight)} | ({id(head.weight)} if head is not None else set())
        block_params = {id(p) for b in self.blocks for p in b.parameters()}
        block_buffers = {id(b) for blk in self.blocks for b in blk.buffers()}
        for name, p in list(model.named_parameters(remove_duplicate=False)):
            if id(p) in skip or id(p) in block_params:
                continue
            info = self._checkpoint_tensor(name)
            if info is None and self.kind == "decoder":
                raise EWQError(f"{self.ckpt.path} has no tensor for {name}; the checkpoint does not fit its config")
            # an encoder saved without its pooler (a masked-LM checkpoint): transformers would initialise it at random;
            # the sentence embedding is pooled from the last hidden states and never reads it
            value = self._read(info) if info is not None else torch.zeros(p.shape, dtype=self.dtype, device=self.device)
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, nn.Parameter(value, requires_grad=False))
        for name, b in list(model.named_buffers()):
            if id(b) in block_buffers:
                continue
            if not b.is_meta:
                continue  # computed by the model itself (rotary tables, position ids): keep it
            module, _, attr = name.rpartition(".")
            info = self._checkpoint_tensor(name)
            if info is None:
                raise EWQError(f"{self.ckpt.path} has no tensor for buffer {name}")
            model.get_submodule(module).register_buffer(attr, self._read(info), persistent=False)
        if head is not None:
            self.head_info = info = self._head_info(head)
            bias = getattr(head, "bias", None)
            head_bias = self._read(self._checkpoint_tensor(self._name_of(bias))) if bias is not None else None
            self.head = ChunkedHead(mapped(info), head_bias, self.dtype, self.device)
            model.set_output_embeddings(self.head)
        else:
            self.head = self.head_info = None
        self.embedding_info = self._checkpoint_tensor(self._name_of(self.embedding.weight))
        if self.embedding_info is None:
            raise EWQError(f"{self.ckpt.path} has no token embeddings for {self._name_of(self.embedding.weight)}")

    def _name_of(self, tensor) -> str:
        return next(n for n, p in self.skeleton.named_parameters(remove_duplicate=False) if p is tensor)

    def _head_info(self, head):
        """The output head's weights: its own tensor, or the token embeddings when the model ties them."""
        info = self._checkpoint_tensor(self._name_of(head.weight))
        if info is None and head.weight is self.embedding.weight or info is None and \
                self.skeleton.config.get_text_config().tie_word_embeddings:
            info = self._checkpoint_tensor(self._name_of(self.embedding.weight))
        if info is None:
            raise EWQError(f"{self.ckpt.path} has no output head ({self._name_of(head.weight)})")
        return info

    def _renumbered(self, batches: list) -> list:
        """The batches with token ids renumbered to rows of a small embedding table holding only the tokens used."""
        ids = torch.cat([b["input_ids"].flatten() for b in batches])
        self.token_ids = torch.unique(ids)
        table = mapped(self.embedding_info)
        if int(self.token_ids.max()) >= table.shape[0]:
            raise EWQError(f"token id {int(self.token_ids.max())} is outside the embedding table ({table.shape[0]} rows)")
        self.embedding.weight = nn.Parameter(table[self.token_ids].to(device=self.device, dtype=self.dtype),
                                             requires_grad=False)
        lookup = torch.full((int(self.token_ids.max()) + 1,), -1, dtype=torch.long)
        lookup[self.token_ids] = torch.arange(len(self.token_ids))
        return [{**b, "input_ids": lookup[b["input_ids"]]} for b in batches]

    # ---- blocks ----

    def block_bytes(self, i: int) -> int:
        return sum(t.numel for t in self.block_names[i].values()) * torch.empty(0, dtype=self.dtype).element_size()

    def block(self, i: int) -> nn.Module:
        """Block i with its float weights, read from the checkpoint (or still held from an earlier call)."""
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        block = self.originals[i]
        tensors = self.block_names[i]
        for name, p in list(block.named_parameters()):
            info = tensors.get(name)
            if info is None:
                raise EWQError(f"{self.ckpt.path} has no tensor for {self.ckpt.block_prefix}.{i}.{name}")
            module, _, attr = name.rpartition(".")
            owner = block.get_submodule(module) if module else block
            setattr(owner, attr, nn.Parameter(self._read(info), requires_grad=False))
        for name, b in list(block.named_buffers()):
            if b.is_meta:
                module, _, attr = name.rpartition(".")
                owner = block.get_submodule(module) if module else block
                owner.register_buffer(attr, self._read(tensors[name]), persistent=False)
        block.eval()
        self._cache[i] = block
        while len(self._cache) > 1 and sum(self.block_bytes(j) for j in self._cache) > self.cache_bytes + self.block_bytes(i):
            self._drop(next(iter(self._cache)))
        return block

    def _drop(self, i: int):
        block = self._cache.pop(i)
        for name, p in list(block.named_parameters()):
            module, _, attr = name.rpartition(".")
            owner = block.get_submodule(module) if module else block
            setattr(owner, attr, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
        release_freed_memory(self.block_bytes(i))

    def release(self):
        """Drop every materialised block."""
        for i in list(self._cache):
            self._drop(i)

    def run_block(self, i: int, hidden: torch.Tensor, b: int) -> torch.Tensor:
        """Block i (as it is now: float, or with some layers swapped) on batch b's hidden states."""
        args, kwargs = self.extra[i][b]
        out = self.blocks[i](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # ---- before and after the blocks ----

    def _forward(self, batch: dict):
        kwargs = {"use_cache": False} if self.kind == "decoder" else {}
        return self.skeleton(**{k: v.to(self.device) for k, v in batch.items()}, **kwargs)

    def capture(self, on_embeddings=None) -> list:
        """Each batch's input to the first block; records every block's extra inputs per batch (self.extra).
        on_embeddings(output): called with the token embeddings' output of each batch (the Fisher sweep roots its
        graph there); the returned hidden states are then part of that graph."""
        n = len(self.blocks)
        self.extra = [[None] * len(self.batches) for _ in range(n)]
        first = []
        stores = [[None] for _ in range(n)]
        for i in range(n):
            self.blocks[i] = _Recorder(stores[i], 0)
        catcher = {}

        def keep_input(module, args, kwargs):
            catcher["hidden"] = args[0] if args else kwargs["hidden_states"]

        handle = self.blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True)
        hooks = [handle]
        if on_embeddings is not None:
            hooks.append(self.embedding.register_forward_hook(lambda m, a, out: on_embeddings(out)))
        try:
            for b, batch in enumerate(self.batches):
                with torch.set_grad_enabled(on_embeddings is not None):
                    self._forward(batch)
                first.append(catcher.pop("hidden"))
                for i in range(n):
                    self.extra[i][b] = stores[i][0]
        finally:
            for h in hooks:
                h.remove()
            for i in range(n):
                self.blocks[i] = self.originals[i]
        return first

    def finish(self, b: int, hidden: torch.Tensor):
        """The model's output for batch b from its final hidden states: logits [B, T, V] for a decoder, the last
        hidden states (after whatever the encoder does after its blocks) for an encoder."""
        box = {"hidden": hidden}
        for i in range(len(self.blocks)):
            self.blocks[i] = _Replay(box, i == 0)
        try:
            out = self._forward(self.batches[b])
        finally:
            for i in range(len(self.blocks)):
                self.blocks[i] = self.originals[i]
        return out.logits if self.kind == "decoder" else out.last_hidden_state
