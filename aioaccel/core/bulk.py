"""The bulk APIs: many items per call, for callers that already hold many (a video decoder, a
batch job, a WebSocket frame of several images).

* ``infer_many(inputs)``: every item admitted as room allows, in order; one future for the
  whole call instead of one per item (each item's ticket gets a :class:`Slot`, a tiny stand-in
  with the three methods completion calls: ``done``, ``set_result``, ``set_exception``).
* ``push_many(inputs, tags)``: the items admitted in order, as many at once as there is room
  for; it never admits past ``maxsize``.
* ``results(max_items=N)``: lists of the results that are ready, head first (what ``async
  for`` would yield one by one), so a consumer pays one wake-up per burst, not per item.

Every contract of the single-item calls holds: backpressure (admission is the runner's own),
ordering, per-item errors in place, cancellation (a cancelled ``infer_many`` withdraws the
items no worker has taken; the rest are discarded as they arrive). Everything here runs on the
event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate
from time import perf_counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ..batching import join, rows, split
from ..errors import AccelError, InferenceError, InferTimeout, InputError
from .jobs import Job
from .records import Ticket
from .results import Result
from .streamed_chunk import (
    ChunkTicket,
    chunk_limit,
    plan_rows,
    push_chunked,
    take_from_chunk,
    uniform_rows,
    validated_runs,
)

if TYPE_CHECKING:
    from .async_library import Waiter
    from .records import Lane

#: the runner (typed loosely: this module must not import the runner, its supervisor or its
#: stream table, which import this one)
Runner = Any

__all__ = ["Chunk", "Gathered", "ResultBatches", "Slot", "check_max_items", "chunks",
           "infer_many", "prepare_all", "push_many", "results"]


class Gathered:
    """The outcome of one ``infer_many`` call: a value (or error) per item. ``future`` only
    wakes the call (the answer is final, or a failed chunk's items need re-running); it is
    never given an exception, so nothing is ever left unretrieved."""

    __slots__ = ("errors", "failure", "final", "future", "pending", "redo",
                 "return_exceptions", "values")

    def __init__(self, count: int, future: Waiter[None], return_exceptions: bool):
        self.values: list[Any] = [None] * count
        self.errors = 0
        self.pending = count
        self.future = future
        self.return_exceptions = return_exceptions
        self.final = False            # the call has its answer (or gave up): late results
        self.failure: BaseException | None = None  # are discarded
        #: (index, raw input) of items whose chunk failed: the call re-runs them alone
        self.redo: list[tuple[int, Any]] = []

    def settle(self, index: int, value: Any, failed: bool) -> None:
        if self.final:
            return
        self.values[index] = value
        self.pending -= 1
        if failed:
            self.errors += 1
            if not self.return_exceptions:  # as asyncio.gather: the first failure raises
                self.failure = value
                self.finish()
                return
        if not self.pending:
            self.finish()

    def settle_run(self, start: int, parts: list[Any]) -> None:
        """:meth:`settle` of the consecutive items from ``start`` on, all succeeded (a
        chunk's members: one slice assignment, not a call per item)."""
        if self.final:
            return
        self.values[start:start + len(parts)] = parts
        self.pending -= len(parts)
        if not self.pending:
            self.finish()

    def over(self) -> bool:
        """Whether the call has its answer (re-read after an await)."""
        return self.final

    def finish(self) -> None:
        self.final = True
        self.wake()

    def wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)

    def retry(self, items: list[tuple[int, Any]]) -> None:
        """A chunk's call failed: wake the call to re-run its items one by one, so that only
        the items that fail on their own fail (as a failed batch does)."""
        if not self.final:
            self.redo.extend(items)
            self.wake()


class Slot:
    """Stands where an ``infer`` future would be, for one item of an ``infer_many`` call."""

    __slots__ = ("_done", "gathered", "index")

    def __init__(self, gathered: Gathered, index: int):
        self.gathered = gathered
        self.index = index
        self._done = False

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        # once the call has its answer (all settled, first failure raised, or cancelled),
        # a late result has nobody to go to: completion counts it as discarded
        return self._done or self.gathered.final

    def set_result(self, value: Any) -> None:
        self._done = True
        self.gathered.settle(self.index, value, False)

    def set_exception(self, error: BaseException) -> None:
        self._done = True
        self.gathered.settle(self.index, error, True)


class Chunk:
    """Stands where an ``infer`` future would be for several rows of an ``infer_many`` call
    joined into one item (one ticket, one job, validated once, one batched call): settled,
    it splits the outputs back into the items' places and gives back the extra slots."""

    __slots__ = ("_done", "counts", "extra", "gathered", "items", "runner")

    def __init__(self, runner: Runner, gathered: Gathered, items: list[tuple[int, Any]],
                 counts: list[int]):
        self.runner = runner
        self.gathered = gathered
        self.items = items            # (index in the call, prepared input) per member
        self.counts = counts          # rows per member
        self.extra = len(items) - 1   # slots held beyond the ticket's own one
        self._done = False

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self._done or self.gathered.final

    def give_back(self) -> None:
        """Free the slots held beyond the ticket's own (once)."""
        extra, self.extra = self.extra, 0
        self.runner._admission.release_many(self.runner._lane, extra)

    def set_result(self, value: Any) -> None:
        self._done = True
        self.give_back()
        gathered = self.gathered
        try:
            parts = split_views(value, self.counts)
        except ValueError as exc:  # the stage broke the row contract: every member fails
            for index, _ in self.items:
                gathered.settle(index, _chunk_error(exc), True)
            return
        self.runner._done.completed += len(parts) - 1  # the ticket counted one
        items = self.items
        start = items[0][0]
        if len(parts) == len(items) and items[-1][0] - start == len(items) - 1:
            gathered.settle_run(start, parts)  # a run of consecutive items: the usual case
            return
        for (index, _), part in zip(items, parts, strict=True):
            gathered.settle(index, part, False)

    def set_exception(self, error: BaseException) -> None:
        self._done = True
        self.give_back()
        if isinstance(error, InferenceError):  # the batched call failed: re-run each alone
            self.runner._done.failed -= 1  # counted again, per item, if they fail alone
            self.runner._lane.failed -= 1
            self.gathered.retry(self.items)
            return
        for index, _ in self.items:  # closed or broken: every member gets a copy
            self.gathered.settle(index, error if index == self.items[0][0] else
                                 _copy(error), True)


def split_views(outputs: Any, counts: list[int]) -> list[Any]:
    """:func:`aioaccel.batching.split`, but each item's rows are a view of the batch's
    outputs, not a copy: every part goes back to the same ``infer_many`` caller, so nobody's
    result pins a stranger's memory, and the loop saves a copy per item."""
    if type(outputs) is dict and len(outputs) == 1:
        ((name, array),) = outputs.items()
        if type(array) is np.ndarray and array.ndim and array.shape[0] == sum(counts):
            if counts.count(1) == len(counts):  # one row each (counted in C)
                return [{name: row} for row in array[:, None]]
            ends = list(accumulate(counts))
            return [{name: array[a:b]} for a, b in zip([0, *ends], ends, strict=False)]
    return split(outputs, counts)


def _chunk_error(exc: Exception) -> InferenceError:
    err = InferenceError(f"a batched call returned outputs that do not split by item: {exc}",
                         seq=-1)
    err.__cause__ = exc
    return err


def _copy(error: BaseException) -> BaseException:
    from ..errors import AccelError, copy_for_waiter

    return copy_for_waiter(error) if isinstance(error, AccelError) else error


def chunks(runner: Runner, values: list[Any], limit: int) -> list[list[tuple[int, Any]]]:
    """``values`` (raw inputs) in runs of consecutive items of at most ``limit`` rows each."""
    out: list[list[tuple[int, Any]]] = []
    run: list[tuple[int, Any]] = []
    total = 0
    for index, value in enumerate(values):
        try:
            n = rows(value)
        except ValueError:
            n = limit + 1  # cannot be batched: its own run
        if run and total + n > limit:
            out.append(run)
            run, total = [], 0
        run.append((index, value))
        total += n
    if run:
        out.append(run)
    return out


def join_chunk(runner: Runner, run: list[tuple[int, Any]]) -> tuple[Any, list[int]] | None:
    """A run of raw items joined and validated once as one input, or None when it cannot be
    (the items then go one by one, and their own checks name what is wrong)."""
    if len(run) < 2:
        return None
    try:
        value, counts = join([v for _, v in run])
    except ValueError:
        return None
    prepare = runner._sup.prepare
    if prepare is not None:
        try:
            value = prepare(value)
        except InputError:
            return None
    return value, counts


def plan(runner: Runner, items: list[Any], limit: int, keep_errors: bool) -> list[Any]:
    """What ``infer_many`` submits, checked before anything is admitted: runs of items joined
    into one validated input (``[run, value, counts]``, when the runner batches), and single
    items (``(index, prepared input)``, or an InputError standing in its place)."""
    units: list[Any] = []
    if limit > 1:
        uniform = plan_uniform(runner, items, limit)
        if uniform is not None:
            return uniform
        for run in chunks(runner, items, limit):
            joined = join_chunk(runner, run)
            if joined is not None:
                units.append([run, joined[0], joined[1]])
                continue
            units.extend(_singles(runner, run, len(items), keep_errors))
        return units
    return _singles(runner, list(enumerate(items)), len(items), keep_errors)


def plan_uniform(runner: Runner, items: list[Any], limit: int) -> list[Any] | None:
    """:func:`plan` for the usual call (arrays of one shape and dtype, each of at most
    ``limit`` rows): all joined with one concatenation, then cut into runs of ``limit`` rows
    (views), each validated once. None for anything else, which the general path plans item
    by item (and its checks name what is wrong)."""
    per_item = uniform_rows(items)
    if per_item is None:
        return None
    if not 0 < per_item <= limit:
        return None
    runs = validated_runs(runner, items, per_item, limit)
    if runs is None:
        return None  # the items one by one: each one's own check names the fault
    indexed = list(enumerate(items))
    return [[indexed[start:stop], value, [per_item] * (stop - start)]
            for start, stop, value in runs]


def _singles(runner: Runner, run: list[tuple[int, Any]], count: int,
             keep_errors: bool) -> list[Any]:
    prepare = runner._sup.prepare
    if prepare is None:
        return run
    out: list[Any] = []
    for index, item in run:
        try:
            out.append((index, prepare(item)))
        except InputError as exc:
            err = InputError(f"item {index} of {count}: {exc}")
            err.__cause__ = exc
            if not keep_errors:
                raise err from exc
            out.append((index, err))
    return out


def split_unit(unit: list[Any], taken: int) -> list[Any]:
    """The first ``taken`` items of a joined run as a run of their own (their rows of the
    validated input, as views); ``unit`` keeps the rest."""
    run, value, counts = unit
    cut = sum(counts[:taken])
    head = [run[:taken], _rows_of(value, 0, cut), counts[:taken]]
    unit[0], unit[1], unit[2] = run[taken:], _rows_of(value, cut, None), counts[taken:]
    return head


def _rows_of(value: Any, start: int, stop: int | None) -> Any:
    if isinstance(value, dict):
        return {name: array[start:stop] for name, array in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(array[start:stop] for array in value)
    return value[start:stop]


def as_list(inputs: Iterable[Any], what: str) -> list[Any]:
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        raise TypeError(f"{what} takes a sequence of items (a list of inputs, one per item), "
                        f"got {type(inputs).__name__}")
    return list(inputs)


def prepare_all(runner: Runner, items: list[Any], keep_errors: bool) -> list[Any]:
    """Every item validated against the model's spec (before anything is admitted). A bad item
    raises InputError naming its index, or, with ``keep_errors``, stands as that error."""
    prepare = runner._sup.prepare
    if prepare is None:
        return items
    out = []
    for index, item in enumerate(items):
        try:
            out.append(prepare(item))
        except InputError as exc:
            err = InputError(f"item {index} of {len(items)}: {exc}")
            err.__cause__ = exc
            if not keep_errors:
                raise err from exc
            out.append(err)
    return out


def check_tags(tags: Iterable[Any] | None, count: int) -> list[Any]:
    if tags is None:
        return [None] * count
    tags = as_list(tags, "tags")
    if len(tags) != count:
        raise ValueError(f"push_many got {count} inputs and {len(tags)} tags: give one tag per "
                         f"input, or tags=None")
    return tags


def check_max_items(max_items: int | None) -> int:
    if max_items is None:
        return 1 << 62
    if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
        raise ValueError(f"max_items must be an int >= 1 or None, got {max_items!r}")
    return max_items


class ResultBatches:
    """``async for results in runner.results(max_items=N)``: lists of 1..N ready results, in
    push order; ends as ``async for`` does (after the last result once input is closed)."""

    __slots__ = ("_lane", "_max", "_runner")

    def __init__(self, runner: Runner, lane: Lane, max_items: int | None):
        self._runner = runner
        self._lane = lane
        self._max = check_max_items(max_items)

    def __aiter__(self) -> ResultBatches:
        return self

    async def __anext__(self) -> list[Result]:
        runner, lane = self._runner, self._lane
        ready = take_ready(runner, lane, self._max)
        if ready:
            return ready
        first = await runner._next(lane)  # waits; raises StopAsyncIteration at the end
        if self._max == 1:
            return [first]
        return [first, *take_ready(runner, lane, self._max - 1)]


def withdraw_unstarted(runner: Runner, tickets: list[Ticket]) -> None:
    """A cancelled (or failed-early) ``infer_many``: take back the items no worker has taken
    (their slots come back with their empty shells); the others are discarded on arrival."""
    done = runner._done
    for ticket in tickets:
        future = ticket.future
        if isinstance(future, (Slot, Chunk)) and future._done:
            continue
        if isinstance(future, Chunk):
            future.give_back()  # the call is over: only the ticket's own slot stays held
        gen = ticket.gen
        if (done.unfinished.get(ticket.seq) is ticket and gen is not None
                and gen.pipeline.withdraw(ticket.job)):
            ticket.withdrawn = True
            done.withdrawn += 1
        else:
            ticket.job.abandoned = True  # a device stage may cancel its remote work


# ---- the Runner's bulk methods (bound as methods of Runner: ``self`` is the runner) ---------
async def infer_many(self: Runner, inputs: Iterable[Any], *, return_exceptions: bool = False,
                     timeout: float | None = None) -> list[Any]:  # noqa: ASYNC109
    """Run many inputs and return their outputs, in order (for callers that hold many
    items already: a batch job, a video decoder, a WebSocket frame of several images).

    The items are admitted in order as room allows (``maxsize`` holds), so the device
    starts on the first while later ones wait. A failed item raises its error, as
    :func:`asyncio.gather` does (the items not yet started are then withdrawn); with
    ``return_exceptions=True`` each failed item's error stands in its place in the list.
    Bad input raises :class:`~aioaccel.InputError` naming the item before anything is
    admitted (with ``return_exceptions=True`` it stands in that item's place). Cancelled
    or past ``timeout`` (:class:`~aioaccel.InferTimeout`), it withdraws every item no
    worker has taken; the results of the others are discarded.
    """
    items = as_list(inputs, "infer_many")
    if timeout is None:
        return await _infer_many(self, items, return_exceptions)
    try:
        async with self._opened_hub().timeout(timeout):
            return await _infer_many(self, items, return_exceptions)
    except TimeoutError as exc:
        if isinstance(exc, AccelError):
            raise
        raise InferTimeout(f"no results for {len(items)} items within {timeout} s from "
                           f"runner {self.name!r}") from None


async def _infer_many(runner: Runner, items: list[Any], return_exceptions: bool) -> list[Any]:
    lane = runner._lane
    sup = runner._sup
    sup.check_accepting(lane)
    if not items:
        return []
    gen = sup.gen
    limit = min(gen.pipeline.batch, runner._maxsize) if gen is not None else 1
    units = plan(runner, items, limit, return_exceptions)
    gathered = Gathered(len(items), sup.new_future(), return_exceptions)
    tickets: list[Ticket] = []
    try:
        while True:
            await _submit_units(runner, lane, units, gathered, tickets)
            if not gathered.final:
                await gathered.future
            if gathered.failure is not None:
                raise gathered.failure
            if gathered.over():
                return gathered.values
            # a joined run's call failed: its items again, one by one
            redo, gathered.redo = gathered.redo, []
            units = plan(runner, [raw for _, raw in redo], 1, True)
            units = [(redo[k][0], value) for k, (_, value) in enumerate(units)]
            gathered.future = sup.new_future()
    except BaseException:
        gathered.final = True  # late results have nobody to go to: discarded on arrival
        withdraw_unstarted(runner, tickets)
        raise


async def _submit_units(runner: Runner, lane: Lane, units: list[Any], gathered: Gathered,
                        tickets: list[Ticket]) -> None:
    """Admit and submit ``infer_many``'s units in order, as room allows; stops early once
    the call has its answer (an item failed)."""
    adm = runner._admission
    sup = runner._sup
    for unit in units:
        if type(unit) is tuple:  # one item: (index, prepared input or its InputError)
            index, value = unit
            if type(value) is InputError:
                gathered.settle(index, value, True)
                continue
            if gathered.over():
                return
            if not (sup.accepting and adm.try_take(lane)):
                await runner._admit(lane)
                if gathered.over():
                    adm.release(lane)
                    return
            tickets.append(runner._enqueue(lane, value, None, Slot(gathered, index)))
            continue
        while unit[0]:  # a joined run: as many of its items as there is room for now
            if gathered.over():
                return
            want = len(unit[0])
            taken = adm.take_many(lane, want) if sup.accepting else 0
            if not taken:
                await runner._admit(lane)
                if gathered.over():
                    adm.release(lane)
                    return
                taken = 1 + (adm.take_many(lane, want - 1) if want > 1 else 0)
            run, value, counts = unit if taken == want else split_unit(unit, taken)
            if taken == want:
                unit[0] = []
            chunk = Chunk(runner, gathered, run, counts)
            tickets.append(runner._enqueue(lane, value, None, chunk))
            runner._done.pushed += taken - 1  # the ticket counted one
            lane.pushed += taken - 1


async def push_many(self: Runner, inputs: Iterable[Any], tags: Iterable[Any] | None = None
                    ) -> list[int]:
    """Admit many inputs for ``async for``, in order, as room allows; return their
    sequence numbers once all are admitted. Never admits past ``maxsize``: it waits for
    the consumer as :meth:`push` does. ``tags``: one per input, or None. Bad input raises
    :class:`~aioaccel.InputError` naming the item before anything is admitted. Cancelled
    while waiting for room, the items admitted so far stay admitted (they show up in
    ``async for`` with their tags); the rest are not.
    """
    return await push_many_lane(self, self._lane, inputs, tags)


async def push_many_lane(runner: Runner, lane: Lane, inputs: Iterable[Any],
                         tags: Iterable[Any] | None) -> list[int]:
    items = as_list(inputs, "push_many")
    labels = check_tags(tags, len(items))
    sup = runner._sup
    sup.check_accepting(lane)
    limit = chunk_limit(runner, lane)
    planned = plan_rows(runner, items, limit) if limit > 1 and len(items) > 1 else None
    if planned is not None:  # runs of items as one job each (see .streamed_chunk)
        return await push_chunked(runner, lane, planned[1], planned[0], labels)
    prepared = prepare_all(runner, items, False)
    adm = runner._admission
    seqs: list[int] = []
    done, total = 0, len(prepared)
    while done < total:
        # as many slots as are free now, in one step; else wait for one, then the rest
        taken = adm.take_many(lane, total - done) if (sup.accepting and not lane.closed) else 0
        if not taken:
            await runner._admit(lane)
            taken = 1 + (adm.take_many(lane, total - done - 1) if total - done > 1 else 0)
        seqs.extend(_enqueue_run(runner, lane, prepared, labels, done, done + taken))
        done += taken
    return seqs


def _enqueue_run(runner: Runner, lane: Lane, values: list[Any], tags: list[Any], start: int,
                 stop: int) -> list[int]:
    """The runner's ``_enqueue`` for the streamed items ``values[start:stop]`` (slots taken),
    in one pass: one clock read, the counters bumped once."""
    now = perf_counter()
    sup = runner._sup
    gen = sup.gen
    retries = sup.healer.retries
    done = runner._done
    unfinished = done.unfinished
    append = lane.tickets.append
    submit = sup.submit
    index = lane.index
    priority = lane.priority
    seq_of = runner._seq
    seqs: list[int] = []
    for k in range(start, stop):
        seq = next(seq_of)
        value = values[k]
        job = Job(seq, value, index, now, priority)
        ticket = Ticket(seq, tags[k], lane, None, job, now)
        ticket.gen = gen
        if retries:
            ticket.inputs = value
        unfinished[seq] = ticket
        append(ticket)
        submit(job)
        seqs.append(seq)
    done.pushed += stop - start
    lane.pushed += stop - start
    return seqs


def results(self: Runner, max_items: int | None = None) -> ResultBatches:
    """``async for results in runner.results(max_items=N)``: lists of the results that are
    ready (at least one, at most ``N``; None: all that are ready), in push order, with the
    same :class:`~aioaccel.Result` records (tags, errors in place) as ``async for``, which it
    shares the stream with. Ends as ``async for`` does."""
    return ResultBatches(self, self._lane, max_items)


def take_ready(runner: Runner, lane: Lane, limit: int) -> list[Result]:
    """The finished results at the head of ``lane``, up to ``limit``, without waiting."""
    out: list[Result] = []
    tickets = lane.tickets
    freed = 0
    while tickets and len(out) < limit:
        head = tickets[0]
        if not head.done:
            break
        if type(head) is ChunkTicket:  # its items, as many as fit (it leaves once consumed)
            out.extend(take_from_chunk(runner._done, head, limit - len(out)))
            continue
        tickets.popleft()
        if not head.released:  # Completions.free, for the whole run at once below
            head.released = True
            freed += 1
        job = head.job
        out.append(Result(job.value, head.tag, head.seq, job.t_done - head.t_admit,
                          head.error))
    runner._admission.release_many(lane, freed)
    if out and not tickets and lane is not runner._lane:
        runner._streams.forget_if_done(lane)
    return out
