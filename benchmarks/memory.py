"""Peak resident memory of a piece of work, on Linux, without CUDA allocator stats.

``reset_peak()`` writes 5 to /proc/self/clear_refs, which resets VmHWM (the high-water
mark of resident memory) to the current RSS; ``peak_mb()`` reads it back. Measure each
configuration in a fresh process so earlier allocations do not hide later ones.
"""

from __future__ import annotations


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024
