"""Soak: interpreter exits with runners left open and work in flight, counted per backend.

Each run is a child interpreter (``tests/exit_child.py BACKEND SCENARIO``) that opens a
runner, fills it and leaves without closing it, in one of several ways (the loop ended with
items pending, ``sys.exit`` in the coroutine, an exception, ``KeyboardInterrupt``, a loop never
closed, ``infer`` calls awaiting, traffic on a daemon thread, the runner still opening). A run
is *bad* when its exit code is not the scenario's clean one, or its stderr says the process
aborted (``terminate called``, ``Fatal Python error``, ``core dumped``, ``Aborted``), or a
thread raised. Children run ``--parallel`` at a time (aborts are races: load helps). The
exit's own duration (from the child's ``leaving`` to its end) is shown too.

Run: ``python benchmarks/soak_exit.py [--runs 50] [--parallel 2] [--backend B ...]
[--scenario S ...]``; prints one line per (backend, scenario) with bad/runs, and the first
bad stderr of each; exits 1 if any run was bad.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from exit_child import BACKENDS, EXPECTED, exit_once


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="child exits per case")
    parser.add_argument("--parallel", type=int, default=2, help="children at once")
    parser.add_argument("--backend", action="append", choices=BACKENDS)
    parser.add_argument("--scenario", action="append", choices=sorted(EXPECTED))
    args = parser.parse_args()
    cases = [(b, s) for b in args.backend or BACKENDS for s in args.scenario or EXPECTED]
    bad_total = 0
    started = perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        for backend, scenario in cases:
            t0 = perf_counter()
            exits = list(pool.map(lambda _: exit_once(backend, scenario), range(args.runs)))
            bad = [e.problem for e in exits if e.problem is not None]
            bad_total += len(bad)
            seconds = [e.exit_seconds for e in exits if e.exit_seconds >= 0] or [0.0]
            print(f"{backend:15} {scenario:10} bad {len(bad):3}/{args.runs}   exit "
                  f"median {statistics.median(seconds):5.2f} s, max {max(seconds):5.2f} s   "
                  f"({perf_counter() - t0:5.1f} s)", flush=True)
            if bad:
                print("    first: " + bad[0].replace("\n", "\n    "), flush=True)
    print(f"total bad {bad_total}/{args.runs * len(cases)} in {perf_counter() - started:.0f} s")
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
