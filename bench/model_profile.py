"""Where one step of a whole model spends its time, per variant of bench/models.py: kernels launched, GPU time
by kernel, host time by event, and the calls that make the host wait for the GPU.

    python bench/model_profile.py --models gpt2-124M --padding yes --variants flashfuse sdpa_flashfuse

Use it when two variants' host or GPU times in bench/models.py differ and the reason is not known: a host time
at or above the GPU time with few launches points to a synchronization (a `cudaStreamSynchronize` or a device
to host copy in the list), many launches to launch cost.
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flashfuse  # noqa: E402,F401  (registers the backend)
from flashfuse.testing import models  # noqa: E402
from models import VARIANTS  # noqa: E402

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize", "aten::item",
         "aten::_local_scalar_dense")


def profile(step, calls):
    step()
    step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    gpu, host, launches, waits = collections.Counter(), collections.Counter(), 0, collections.Counter()
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            gpu[e.key[:48]] += e.self_device_time_total / calls
        else:
            host[e.key[:48]] += e.self_cpu_time_total / calls
        if "LaunchKernel" in e.key:
            launches += e.count / calls
        if e.key.startswith(WAITS):
            waits[e.key[:48]] += e.count / calls
    return gpu, host, launches, waits


def show(label, gpu, host, launches, waits, top):
    print(f"## {label}: {launches:.0f} launches, GPU {sum(gpu.values()) / 1e3:.2f} ms, "
          f"waits {dict((k, round(v, 1)) for k, v in waits.items()) or 'none'}")
    print("  GPU us: " + "; ".join(f"{k} {v:.0f}" for k, v in gpu.most_common(top)))
    print("  host us (self): " + "; ".join(f"{k} {v:.0f}" for k, v in host.most_common(top)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-124M"])
    parser.add_argument("--variants", nargs="+", default=["flashfuse", "sdpa_flashfuse"])
    parser.add_argument("--padding", choices=["no", "yes"], default="yes")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    for name in args.models:
        for variant in args.variants:
            torch._dynamo.reset()
            attn, backend = VARIANTS[variant]
            model, inputs = models.build(name, device="cuda", dtype=torch.bfloat16, attn=attn,
                                         padding=args.padding == "yes")
            run = torch.compile(model, backend=backend) if backend else model

            def infer():
                with torch.no_grad():
                    return models.first_output(run(**inputs))

            def train():
                models.first_output(run(**inputs)).float().mean().backward()

            model.eval()
            show(f"{name} {variant} inference", *profile(infer, args.calls), args.top)
            model.train()
            show(f"{name} {variant} training step", *profile(train, args.calls), args.top)
            del model, run
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
