"""On a CUDA machine: where an eager `flashfuse.attention` call spends its host time (issue 9's host target).

For GPT-2's attention shape (forward + backward) and decode at 4k keys: wall, GPU and host time per call beside
SDPA (cuDNN); then each kernel launch alone, through Triton's `kernel[grid]` and through the compiled kernel's
own launcher; then the heaviest functions of a profile of the whole call.

    python scripts/eager_host_cost.py [--profile N]    # N: how many functions of the profile to print
"""
import argparse
import cProfile
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import timing  # noqa: E402

import flashfuse  # noqa: E402
from flashfuse.kernels import flash  # noqa: E402
from flashfuse.kernels.spec import AttentionSpec  # noqa: E402

SHAPES = {  # name -> (q shape, kv shape, causal, backward)
    "GPT-2 fwd+bwd 8x12x1024 d64 causal": ((8, 12, 1024, 64), (8, 12, 1024, 64), True, True),
    "decode 1 query, 32 on 4 heads, 4k keys d128": ((1, 32, 1, 128), (1, 4, 4096, 128), False, False),
}


def inputs(q_shape, kv_shape, grad):
    def make(shape):
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    return make(q_shape), make(kv_shape), make(kv_shape)


def call(attend, q, k, v, grad):
    def step():
        out = attend(q, k, v)
        if grad:
            out.backward(torch.ones_like(out))
    return step


def ours(causal):
    return lambda q, k, v: flashfuse.attention(q, k, v, causal=causal)


def sdpa(causal):
    def attend(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return attend


def per_call_table():
    print("| call | wall us | GPU us | host us |\n|---|---|---|---|")
    for name, (qs, kvs, causal, grad) in SHAPES.items():
        q, k, v = inputs(qs, kvs, grad)
        for impl, attend in (("flashfuse", ours(causal)), ("sdpa_cudnn", sdpa(causal))):
            step = call(attend, q, k, v, grad)
            wall = timing.wall_ms(step)[1]
            print(f"| {name}, {impl} | {wall * 1e3:.0f} | {timing.gpu_ms(step) * 1e3:.0f} | "
                  f"{timing.host_ms(step) * 1e3:.0f} |", flush=True)


def recorded_launches(q, k, v, spec):
    """(kernel, grid, args, kwargs) of each launch of one forward + backward."""
    found = []

    def launch(kernel, grid):
        def record(*args, **kwargs):
            found.append((kernel, grid, args, kwargs))
            kernel[grid](*args, **kwargs)
        return record
    out, stats = flash.forward(q, k, v, None, None, None, spec, launch=launch)
    flash.backward(torch.ones_like(out), q, k, v, None, None, None, out, stats, spec, False, launch=launch)
    return found


def launch_us(launch, args, kwargs, repeats):
    """Host microseconds per launch(*args, **kwargs), from an idle GPU."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        launch(*args, **kwargs)
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / repeats * 1e6


def per_launch_table(repeats=200):
    qs, kvs, causal, _ = SHAPES["GPT-2 fwd+bwd 8x12x1024 d64 causal"]
    q, k, v = inputs(qs, kvs, False)
    spec = AttentionSpec(scale=qs[-1] ** -0.5, causal=causal)
    print("\n| kernel | args | kernel[grid] us | compiled launcher us |\n|---|---|---|---|")
    for kernel, grid, args, kwargs in recorded_launches(q, k, v, spec):
        compiled = kernel[grid](*args, **kwargs)
        defaults = kernel.signature.parameters
        bound = [*args, *(kwargs.get(p.name, defaults[p.name].default) for p in kernel.params[len(args):])]
        runner = compiled[tuple(grid) + (1,) * (3 - len(grid))]
        times = [launch_us(kernel[grid], args, kwargs, repeats), launch_us(runner, bound, {}, repeats)]
        print(f"| {kernel.fn.__name__} | {len(args) + len(kwargs)} | {times[0]:.1f} | {times[1]:.1f} |", flush=True)


def profile(top):
    qs, kvs, causal, grad = SHAPES["GPT-2 fwd+bwd 8x12x1024 d64 causal"]
    q, k, v = inputs(qs, kvs, grad)
    step = call(ours(causal), q, k, v, grad)
    step()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(200):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"\nprofile of 200 forward + backward calls (cProfile inflates; read proportions), top {top} by own time:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=int, default=30)
    args = parser.parse_args()
    print(timing.machine())
    per_call_table()
    per_launch_table()
    profile(args.profile)


if __name__ == "__main__":
    main()
