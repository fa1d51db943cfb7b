"""On a CUDA machine: compile tiny left-padded models with backend="flashfuse" (inductor) and compare with eager,
printing the full error when compilation fails; then, with --profile, the top GPU kernels of one padded training
step of a benchmark model under flashfuse (the eager-attention model and the SDPA one) and under SDPA + inductor
(with --host, also the host time per step and the top CPU events: a cudaStreamSynchronize or device-to-host copy
there means the host waits for the GPU).

    python scripts/padded_compile_check.py [--profile gpt2-124M llama-gqa-0.5B] [--host] [--inference]
"""
import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import flashfuse  # noqa: E402,F401
from flashfuse.testing import models  # noqa: E402


def check():
    for family in ["gpt2", "llama"]:
        model, inputs = models.build(family, device="cuda", seq=64)
        try:
            expected = models.first_output(model(**inputs))
            got = models.first_output(torch.compile(model, backend="flashfuse")(**inputs))
            print(family, "ok", (got - expected).abs().max().item(), flush=True)
        except Exception:
            traceback.print_exc()


def profile(name, rows=14, host=False, inference=False):
    what = "inference" if inference else "training step"
    for attn, backend in (("eager", "flashfuse"), ("sdpa", "flashfuse"), ("sdpa", "inductor")):
        model, inputs = models.build(name, device="cuda", dtype=torch.bfloat16, attn=attn, padding=True)
        run = torch.compile(model.eval() if inference else model.train(), backend=backend)

        def step(run=run, inputs=inputs):
            if inference:
                with torch.no_grad():
                    run(**inputs)
            else:
                models.first_output(run(**inputs)).float().mean().backward()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        if host:
            seconds = []
            for _ in range(7):
                torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                seconds.append(time.perf_counter() - start)
            times = " ".join(f"{1e3 * t:.1f}" for t in seconds)
            print(f"== {name} {what}, {attn} + {backend}: host ms per step", times)
        activities = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if host else [])
        with torch.profiler.profile(activities=activities) as prof:
            step()
            torch.cuda.synchronize()
        print(f"== {name} padded {what}, {attn} + {backend}", flush=True)
        table = prof.key_averages()
        print(table.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))
        if host:
            print(table.table(sort_by="self_cpu_time_total", row_limit=2 * rows, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", nargs="*", default=[], help="benchmark models (flashfuse.testing.models.BENCH)")
    parser.add_argument("--host", action="store_true", help="also the host: time per step and the top CPU events")
    parser.add_argument("--inference", action="store_true", help="profile a forward under no_grad, in eval mode")
    args = parser.parse_args()
    check()
    for name in args.profile:
        profile(name, host=args.host, inference=args.inference)
