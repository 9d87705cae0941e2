"""Wall time and peak resident memory of a command and all its child processes (Linux /proc).

    python benchmarks/peak_memory.py -- python -m kdbench.sweep --workers 2 ...

Every 50 ms it reads ``VmHWM`` (the peak resident set of a process so far) of the
command's process tree from ``/proc/<pid>/status`` and keeps each process's last value;
it prints the wall time, the sum of those peaks over all processes (an upper bound on
the tree's peak: the processes need not peak at once, and pages of a file mapped by
several processes, such as the image cache, count in each), and each process's peak.

It also reads each process's proportional set size (``Pss`` of ``/proc/<pid>/smaps_rollup``:
a page shared by n processes counts 1/n in each) at every sample, and prints the largest
sum over the tree at one sample: the physical memory the command held at its peak, each
page counted once (shared libraries such as torch's, and the mapped image cache).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children(p)
    return seen


def peak_kib(pid: int) -> tuple[int, str] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]), cmd
    return None


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[argv.index("--") + 1 :] if "--" in argv else argv
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peaks: dict[int, tuple[int, str]] = {}
    pss_peak = 0
    while proc.poll() is None:
        pids = tree(proc.pid)
        for pid in pids:
            got = peak_kib(pid)
            if got is not None and got[0] >= peaks.get(pid, (0, ""))[0]:
                peaks[pid] = got
        pss_peak = max(pss_peak, sum(pss_kib(pid) for pid in pids))
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    total = sum(k for k, _ in peaks.values())
    print(f"exit {proc.returncode}; wall {wall:.1f} s; sum of peak RSS over {len(peaks)} processes: {total / 2**20:.2f} GiB")
    print(f"peak of the summed PSS (each physical page once): {pss_peak / 2**20:.2f} GiB")
    for pid, (kib, name) in sorted(peaks.items(), key=lambda kv: -kv[1][0]):
        print(f"  {kib / 2**20:7.2f} GiB  pid {pid}  {name}")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
