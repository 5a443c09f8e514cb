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
import numpy as np

from .ggml_types import NEEDS_IMPORTANCE
from .plan import DEFAULT_GROUP_SIZE, TORCH_PRECISIONS, estimated_bytes, fits

GRANULARITIES = ("block", "matrix")
TORCH_MENU = TORCH_PRECISIONS[1:]  # what the torch executors can lower a matrix to, largest first


def plan_items(blocks, granularity: str = "block", other: dict | None = None) -> list:
    """What a size-targeted plan gives a precision to: whole blocks, or every matrix of every block; plus the
    embeddings/head in `other` ({name: [out, in]}: llama.cpp plans quantize them too; `block` None)."""
    if granularity == "block":
        items = [{"block": b.get("index", i), "matrix": None, "params": b["params"], "rows": b["rows"],
                  "shapes": list((b.get("shapes") or {}).values())} for i, b in enumerate(blocks)]
    else:
        items = [{"block": b["index"], "matrix": name, "params": o * i, "rows": o, "shapes": [[o, i]]}
                 for b in blocks for name, (o, i) in b["shapes"].items()]
    return items + [{"block": None, "matrix": name, "params": o * i, "rows": o, "shapes": [[o, i]]}
                    for name, (o, i) in (other or {}).items()]


def item_takes(item, precision: str) -> bool:
    """Whether an item can take a precision: every matrix of it fits the format's blocks, and a format rounded only
    with an importance matrix (IQ2_XS) goes to the blocks' matrices alone (the importance EWQ collects, and the
    imatrix files llama.cpp writes, have no entry for the token embeddings)."""
    if precision in NEEDS_IMPORTANCE and item["block"] is None:
        return False
    return all(fits(precision, shape) for shape in item.get("shapes", []))


def item_sizes(items, group_size: int = DEFAULT_GROUP_SIZE, raw_bits: int = 16, menu=TORCH_MENU) -> list:
    """Bytes of each item per precision it can take: raw and every menu precision it takes (item_takes)."""
    return [{p: estimated_bytes(it["params"], it["rows"], p, group_size, raw_bits)
             for p in ("raw",) + tuple(menu) if item_takes(it, p)} for it in items]


def block_sizes(blocks, group_size: int = DEFAULT_GROUP_SIZE, raw_bits: int = 16) -> list:
    return item_sizes(plan_items(blocks), group_size, raw_bits)


def write_precisions(blocks, items, precisions, other: dict | None = None) -> None:
    """Put the chosen precisions into the plan's blocks (and its `other` section's `matrices`). Per matrix: the
    block's `precision` is the one most of its matrices have (ties: the larger format), the others are listed in
    `matrices`."""
    by_block = {}
    for it, p in zip(items, precisions):
        by_block.setdefault(it["block"], []).append((it["matrix"], p))
    if None in by_block:
        other["matrices"] = dict(by_block[None])
    for b in blocks:
        chosen = by_block[b["index"]]
        if chosen[0][0] is None:
            b["precision"] = chosen[0][1]
            b.pop("matrices", None)
            continue
        tally = Counter(p for _, p in chosen)
        size = {p: estimated_bytes(1 << 20, 1, p) for p in tally}  # larger format first on ties
        b["precision"] = max(tally, key=lambda p: (tally[p], size[p]))
        overrides = {m: p for m, p in chosen if p != b["precision"]}
        if overrides:
            b["matrices"] = overrides
        else:
            b.pop("matrices", None)


def random_allocation(sizes, budget: float, seed: int, levels=TORCH_MENU) -> list:
    """A random plan that fits: lower items in a random order, as ordered_allocation does."""
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    return ordered_allocation(order, sizes, budget, levels)


def budget_bytes(blocks, other_params: int, target_bits=None, max_weight_gb=None,
                 group_size: int = DEFAULT_GROUP_SIZE, usable=TORCH_MENU, backend: str = "",
                 raw_bits: int = 16, items=None) -> float:
    """Bytes the planned items (default: the blocks) may take. `target_bits` counts the blocks' weights;
    `max_weight_gb` the whole model, with what the plan does not cover at `raw_bits`. Refuses a target that even
    the smallest plan the `usable` precisions allow cannot meet."""
    if (target_bits is None) == (max_weight_gb is None):
        raise EWQError("give exactly one size target: --target-bits or --max-weight-gb")
    items = items if items is not None else plan_items(blocks)
    params = sum(it["params"] for it in items)  # the blocks' weights (and the embeddings/head a plan covers)
    sizes = item_sizes(items, group_size, raw_bits, usable)
    smallest = sum(min(s[p] for p in s if p != "raw") if len(s) > 1 else s["raw"] for s in sizes)
    lowest = usable[-1] if len(usable) == 1 or "4-bit" not in usable else "4-bit"
    planned_other = sum(it["params"] for it in items if it["block"] is None)
    if target_bits is not None:
        if not target_bits > 0:
            raise EWQError(f"--target-bits must be positive, got {target_bits}")
        budget = target_bits / 8 * params
    else:
        if not max_weight_gb > 0:
            raise EWQError(f"--max-weight-gb must be positive, got {max_weight_gb}")
        budget = max_weight_gb * 1e9 - raw_bits / 8 * (other_params - planned_other)
    if budget < smallest:
        why = f" (the {backend} backend has no 4-bit)" if lowest == "8-bit" and "4-bit" not in usable else ""
        kind = f"every block {lowest}{why}" if set(usable) <= set(TORCH_MENU) else "every matrix in its smallest format"
        raise EWQError(f"the size target cannot be met: the smallest reachable plan ({kind}, scales "
                       f"included) has {8 * smallest / params:.3f} bits per weight, "
                       f"{(smallest + raw_bits / 8 * (other_params - planned_other)) / 1e9:.3f} GB for the whole "
                       f"model; ask for at least that")
    return budget


