"""Run a command until it has used a budget of CPU time, then stop it with Ctrl-C (SIGINT).

"45 minutes of one core" is CPU time, not wall time: on a shared machine a wall-clock
``timeout`` gives a run whatever the other processes leave it. This watches the CPU time of
the command and all its descendants (``/proc``, Linux) and sends SIGINT when it reaches the
budget; ``python cli.py train`` then finishes its step, saves a checkpoint and exits.

    python benchmarks/cpu_budget.py 2700 -- python cli.py train ...

Prints the CPU seconds used and the wall seconds taken at the end (to stderr).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _cpu_seconds(root: int) -> float:
    """CPU time (user + system) of ``root`` and its live descendants, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we read
            continue
        pid, parent = int(entry), int(fields[1])
        children.setdefault(parent, []).append(pid)
        times[pid] = (int(fields[11]) + int(fields[12])) / ticks
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += times.get(pid, 0.0)
        stack.extend(children.get(pid, []))
    return total


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(f"usage: {sys.argv[0]} CPU_SECONDS -- COMMAND ...", file=sys.stderr)
        return 2
    budget = float(argv[0])
    start = time.monotonic()
    # A shell starts background jobs with SIGINT ignored, and a child inherits that: give the
    # command the default handler so that Ctrl-C reaches it (Python then raises
    # KeyboardInterrupt; fmaml's train saves and stops).
    process = subprocess.Popen(
        argv[2:], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
    )
    used, stopped = 0.0, False
    while process.poll() is None:
        used = max(used, _cpu_seconds(process.pid))
        if used >= budget and not stopped:
            process.send_signal(signal.SIGINT)
            stopped = True
        time.sleep(1.0)
    print(
        f"cpu_budget: {used:.0f} s of CPU in {time.monotonic() - start:.0f} s of wall time; "
        f"{'stopped at the budget' if stopped else 'ended by itself'}; exit {process.returncode}",
        file=sys.stderr,
    )
    return process.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
