"""The one timing rule of the bench scripts: warm up, synchronise, then the median of repeated calls -- CUDA events
around each call on a GPU (device time, no host clock), wall time on the CPU (where the figures only smoke-test the
script). Import with bench/ on sys.path (every bench script runs from there)."""
from __future__ import annotations

import statistics
import time

import torch


def samples_ms(fn, reps: int, cuda: bool, warmup: int = 3) -> tuple[list, list]:
    """(device ms per call -- CUDA events, or the wall time on the CPU --, wall ms per call including the final
    synchronisation) over `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    device, wall = [], []
    for _ in range(reps):
        w = time.perf_counter()
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            device.append(s.elapsed_time(e))
        else:
            fn()
        wall.append((time.perf_counter() - w) * 1e3)
    return (device if cuda else wall), wall


def median_ms(fn, reps: int, cuda: bool, warmup: int = 3, cpu_reps: int = 2) -> float:
    """Median milliseconds of `fn()` over `reps` calls after `warmup` calls; on the CPU (`cuda` false) over
    `cpu_reps` calls, timed by the wall clock."""
    return round(statistics.median(samples_ms(fn, reps if cuda else cpu_reps, cuda, warmup)[0]), 3)
