"""On a CUDA machine: padded GPT-2 inference under backend="flashfuse", the eager-attention and the SDPA model
compiled in turn (eager, sdpa, eager, sdpa, eager), each after torch._dynamo.reset(), in one process: wall p50
and GPU time per step, and the GPU time of the MLP's GELU kernel, of the flash forward and of the hidden-rows
fix-up. It tells a difference between the two models from run-to-run noise of the same kernels.

    python scripts/padded_repeats.py [--model gpt2-124M] [--rounds 5]
"""
import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import timing  # noqa: E402

import flashfuse  # noqa: E402,F401  (registers the backend)
from flashfuse.testing import models  # noqa: E402


def summed(times, pick):
    return sum(us for name, us in times.items() if pick(name))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-124M")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for n in range(args.rounds):
        attn = ("eager", "sdpa")[n % 2]
        torch._dynamo.reset()
        model, inputs = models.build(args.model, device="cuda", dtype=torch.bfloat16, attn=attn, padding=True)
        run = torch.compile(model.eval(), backend="flashfuse")

        def infer(run=run, inputs=inputs):
            with torch.no_grad():
                return run(**inputs)

        for _ in range(3):
            infer()
        torch.cuda.synchronize()
        wall = timing.wall_ms(infer)[1]
        times = timing.kernel_us(infer, 3)
        print(f"{attn:6s} wall p50 {wall:.3f} ms  gpu {sum(times.values()) / 1e3:.3f} ms  "
              f"gelu {summed(times, lambda k: 'tanh' in k):.0f} us  "
              f"flash fwd {summed(times, lambda k: k.startswith('_fwd_kernel')):.0f} us  "
              f"hidden-rows fix-up {summed(times, lambda k: 'hidden' in k):.0f} us", flush=True)
        del run, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
