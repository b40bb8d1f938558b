"""The machine line every benchmark prints: CPU model and cores (and the GPUs, without starting CUDA)."""

import os
import platform
import shutil
import subprocess


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


def gpu_description() -> str:
    """The GPUs by name, as nvidia-smi lists them ('no GPU' where it finds none or is not installed): read without
    torch.cuda, whose first call would start a CUDA context in this process."""
    if shutil.which("nvidia-smi") is None:
        return "no GPU (no nvidia-smi)"
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "GPU not read (nvidia-smi failed)"
    names = [name.strip() for name in names if name.strip()]
    return ", ".join(names) if names else "no GPU"
