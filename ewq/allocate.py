"""Size-targeted plans: choose raw / 8-bit / 4-bit per block so the blocks fit a size target.

Targets: `--target-bits B` (average bits per weight over the blocks' matrices) or `--max-weight-gb G`
(the whole model: blocks plus the unquantized embeddings, norms and lm_head at 16 bits). Sizes are
the plan's estimates (plan.estimated_bytes). The chosen plan never exceeds the target; a target
below the all-4-bit size is refused with the smallest reachable size.

Two allocators:
  * `optimal_allocation` (method "sensitivity"): minimise the summed measured cost (the KL each block
    causes when it alone is quantized; treating the blocks' damage as additive is the one modelling
    assumption) subject to the byte budget. Exact: a dynamic programme over the blocks that keeps
    only Pareto-optimal (bytes, cost) partial plans; a partial plan that cannot fit even with every
    remaining block at 4-bit is dropped. With few distinct block sizes the frontier stays small
    (30 identical blocks: at most 496 states).
  * `ordered_allocation` (methods "entropy" and "position"): walk the blocks in a fixed order and
    lower them one at a time, first all to 8-bit, then to 4-bit, until the plan fits. For entropy the
    order is lowest entropy first ("quantize the lowest-entropy blocks hardest"); for position it is
    middle blocks first, so the first and last blocks keep the most bits (llama.cpp's rule of thumb).
"""

import random
from collections import Counter

from .common import EWQError
from .plan import DEFAULT_GROUP_SIZE, PRECISIONS, estimated_bytes

GRANULARITIES = ("block", "matrix")


def plan_items(blocks, granularity: str = "block") -> list:
    """What a size-targeted plan gives a precision to: whole blocks, or every matrix of every block."""
    if granularity == "block":
        return [{"block": b.get("index", i), "matrix": None, "params": b["params"], "rows": b["rows"]} for i, b in enumerate(blocks)]
    return [{"block": b["index"], "matrix": name, "params": o * i, "rows": o}
            for b in blocks for name, (o, i) in b["shapes"].items()]


def item_sizes(items, group_size: int = DEFAULT_GROUP_SIZE, raw_bits: int = 16) -> list:
    return [{p: estimated_bytes(it["params"], it["rows"], p, group_size, raw_bits) for p in PRECISIONS} for it in items]


def block_sizes(blocks, group_size: int = DEFAULT_GROUP_SIZE, raw_bits: int = 16) -> list:
    return item_sizes(plan_items(blocks), group_size, raw_bits)


def write_precisions(blocks, items, precisions) -> None:
    """Put the chosen precisions into the plan's blocks. Per matrix: the block's `precision` is the one most
    of its matrices have (ties: the higher precision), and the others are listed in `matrices`."""
    by_block = {}
    for it, p in zip(items, precisions):
        by_block.setdefault(it["block"], []).append((it["matrix"], p))
    for b in blocks:
        chosen = by_block[b["index"]]
        if chosen[0][0] is None:
            b["precision"] = chosen[0][1]
            b.pop("matrices", None)
            continue
        tally = Counter(p for _, p in chosen)
        b["precision"] = max(PRECISIONS, key=lambda p: (tally[p], -PRECISIONS.index(p)))
        overrides = {m: p for m, p in chosen if p != b["precision"]}
        if overrides:
            b["matrices"] = overrides
        else:
            b.pop("matrices", None)


def random_allocation(sizes, budget: float, seed: int) -> list:
    """A random plan that fits: lower items in a random order, as ordered_allocation does."""
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    return ordered_allocation(order, sizes, budget)


def budget_bytes(blocks, other_params: int, target_bits=None, max_weight_gb=None,
                 group_size: int = DEFAULT_GROUP_SIZE, usable=("8-bit", "4-bit"), backend: str = "",
                 raw_bits: int = 16) -> float:
    """Bytes the blocks may take. Refuses a target that even the smallest plan the `usable` precisions allow
    cannot meet (every block 4-bit; every block 8-bit for an executor without 4-bit)."""
    if (target_bits is None) == (max_weight_gb is None):
        raise EWQError("give exactly one size target: --target-bits or --max-weight-gb")
    params = sum(b["params"] for b in blocks)
    lowest = "4-bit" if "4-bit" in usable else "8-bit"
    smallest = sum(s[lowest] for s in block_sizes(blocks, group_size))
    if target_bits is not None:
        if not target_bits > 0:
            raise EWQError(f"--target-bits must be positive, got {target_bits}")
        budget = target_bits / 8 * params
    else:
        if not max_weight_gb > 0:
            raise EWQError(f"--max-weight-gb must be positive, got {max_weight_gb}")
        budget = max_weight_gb * 1e9 - raw_bits / 8 * other_params
    if budget < smallest:
        why = f" (the {backend} backend has no 4-bit)" if lowest == "8-bit" else ""
        raise EWQError(f"the size target cannot be met: the smallest reachable plan (every block {lowest}{why}, scales "
                       f"included) has {8 * smallest / params:.3f} bits per weight, "
                       f"{(smallest + raw_bits / 8 * other_params) / 1e9:.3f} GB for the whole model; ask for at least that")
    return budget


def optimal_allocation(costs, sizes, budget: float) -> list:
    """Exact minimum of sum(costs[i][p_i]) with sum(sizes[i][p_i]) <= budget. costs/sizes: per block {precision: x}."""
    n = len(sizes)
    min_rest = [0.0] * (n + 1)
    for i in range(n - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + min(sizes[i].values())
    states = [(0.0, 0.0, None)]  # (bytes so far, cost so far, (precision, earlier choices) linked backwards)
    for i in range(n):
        grown = [(b + sizes[i][p], c + costs[i][p], (p, ch)) for b, c, ch in states for p in PRECISIONS
                 if b + sizes[i][p] + min_rest[i + 1] <= budget]
        grown.sort(key=lambda s: (s[0], s[1]))
        states, best = [], float("inf")
        for s in grown:  # keep the Pareto frontier: more bytes must buy strictly lower cost
            if s[1] < best:
                states.append(s)
                best = s[1]
    if not states:
        raise EWQError("no plan fits the size target")
    chosen, link = [], min(states, key=lambda s: s[1])[2]
    while link is not None:
        chosen.append(link[0])
        link = link[1]
    return chosen[::-1]


def ordered_allocation(order, sizes, budget: float) -> list:
    """Lower blocks in `order`, first to 8-bit, then to 4-bit, until the total fits the budget."""
    precisions = ["raw"] * len(sizes)
    total = sum(s["raw"] for s in sizes)
    for level in ("8-bit", "4-bit"):
        for i in order:
            if total <= budget:
                return precisions
            total += sizes[i][level] - sizes[i][precisions[i]]
            precisions[i] = level
    if total > budget:
        raise EWQError("no plan fits the size target")
    return precisions


def position_order(n: int) -> list:
    """Middle blocks first; the first and last blocks last (they keep the most bits)."""
    return sorted(range(n), key=lambda i: (-min(i, n - 1 - i), i))
