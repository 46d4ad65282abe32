"""Soak: interpreter exits with runners left open and work in flight, counted per backend.

Each run is a child interpreter (``tests/exit_child.py BACKEND SCENARIO``) that opens a
runner, fills it and leaves without closing it, in one of several ways (the loop ended with
items pending, ``sys.exit`` in the coroutine, an exception, ``KeyboardInterrupt``, a loop never
closed, ``infer`` calls awaiting, traffic on a daemon thread, the runner still opening). A run
is *bad* when its exit code is not the scenario's clean one, or its stderr says the process
aborted (``terminate called``, ``Fatal Python error``, ``core dumped``, ``Aborted``), or a
thread of ours raised. Children run ``--parallel`` at a time (aborts are races: load helps).

Run: ``python benchmarks/soak_exit.py [--runs 50] [--parallel 2] [--backend B ...]
[--scenario S ...]``; prints one line per (backend, scenario) with bad/runs, and the first
bad stderr of each; exits 1 if any run was bad.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import perf_counter

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tests" / "exit_child.py"
sys.path.insert(0, str(CHILD.parent))
from exit_child import BACKENDS, EXPECTED

#: what a child's stderr says when the process died in native code at exit
ABORT_TEXT = ("terminate called", "Fatal Python error", "core dumped", "Aborted",
              "Segmentation fault", "Exception in thread", "Exception ignored")


def run_child(backend: str, scenario: str, timeout: float = 120.0) -> str | None:
    """One child exit; None when clean, else what was wrong (exit code and stderr's tail)."""
    try:
        proc = subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", str(CHILD),
                               backend, scenario], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"no exit within {timeout:.0f} s"
    if "leaving" not in proc.stdout:
        return f"never got as far as leaving (exit code {proc.returncode}): {proc.stderr[-800:]}"
    aborted = [text for text in ABORT_TEXT if text in proc.stderr]
    if proc.returncode != EXPECTED[scenario] or aborted:
        return (f"exit code {proc.returncode} (clean: {EXPECTED[scenario]})"
                f"{', stderr says ' + repr(aborted) if aborted else ''}: {proc.stderr[-800:]}")
    return None


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
            outcomes = list(pool.map(lambda _: run_child(backend, scenario), range(args.runs)))
            bad = [o for o in outcomes if o is not None]
            bad_total += len(bad)
            print(f"{backend:15} {scenario:10} bad {len(bad):3}/{args.runs} "
                  f"({perf_counter() - t0:5.1f} s)", flush=True)
            if bad:
                print("    first: " + bad[0].replace("\n", "\n    "), flush=True)
    print(f"total bad {bad_total}/{args.runs * len(cases)} in {perf_counter() - started:.0f} s")
    return 1 if bad_total else 0


if __name__ == "__main__":
    sys.exit(main())
