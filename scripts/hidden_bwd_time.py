"""On a CUDA machine: the backward's hidden-rows fix-up (flash_hidden.finish_backward, spec.fill_adds as Hugging
Face's padded decoders need) at padded-model shapes: GPU us per call of each of its two kernels, and the largest
difference from hidden_rows.finish_backward (the CPU path's formulas, run here on the GPU in fp32) relative to
the gradients' scale. Batch 0's first third of queries is hidden, as bench/models.py pads.

    python scripts/hidden_bwd_time.py
"""
import functools
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import timing  # noqa: E402

from flashfuse.kernels import flash, flash_hidden, hidden_rows  # noqa: E402
from flashfuse.kernels.spec import AttentionSpec  # noqa: E402

SHAPES = {"gpt2 8x12x1024 d64": (8, 12, 12, 1024, 64), "llama 4x16/4x2048 d64": (4, 16, 4, 2048, 64),
          "4x16/4x2048 d128": (4, 16, 4, 2048, 128)}


def inputs(b, hq, hkv, n, d):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    q, k, v, dout = randn(b, hq, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d), randn(b, hq, n, d)
    stats = torch.randn(2, b, hq, n, generator=g, device="cuda")
    stats[0, 0, :, : n // 3] = float("-inf")  # batch 0's padded queries
    grads = randn(b, hq, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d)
    return q, k, v, dout, stats, grads


def main():
    spec = AttentionSpec(scale=0.125, causal=True, mask_value=torch.finfo(torch.bfloat16).min,
                         empty_rows="average", fill_adds=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; GPU us per call")
    print("| shape | rows kernel | keys kernel | max err / scale |\n|---|---|---|---|")
    for name, shape in SHAPES.items():
        q, k, v, dout, stats, grads = inputs(*shape)
        want = hidden_rows.finish_backward(tuple(t.float() for t in grads), dout.float(), q.float(), k.float(),
                                           v.float(), stats, spec)
        got = flash_hidden.finish_backward(tuple(t.clone() for t in grads), dout, q, k, v, stats, spec, flash.direct)
        err = max(((a.float() - w).abs().max() / w.abs().max()).item() for a, w in zip(got, want))
        work = tuple(t.clone() for t in grads)
        call = functools.partial(flash_hidden.finish_backward, work, dout, q, k, v, stats, spec, flash.direct)
        times = timing.kernel_us(call, 10)
        rows = sum(us for n, us in times.items() if "rows" in n)
        keys = sum(us for n, us in times.items() if "keys" in n)
        print(f"| {name} | {rows:.1f} | {keys:.1f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
