"""Timing of a PyTorch peer's step: the first call apart, then the median of synced calls."""

from __future__ import annotations

import statistics
import time

import torch


def sync(device: torch.device):
    """Waits for the device's queued work (CUDA runs asynchronously; CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, arg, device: torch.device, repeats: int) -> tuple[float, float]:
    """Returns (seconds of the first call, which includes any compilation; median seconds of
    `repeats` further calls), each call of `step(arg)` synced with the device."""
    def timed() -> float:
        start = time.perf_counter()
        step(arg)
        sync(device)
        return time.perf_counter() - start

    first = timed()
    return first, statistics.median(timed() for _ in range(repeats))
