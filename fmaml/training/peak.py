"""The peak memory of a run's meta-steps, above the process at rest.

On CUDA, ``torch.cuda.max_memory_allocated`` after a reset; on Linux, the process's peak
resident memory (VmHWM, reset through ``/proc/self/clear_refs``); elsewhere not measured.
"""

from __future__ import annotations

import torch


def reset(device: str | torch.device) -> int | None:
    """Start measuring from here; the memory in use now (bytes), ``None`` if not measured."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the peak resident memory starts again from here
        return _status("VmRSS:")
    except OSError:  # not Linux, or /proc not writable
        return None


def growth(device: str | torch.device, rest: int | None) -> int | None:
    """The peak since :func:`reset` above what was in use then (bytes); ``None`` if not
    measured."""
    if rest is None:
        return None
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - rest
    return _status("VmHWM:") - rest


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {key} in /proc/self/status")
