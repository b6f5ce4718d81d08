"""What the benchmark scripts share: a one-line description of the machine they ran on.

torch is imported lazily, so that a script timing child processes (pipeline_stages.py) can stay
small itself: a child started from a process inherits that process's peak resident set in its own
ru_maxrss (Linux carries it across exec).
"""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(device=None, torch_threads: bool = True) -> str:
    """CPU (or GPU), cores, torch threads, torch and Python versions, date, current load average."""
    if device is not None and device.type == "cuda":
        import torch

        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_model()}, {os.cpu_count()} cores"
        if torch_threads:
            import torch

            where += f", {torch.get_num_threads()} torch threads"
    load = f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load average n/a"
    return (
        f"{where}; torch {metadata.version('torch')}, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}, {load} at the end"
    )
