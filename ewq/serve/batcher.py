"""How inputs become forward passes: splits by length (`length_groups`, `length_chunks`) and the Batcher that
gathers concurrent requests onto the one model worker."""

import asyncio
import collections
import dataclasses
import time


PASS_COST_TOKENS = 16  # what one forward pass costs beyond its tokens, in tokens (MiniLM-L6, CPU: see length_groups)


def length_groups(lengths: list, pass_cost: int = PASS_COST_TOKENS) -> list:
    """Split a batch into forward passes of similar lengths: the split (of the length-sorted inputs) that minimises
    padded tokens + pass_cost per pass. A padded pass costs its longest input times its size; a pass also costs
    something of its own (dispatch, small matrices). Measured on MiniLM-L6 with one thread, corpus sentences of
    ~25 tokens: one at a time 35 sentences/s, batches of 32 in arrival order 33 (padding), of 8 sorted by length
    54; a pass's own cost came to ~14 tokens. Exact dynamic programming, O(n^2) for n inputs."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ordered = [lengths[i] for i in order]
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # a pass over ordered[i:j], padded to ordered[j - 1]
            cost = best[i] + pass_cost + (j - i) * ordered[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def length_chunks(items: list, size: int) -> list:
    """Index chunks of at most `size`, shortest items together: a padded batch wastes less on padding."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]))
    return [order[s:s + size] for s in range(0, len(order), size)]


class Overloaded(Exception):
    """More than max_queue inputs would be waiting: answer 429 with Retry-After."""


class Closed(Exception):
    """The server is shutting down: no new work."""


@dataclasses.dataclass(eq=False)
class _Job:
    items: list
    future: asyncio.Future
    enqueued: float


