"""Peak resident memory on Linux, for the benchmarks (no torch: bench_model's parent imports it).

``reset_peak_rss()`` resets VmHWM through /proc/self/clear_refs (Linux >= 4.0); ``status_kib``
reads a field of /proc/self/status. Together: the peak a piece of work adds over the RSS
before it, without the memory the process held earlier.
"""

from __future__ import annotations


def status_kib(field: str) -> int | None:
    """``VmRSS``, ``VmHWM``, ... of this process in KiB; None where /proc cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
