"""Timing helpers the benchmarks share: quantiles of wall time, GPU kernel time from the profiler, host time,
and the results file (JSON rows with the machine and versions at the top).

Wall time: `triton.testing.do_bench` (CUDA events around each call after warm-up, the L2 flushed between
calls), p20 / p50 / p80 in ms. GPU time: the summed device time of every kernel the call launched
(torch.profiler), per call. Host time: from the call until it returns, the GPU idle and synchronized before
it; when host time exceeds GPU time, the host is the bottleneck.
"""
import datetime
import json
import os
import subprocess
import time

import torch
import triton
from triton.testing import do_bench

QUANTILES = [0.2, 0.5, 0.8]
#: --causal of the benchmarks: which grid cells run
CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}


def wall_ms(fn, rep=100):
    """(p20, p50, p80) wall ms of fn()."""
    p20, p50, p80 = do_bench(fn, warmup=25, rep=rep, quantiles=QUANTILES)
    return p20, p50, p80


def kernel_us(fn, calls=5):
    """{kernel name (its first 40 characters): GPU us per call of fn()}, from the profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            times[e.key[:40]] = times.get(e.key[:40], 0.0) + e.self_device_time_total / calls
    return times


def gpu_ms(fn, calls=10, kernel=""):
    """Summed device time of the kernels one call of fn() launches, in ms (mean over `calls`); only those whose
    name starts with `kernel` when it is given."""
    return sum(us for name, us in kernel_us(fn, calls).items() if name.startswith(kernel)) / 1e3


def host_ms(fn, calls=20):
    """Median ms for fn() to return, starting from an idle, synchronized GPU."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e3


def machine():
    """The top-level fields of a results file. The commit: $FLASHFUSE_COMMIT when set (a copied tree's .git,
    if any, may be older than its files), else git's HEAD."""
    commit = os.environ.get("FLASHFUSE_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except OSError:
            commit = ""
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit or "unknown",
            "date": datetime.date.today().isoformat()}


def save(rows, name, folder=None):
    """Write {machine..., "rows": rows} to bench/results/<name>-<date>.json (or `folder`); returns the path."""
    folder = folder or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    info = machine()
    path = os.path.join(folder, f"{name}-{info['date']}.json")
    with open(path, "w") as f:
        json.dump({**info, "rows": rows}, f, indent=1)
    return path
