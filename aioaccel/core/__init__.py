"""The runner's core, one module per job (internal: the public API is :mod:`aioaccel`).

Event-loop side:

* :mod:`.admission`     -- maxsize, lanes, priorities, weights, reserves: who may enter;
* :mod:`.records`       -- the loop-side records: ``Lane`` (a producer's share and ordered
  outbox) and ``Ticket`` (one admitted item);
* :mod:`.completion`    -- settling finished items, failure fan-out, the counters;
* :mod:`.healing`       -- self-healing: the ``Restart`` policy, retries, reopen, reload;
* :mod:`.hang_watchdog` -- ``call_timeout``: a stage call that never returns;
* :mod:`.generation`    -- one loaded model and its running pipeline: load, start, warm up,
  stop, release (teardown);

Worker-thread side:

* :mod:`.jobs`          -- the thread-side records: ``Job`` (one item), ``Worker`` (one thread);
* :mod:`.stage_threads` -- the stages' worker threads and the hand-offs between them;
* :mod:`.batch_gather`  -- dynamic batching: gathering admitted items into one call;
* :mod:`.loop_bridge`   -- worker threads -> event loop, one wake-up per burst.
"""

__all__: list[str] = []  # internal: nothing here is public API
