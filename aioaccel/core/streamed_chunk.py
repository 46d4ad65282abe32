"""A streamed chunk: a run of ``push_many``'s items that travels as ONE job.

When ``push_many`` (the runner's or a stream's) gets arrays of one shape and dtype and the
runner batches, its items are admitted as chunks of up to ``batch`` rows: one concatenation
and one validation per chunk, one :class:`ChunkTicket` and one job through the stage threads
(one native call, no joining or splitting on the worker). The loop cuts the chunk's outputs
into per-item views once, at delivery, and makes each item's :class:`~aioaccel.Result` only
when ``async for`` or ``results()`` takes it.

Every per-item contract holds:

* backpressure -- a chunk of k items holds k slots; a chunk is cut to the slots free when it
  is admitted (it never waits for room for a whole chunk), and gives its slots back item by
  item as they are consumed;
* order and tags -- the chunk sits in its lane's outbox where its items would, with their
  consecutive sequence numbers and their own tags;
* errors in place -- a chunk whose call fails (a bad row, a runtime error) or whose outputs do
  not split by item is replaced, in place, by its items as ordinary tickets that run alone,
  so only the bad item fails, with the error a per-item push gives; a device failure splits
  the chunks it held into their items before the healer re-runs them one at a time;
* counters -- pushed, completed, failed and withdrawn count items, not chunks.

Chunks are used only where stage 0 is the plain FIFO (no streams of several priorities).
Everything here runs on the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from itertools import islice, repeat
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ..batching import split
from ..errors import InputError
from .jobs import Job
from .records import Ticket
from .results import Result

if TYPE_CHECKING:
    from .records import Lane

#: the runner and its Completions (typed loosely: this module must not import them, nor the
#: supervisor: they import this one)
Runner = Any
Completions = Any

__all__ = ["ChunkJob", "ChunkTicket", "chunk_limit", "expand_chunks", "plan_rows", "push_chunked",
           "settle_chunk", "take_from_chunk", "take_one"]


class ChunkJob(Job):
    """A chunk's job: one job through the stages for ``items`` streamed items (its rows)."""

    __slots__ = ("items",)

    def __init__(self, seq: int, value: Any, stream: int, t_admit: float, priority: int,
                 items: int):
        super().__init__(seq, value, stream, t_admit, priority)
        self.items = items


class ChunkTicket(Ticket):
    """The loop-side half of a run of consecutive streamed items submitted as one job.

    ``seq`` is its first item's sequence number (the job's, the key in ``unfinished``); the
    items have ``seq`` .. ``seq + count - 1``. ``taken`` items have been consumed already."""

    __slots__ = ("count", "owner", "parts", "per", "tags", "taken")

    def __init__(self, seq: int, lane: Lane, job: Job, t_admit: float, tags: list[Any],
                 per: int, owner: Runner):
        super().__init__(seq, None, lane, None, job, t_admit)
        self.count = len(tags)
        self.tags = tags
        self.per = per                # rows per item
        self.owner = owner            # the runner: a failed chunk's items are re-run there
        self.parts: list[Any] = []    # each item's outputs (views), once delivered
        self.taken = 0


def chunk_limit(runner: Runner, lane: Lane) -> int:
    """Rows per chunk for a ``push_many`` on ``lane`` now: the batch size, or 1 (no chunks)
    when the runner does not batch or stage 0 ranks priorities."""
    sup = runner._sup
    gen = sup.gen
    if gen is None or sup.ranked:
        return 1
    return min(int(gen.pipeline.batch), int(runner._maxsize))


def uniform_rows(items: list[Any]) -> int | None:
    """Rows per item when ``items`` are two or more arrays of one shape and dtype (the usual
    bulk call, which can be joined with one concatenation); None otherwise."""
    first = items[0]
    if type(first) is not np.ndarray or not first.ndim or len(items) < 2:
        return None
    shape, dtype = first.shape, first.dtype
    for item in items:
        if type(item) is not np.ndarray or item.shape != shape or item.dtype != dtype:
            return None
    return int(shape[0])


def validated_runs(runner: Runner, items: list[Any], per: int, limit: int
                   ) -> list[tuple[int, int, Any]] | None:
    """``items`` (arrays of ``per`` rows each, one shape and dtype) joined with one
    concatenation and cut into runs of at most ``limit`` rows (views), each checked once by
    the runner's validator: [(first item, end item, validated run)]; None when a run fails
    its check (the items then go one by one, and each one's own check names the fault)."""
    per_run = limit // per
    whole = np.concatenate(items)
    prepare = runner._sup.prepare
    runs: list[tuple[int, int, Any]] = []
    for start in range(0, len(items), per_run):
        stop = min(start + per_run, len(items))
        value: Any = whole[start * per:stop * per]
        if prepare is not None:
            try:
                value = prepare(value)
            except InputError:
                return None
        runs.append((start, stop, value))
    return runs