def optimal_allocation(costs, sizes, budget: float) -> list:
    """Exact minimum of sum(costs[i][p_i]) with sum(sizes[i][p_i]) <= budget. costs/sizes: per item
    {precision: x}, over the precisions that item can take. A dynamic programme over the items that keeps only
    Pareto-optimal (bytes, cost) partial plans, vectorised with numpy (a menu of six formats over 200 matrices
    keeps tens of thousands of states)."""
    n = len(sizes)
    min_rest = np.zeros(n + 1)
    for i in range(n - 1, -1, -1):
        min_rest[i] = min_rest[i + 1] + min(sizes[i].values())
    nbytes, cost = np.zeros(1), np.zeros(1)
    steps = []  # per item: (index of the earlier partial plan, precision) of every kept state
    for i in range(n):
        options = list(sizes[i])
        grown_bytes = (nbytes[:, None] + np.array([sizes[i][p] for p in options])[None, :]).ravel()
        grown_cost = (cost[:, None] + np.array([costs[i][p] for p in options], dtype=float)[None, :]).ravel()
        parent = np.repeat(np.arange(len(nbytes)), len(options))
        option = np.tile(np.arange(len(options)), len(nbytes))
        fits = grown_bytes + min_rest[i + 1] <= budget
        order = np.lexsort((grown_cost[fits], grown_bytes[fits]))  # by bytes, then cost (stable)
        grown_bytes, grown_cost = grown_bytes[fits][order], grown_cost[fits][order]
        parent, option = parent[fits][order], option[fits][order]
        best_before = np.minimum.accumulate(np.concatenate(([np.inf], grown_cost[:-1])))
        keep = grown_cost < best_before  # the Pareto frontier: more bytes must buy strictly lower cost
        nbytes, cost = grown_bytes[keep], grown_cost[keep]
        steps.append((parent[keep], [options[k] for k in option[keep]]))
        if not len(nbytes):
            raise EWQError("no plan fits the size target")
    chosen, state = [], int(np.argmin(cost))
    for parents, precisions in reversed(steps):
        chosen.append(precisions[state])
        state = int(parents[state])
    return chosen[::-1]


def timed_allocation(costs, sizes, budget: float, times, time_budget: float) -> list:
    """optimal_allocation with a second limit: sum(times[i][p_i]) <= time_budget as well (the decode time a
    llama.cpp plan may take by ewq.backends.llamacpp.DECODE_COST). Lagrangian relaxation: the exact byte-limited DP
    on cost + lam x time, with lam the smallest (bisected) that meets the time limit. Within both limits always;
    optimal for the two together up to the duality gap (a plan between two lam's breakpoints is not seen).
    Refuses, in one line, a time limit no plan within the bytes meets."""
    def plan(lam):
        return optimal_allocation([{p: c[p] + lam * t[p] for p in c} for c, t in zip(costs, times)], sizes, budget)

    def time_of(chosen):
        return sum(t[p] for t, p in zip(times, chosen))

    chosen = plan(0.0)
    if time_of(chosen) <= time_budget:
        return chosen
    finite = [v for c in costs for v in c.values() if np.isfinite(v)]
    # a lam at which a whole plan's cost weighs as much as its time is a natural scale to start from
    hi = max(sum(finite), 1e-12) / max(time_budget, 1e-12)
    for _ in range(60):
        fastest = plan(hi)
        if time_of(fastest) <= time_budget:
            break
        hi *= 4
    else:
        raise EWQError(f"no plan within the size target decodes within the time limit (fastest: "
                       f"{time_of(fastest) / time_budget:.3f}x the limit); drop the speed limit or add faster formats")
    lo = hi / 4 ** 8
    if time_of(candidate := plan(lo)) <= time_budget:
        hi, fastest, lo = lo, candidate, 0.0
    for _ in range(24):  # lam in (lo, hi]: the plan at hi meets the limit, the one at lo does not
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 2
        if time_of(candidate := plan(mid)) <= time_budget:
            hi, fastest = mid, candidate
        else:
            lo = mid
    return fastest


def ordered_allocation(order, sizes, budget: float, levels=TORCH_MENU) -> list:
    """Lower items in `order`, first all to the first level (8-bit), then to the next (4-bit), ..., until the
    total fits the budget. An item skips a level it cannot take or that would not make it smaller."""
    precisions = ["raw"] * len(sizes)
    total = sum(s["raw"] for s in sizes)
    for level in levels:
        for i in order:
            if total <= budget:
                return precisions
            if level not in sizes[i] or sizes[i][level] >= sizes[i][precisions[i]]:
                continue
            total += sizes[i][level] - sizes[i][precisions[i]]
            precisions[i] = level
    if total > budget:
        raise EWQError("no plan fits the size target")
    return precisions


def position_order(n: int) -> list:
    """Middle blocks first; the first and last blocks last (they keep the most bits)."""
    return sorted(range(n), key=lambda i: (-min(i, n - 1 - i), i))
