"""The machine line every benchmark prints: CPU model and cores."""

import os
import platform


def cpu_description() -> str:
    """'<CPU model>, <N> cores (<U> usable)'."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {os.cpu_count()} cores ({usable} usable)"