def plan_rows(runner: Runner, items: list[Any], limit: int
              ) -> tuple[int, list[tuple[int, int, Any]]] | None:
    """The usual ``push_many`` (arrays of one shape and dtype, each of at most ``limit``
    rows) as runs of ``limit`` rows: one concatenation, then each run (a view) validated
    once. Returns (rows per item, [(first item, end item, validated run)]); None for anything
    else, or when a run fails its check (the items then go one by one, and their own checks
    name what is wrong)."""
    per = uniform_rows(items)
    if per is None:
        return None
    if not 0 < per <= limit // 2:  # a chunk must hold at least two items
        return None
    runs = validated_runs(runner, items, per, limit)
    if runs is None:
        return None
    return per, runs


def rows_of(value: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a validated input (a dict, list or tuple of arrays, or one)."""
    if type(value) is dict:
        return {name: array[start:stop] for name, array in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(array[start:stop] for array in value)
    return value[start:stop]


async def push_chunked(runner: Runner, lane: Lane, runs: list[tuple[int, int, Any]],
                       per: int, tags: list[Any]) -> list[int]:
    """``push_many``'s admission for planned runs: as many items as there are free slots,
    each run cut at the slots taken (a chunk never waits for room for all of it)."""
    adm = runner._admission
    sup = runner._sup
    seqs: list[int] = []
    total = runs[-1][1]
    done = 0
    k = 0  # the run holding item ``done``
    while done < total:
        taken = adm.take_many(lane, total - done) if (sup.accepting and not lane.closed) else 0
        if not taken:
            await runner._admit(lane)
            taken = 1 + (adm.take_many(lane, total - done - 1) if total - done > 1 else 0)
        end = done + taken
        while done < end:
            start, stop, value = runs[k]
            upto = min(stop, end)
            if done != start or upto != stop:
                value = rows_of(value, (done - start) * per, (upto - start) * per)
            seqs.extend(enqueue(runner, lane, value, tags[done:upto], per))
            done = upto
            if done == stop:
                k += 1
    return seqs


def enqueue(runner: Runner, lane: Lane, value: Any, tags: list[Any], per: int) -> range:
    """Submit the items ``tags`` stand for (slots taken) as one job: a chunk, or, for one
    item, an ordinary ticket. Returns their sequence numbers."""
    seq_of = runner._seq
    seq = next(seq_of)
    if len(tags) > 1:  # the other items' numbers, consumed in C: consecutive (nothing runs
        next(islice(seq_of, len(tags) - 2, None))  # on the loop between)
    now = perf_counter()
    sup = runner._sup
    job = (ChunkJob(seq, value, lane.index, now, lane.priority, len(tags)) if len(tags) > 1
           else Job(seq, value, lane.index, now, lane.priority))
    ticket = (ChunkTicket(seq, lane, job, now, tags, per, runner) if len(tags) > 1
              else Ticket(seq, tags[0], lane, None, job, now))
    ticket.gen = sup.gen
    if len(tags) > 1 or sup.healer.retries:
        ticket.inputs = value  # a chunk's items may have to be re-run alone
    done = runner._done
    done.unfinished[seq] = ticket
    lane.tickets.append(ticket)
    done.pushed += len(tags)
    lane.pushed += len(tags)
    sup.submit(job)
    return range(seq, seq + len(tags))


# ---- delivery ---------------------------------------------------------------------------
def settle_chunk(done: Completions, ticket: ChunkTicket, job: Job, woken: set[Lane]) -> None:
    """A chunk's job came back (popped from ``unfinished``): its items are ready, or, when
    the call failed or its outputs do not split by item, they run again one by one."""
    lane = ticket.lane
    count = ticket.count
    if ticket.withdrawn:  # its empty shell: the items' slots are free now
        done.admission.release_many(lane, count)
        if lane is not done.default_lane and done.on_lane_released is not None:
            done.on_lane_released(lane)
        return
    parts = None if job.error is not None else split_rows(job.value, ticket.per, count)
    if parts is None:
        rerun_alone(ticket)
        return
    ticket.parts = parts
    ticket.done = True
    latency = job.t_done - ticket.t_admit
    took = [latency] * count
    done.completed += count
    done.latency.add_many(took)
    done.histogram.add_repeated(latency, count)
    if job.t_start:
        done.queued.add_many([job.t_start - ticket.t_admit] * count)
    done.working.add_many([job.work / count] * count)
    if lane is not done.default_lane:
        lane.completed += count
        lane.latency.add_many(took)
    woken.add(lane)
    if (lane.closed and lane is not done.default_lane) or lane.orphaned:
        done.free(ticket)


def split_rows(outputs: Any, per: int, count: int) -> list[Any] | None:
    """Each item's rows of a chunk's outputs, as views (they all go to the same consumer, so
    no result pins a stranger's memory); None if the outputs do not split by item."""
    total = per * count
    if type(outputs) is dict and len(outputs) == 1:
        ((name, array),) = outputs.items()
        if type(array) is np.ndarray and array.ndim and array.shape[0] == total:
            if per == 1:
                return [{name: row} for row in array[:, None]]
            return [{name: array[i:i + per]} for i in range(0, total, per)]
    if type(outputs) is np.ndarray and outputs.ndim and outputs.shape[0] == total:
        if per == 1:
            return list(outputs[:, None])
        return [outputs[i:i + per] for i in range(0, total, per)]
    try:
        return split(outputs, [per] * count)  # anything else: the general split, or None
    except Exception:  # whatever the stage returned, it does not split: re-run alone
        return None


def items_of(chunk: ChunkTicket, gen: Any) -> list[Ticket]:
    """The chunk's items as ordinary tickets (each with its own job on its own rows of the
    chunk's validated input), not yet registered nor submitted."""
    lane, value, per = chunk.lane, chunk.inputs, chunk.per
    out: list[Ticket] = []
    for i, tag in enumerate(chunk.tags):
        part = rows_of(value, i * per, (i + 1) * per)
        job = Job(chunk.seq + i, part, lane.index, chunk.t_admit, lane.priority)
        ticket = Ticket(chunk.seq + i, tag, lane, None, job, chunk.t_admit)
        ticket.gen = gen
        ticket.inputs = part
        ticket.retries = chunk.retries
        out.append(ticket)
    return out


def replace(chunk: ChunkTicket, items: list[Ticket], unfinished: dict[int, Ticket]) -> None:
    """Put ``items`` where ``chunk`` stands: in its lane's outbox and in ``unfinished``."""
    lane = chunk.lane
    if chunk in lane.tickets:
        kept: deque[Ticket] = deque()
        for ticket in lane.tickets:
            if ticket is chunk:
                kept.extend(items)
            else:
                kept.append(ticket)
        lane.tickets = kept
    if unfinished.get(chunk.seq) is chunk:
        del unfinished[chunk.seq]
    for ticket in items:
        unfinished[ticket.seq] = ticket


def rerun_alone(chunk: ChunkTicket) -> None:
    """The chunk's call failed: its items run again, each alone, in its place."""
    runner = chunk.owner
    sup = runner._sup
    items = items_of(chunk, sup.gen)
    replace(chunk, items, runner._done.unfinished)
    gen = sup.gen
    if gen is not None and gen.pipeline.batching is not None:
        gen.pipeline.batching.fallbacks += 1
    for ticket in items:
        sup.submit(ticket.job)


def expand_chunks(done: Completions, picked: Callable[[Ticket], bool]) -> None:
    """Every unfinished chunk ``picked`` says so of (the ones a failed device held) becomes
    its items, so that healing retries, probes and fails each item on its own."""
    for ticket in list(done.unfinished.values()):
        if type(ticket) is ChunkTicket and not ticket.withdrawn and picked(ticket):
            replace(ticket, items_of(ticket, ticket.gen), done.unfinished)


# ---- consumption ------------------------------------------------------------------------
def take_from_chunk(done: Completions, chunk: ChunkTicket, limit: int) -> list[Result]:
    """Up to ``limit`` of a delivered chunk's items as Results, head first; their slots come
    back (unless the chunk's were given back already) and a consumed chunk leaves its lane's
    outbox."""
    start = chunk.taken
    stop = min(start + limit, chunk.count)
    chunk.taken = stop
    lane = chunk.lane
    if not chunk.released:
        done.admission.release_many(lane, stop - start)
        if stop == chunk.count:
            chunk.released = True
    if stop == chunk.count:
        lane.tickets.popleft()
    job = chunk.job
    latency = job.t_done - chunk.t_admit
    seq = chunk.seq
    if stop - start == 1:
        return [Result(chunk.parts[start], chunk.tags[start], seq + start, latency, None)]
    # map, not a comprehension: no Python frame per item, only the records' own __init__
    return list(map(Result, chunk.parts[start:stop], chunk.tags[start:stop],
                    range(seq + start, seq + stop), repeat(latency), repeat(None)))


def take_one(runner: Runner, lane: Lane, chunk: ChunkTicket) -> Result:
    """``async for``'s next result from the delivered chunk at the head of ``lane``."""
    (result,) = take_from_chunk(runner._done, chunk, 1)
    if not lane.tickets and lane is not runner._lane:
        runner._streams.forget_if_done(lane)  # a closed stream with nothing left
    return result
