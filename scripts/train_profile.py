"""On a CUDA machine: where a whole model's training step spends GPU time, two variants of bench/models.py side
by side in one process: GPU us per step by kernel, largest differences first, and the totals by kind
(attention, matmul, the rest).

    python scripts/train_profile.py [--model gpt2-124M] [--padding] [--variants sdpa_inductor flashfuse]
"""
import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import timing  # noqa: E402
from models import VARIANTS  # noqa: E402

import flashfuse  # noqa: E402,F401  (registers the backend)
from flashfuse.testing import models  # noqa: E402

KINDS = {"attention": ("_fwd_kernel", "_dq", "_dkdv", "_hidden", "fmha", "flash", "attention", "cudnn"),
         "matmul": ("gemm", "nvjet", "sm90", "cutlass", "ampere", "triton_tem")}


def kind(name):
    low = name.lower()
    return next((k for k, marks in KINDS.items() if any(m.lower() in low for m in marks)), "rest")


def step_times(name, variant, padding):
    torch._dynamo.reset()
    attn, backend = VARIANTS[variant]
    model, inputs = models.build(name, device="cuda", dtype=torch.bfloat16, attn=attn, padding=padding)
    run = torch.compile(model.train(), backend=backend) if backend else model.train()

    def train():
        models.first_output(run(**inputs)).float().mean().backward()

    for _ in range(3):
        train()
    wall = timing.wall_ms(train)[1]
    times = timing.kernel_us(train, 3)
    return wall, times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-124M")
    parser.add_argument("--padding", action="store_true")
    parser.add_argument("--variants", nargs=2, default=["sdpa_inductor", "flashfuse"])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    (a, b), results = args.variants, [step_times(args.model, v, args.padding) for v in args.variants]
    (wall_a, ta), (wall_b, tb) = results
    print(f"{args.model} padding={args.padding}: wall p50 {a} {wall_a:.2f} ms, {b} {wall_b:.2f} ms")
    for k in ("attention", "matmul", "rest"):
        sa = sum(us for n, us in ta.items() if kind(n) == k)
        sb = sum(us for n, us in tb.items() if kind(n) == k)
        print(f"  {k:9s} {a} {sa:8.0f} us   {b} {sb:8.0f} us")
    print(f"  {'total':9s} {a} {sum(ta.values()):8.0f} us   {b} {sum(tb.values()):8.0f} us")
    names = sorted(set(ta) | set(tb), key=lambda n: -abs(ta.get(n, 0) - tb.get(n, 0)))
    print(f"| kernel | kind | {a} us | {b} us |\n|---|---|---|---|")
    for n in names[:args.top]:
        print(f"| {n} | {kind(n)} | {ta.get(n, 0):.0f} | {tb.get(n, 0):.0f} |")


if __name__ == "__main__":
    main()
