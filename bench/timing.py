"""The one timing rule of the bench scripts: warm up, synchronise, then the median of repeated calls -- CUDA events
around each call on a GPU (device time, no host clock), wall time on the CPU (where the figures only smoke-test the
script). Import with bench/ on sys.path (every bench script runs from there)."""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, reps: int, cuda: bool, warmup: int = 3, cpu_reps: int = 2) -> float:
    """Median milliseconds of `fn()` over `reps` calls after `warmup` calls; on the CPU (`cuda` false) over
    `cpu_reps` calls, timed by the wall clock."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps if cuda else cpu_reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)