class Batcher:
    """Gathers embedding requests into forward passes on one worker thread.

    One asyncio task (the collector) takes the first waiting job, then, where the model allows requests to share a
    forward pass (`cross_request`), more jobs until max_batch inputs are gathered or max_wait has passed; it runs
    `run(inputs)` on the worker thread and hands each job its rows. While a batch runs, the next one gathers in the
    queue, so under load batches fill by themselves and the wait costs nothing. Without `cross_request` every
    forward pass holds one job, i.e. one request's inputs only.
    """

    def __init__(self, run, executor, *, max_batch: int, max_wait_s: float, max_queue: int, cross_request: bool,
                 metrics: dict):
        self.run, self.executor, self.metrics = run, executor, metrics
        self.max_batch, self.max_wait, self.max_queue, self.cross = max_batch, max_wait_s, max_queue, cross_request
        self.in_flight = 0  # inputs of requests accepted and not yet answered (what max_queue bounds)
        self.closing = False
        self._arrivals = 0     # chunks enqueued so far
        self._company = True   # did the last batch have company (so the next one may wait for some)?
        self._jobs = collections.deque()
        self._arrived = None
        self._task = None

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="ewq-batcher")

    async def submit(self, items: list) -> list:
        """Rows for `items` (in their order). A request larger than max_batch is cut into chunks, shortest inputs
        together, enqueued one after the other: other requests get their turn between them, and a request withdrawn
        (its task cancelled: timeout, client gone) never enqueues the rest; a queued chunk is dropped unrun."""
        if self.closing:
            raise Closed()
        if self.in_flight + len(items) > self.max_queue:
            raise Overloaded()
        self.in_flight += len(items)
        self.metrics["in_flight"].set(self.in_flight)
        try:
            out = [None] * len(items)
            for chunk in length_chunks(items, self.max_batch):
                for i, row in zip(chunk, await self._enqueue([items[i] for i in chunk])):
                    out[i] = row
            return out
        finally:
            self.in_flight -= len(items)
            self.metrics["in_flight"].set(self.in_flight)

    async def _enqueue(self, items: list) -> list:
        job = _Job(items, asyncio.get_running_loop().create_future(), time.perf_counter())
        self._jobs.append(job)
        self._arrivals += 1
        self._arrived.set()
        try:
            return await job.future
        finally:
            if not job.future.done():  # withdrawn: the collector drops it
                job.future.cancel()

    def _next_live(self):
        while self._jobs and self._jobs[0].future.done():  # withdrawn before its turn
            self._jobs.popleft()
            self.metrics["dropped"].inc()
        return self._jobs[0] if self._jobs else None

    def _waiting(self) -> int:
        return sum(len(j.items) for j in self._jobs if not j.future.done())

    async def _wait_for(self, ready, timeout=None) -> None:
        """Until ready() (checked at every arrival) or `timeout` seconds have passed."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not ready():
            self._arrived.clear()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _take_neighbours(self, first: _Job, room: int) -> list:
        """Waiting jobs closest in length to `first` (the oldest), up to `room` inputs. A padded batch costs its
        longest input times its size, so a batch of similar lengths wastes little: on MiniLM with one thread,
        batches of 8 corpus sentences ran at 54 sentences/s sorted by length, 40 in arrival order, 35 one at a
        time. The oldest job always goes first, so no job waits for more than the batches ahead of it."""
        def length(job):
            return max(map(len, job.items))

        target, chosen = length(first), []
        for job in sorted((j for j in self._jobs if not j.future.done()),
                          key=lambda j: (abs(length(j) - target), j.enqueued)):
            if len(job.items) <= room:
                chosen.append(job)
                room -= len(job.items)
                if not room:
                    break
        picked = set(map(id, chosen))
        self._jobs = collections.deque(j for j in self._jobs if id(j) not in picked)
        return chosen

    async def _collect(self) -> None:
        while True:
            await self._wait_for(lambda: self._next_live() is not None)
            jobs, seen = [self._jobs.popleft()], self._arrivals
            n = len(jobs[0].items)
            if self.cross and n < self.max_batch:
                # company: whatever is waiting already (under load, what gathered while the last batch ran), and
                # what arrives within max_wait, if the last batch had company: requests that come one at a time
                # (one client) would only lose max_wait each, plus the wake-up of a sleeping thread on a busy machine
                room = self.max_batch - n
                if self._company:
                    await self._wait_for(lambda room=room: self._waiting() >= room, self.max_wait)
                jobs += self._take_neighbours(jobs[0], room)
            dropped = [j for j in jobs if j.future.done()]  # withdrawn while the batch gathered
            self.metrics["dropped"].inc(len(dropped))
            jobs = [j for j in jobs if not j.future.done()]
            if jobs:
                await self._run(jobs)
                self._company = len(jobs) > 1 or self._arrivals > seen  # others came while it gathered or ran

    async def _run(self, jobs: list) -> None:
        loop = asyncio.get_running_loop()
        inputs = [x for j in jobs for x in j.items]
        started = time.perf_counter()
        try:
            rows = await loop.run_in_executor(self.executor, self.run, inputs)
        except Exception as e:  # noqa: BLE001 (whatever failed, the callers are told, the collector goes on)
            if len(jobs) > 1:  # one request's input broke the pass: run each alone, so only that request fails
                for j in jobs:
                    await self._run([j])
                return
            if not jobs[0].future.done():
                jobs[0].future.set_exception(e)
            return
        m = self.metrics
        m["batch_size"].observe(len(inputs))
        m["forward"].observe(time.perf_counter() - started)
        at = 0
        for j in jobs:
            m["queue_wait"].observe(started - j.enqueued)
            if not j.future.done():
                j.future.set_result(rows[at:at + len(j.items)])
            at += len(j.items)

    async def close(self) -> None:
        """After uvicorn has let the requests in flight finish: refuse new work, fail what is left, stop."""
        self.closing = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for j in self._jobs:
            if not j.future.done():
                j.future.set_exception(Closed())
        self._jobs.clear()

