"""How far FP8 attention is from float64, beside bf16: the kernels, then whole models' outputs.

    python bench/fp8_accuracy.py                              # CUDA: the Triton kernels, full-size models
    TRITON_INTERPRET=1 python bench/fp8_accuracy.py --small   # CPU: the same kernels in Triton's interpreter

Kernel rows: ||out - oracle|| / ||oracle|| (tolerances.relative_error) for `bf16` (the bf16 kernels), `fp8_plain`
(e4m3 q, k, v, per-token q / k scales) and `fp8_incoherent` (the same after the random Hadamard rotation of q and
k), on random inputs and on inputs with outliers (OUTLIER_CHANNELS channels of q and k times OUTLIER_FACTOR, the
scale divided by it so that the softmax stays as spread). Model rows: a model with random weights compiled with
backend="flashfuse" in bf16, and with options={"fp8": True}: the relative error of the FP8 run's last hidden
state against the bf16 run's, and how often the top-1 token of the logits (the hidden state times the token
embedding, GPT-2's tied head) agrees. Results go to results/fp8-accuracy-<date>.json.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timing  # noqa: E402

from flashfuse.kernels import op  # noqa: E402
from flashfuse.kernels.reference import oracle  # noqa: E402
from flashfuse.kernels.spec import AttentionSpec  # noqa: E402
from flashfuse.testing import models  # noqa: E402
from flashfuse.tolerances import relative_error  # noqa: E402

OUTLIER_CHANNELS, OUTLIER_FACTOR = 3, 100.0
MODES = {"bf16": "", "fp8_plain": "plain", "fp8_incoherent": "incoherent"}


def inputs(b, h, hkv, n, d, outliers, device, seed=0):
    """(q, k, v, scale): bf16 inputs, with outlier channels in q and k when asked."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, x, n, d, generator=gen) for x in (h, hkv, hkv))
    scale = d ** -0.5
    if outliers:
        q[..., :OUTLIER_CHANNELS] *= OUTLIER_FACTOR
        k[..., :OUTLIER_CHANNELS] *= OUTLIER_FACTOR
        scale /= OUTLIER_FACTOR
    return (*(t.to(device, torch.bfloat16) for t in (q, k, v)), scale)


def kernel_errors(b, h, hkv, n, d, causal, outliers, device):
    """{mode: relative error of the op's output against the float64 oracle}."""
    q, k, v, scale = inputs(b, h, hkv, n, d, outliers, device)
    spec = AttentionSpec(scale=scale, causal=causal)
    want, _ = oracle(q.double(), k.double(), v.double(), spec)
    with torch.no_grad():
        return {mode: relative_error(op.call(q, k, v, spec.replace(fp8=fp8))[0], want) for mode, fp8 in MODES.items()}


def model_errors(name, device, batch=None, seq=None):
    """(relative error of the FP8 hidden state against bf16's, top-1 agreement of the logits)."""
    model, feed = models.build(name, device=device, dtype=torch.bfloat16, batch=batch, seq=seq)
    outs = {}
    with torch.no_grad():
        for label, options in (("bf16", {}), ("fp8", {"fp8": True})):
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="flashfuse", options=options)
            outs[label] = models.first_output(compiled(**feed)).float()
    table = model.get_input_embeddings().weight.float()
    top = [(outs[label] @ table.T).argmax(-1) for label in ("bf16", "fp8")]
    return relative_error(outs["fp8"], outs["bf16"]), (top[0] == top[1]).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU-interpreter sizes (N 256, tiny models)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args()
    device = "cpu" if args.small else "cuda"
    shapes = [(1, 4, 2, 256, 64), (1, 2, 2, 256, 128)] if args.small else [(2, 16, 4, 4096, 128),
                                                                           (1, 16, 16, 8192, 64)]
    rows = []
    print("| inputs | B x H/Hkv x N x D | causal | " + " | ".join(MODES) + " |")
    print("|---|---|---|" + "---|" * len(MODES))
    for outliers in (False, True):
        for b, h, hkv, n, d in shapes:
            for causal in (False, True):
                errs = kernel_errors(b, h, hkv, n, d, causal, outliers, device)
                kind = "outliers" if outliers else "random"
                rows.append(dict(kind="kernel", inputs=kind, B=b, H=h, Hkv=hkv, N=n, D=d, causal=causal, **errs))
                print(f"| {kind} | {b}x{h}/{hkv}x{n}x{d} | {'yes' if causal else 'no'} | "
                      + " | ".join(f"{errs[m]:.2e}" for m in MODES) + " |", flush=True)
    print("| model | fp8 vs bf16 hidden state | top-1 agreement |")
    print("|---|---|---|")
    for name, batch, seq in ([("gpt2-4L-256", 2, 256), ("llama", 2, 128)] if args.small else
                             [("gpt2-124M", None, None), ("llama-gqa-0.5B", None, None)]):
        err, agree = model_errors(name, device, batch, seq)
        rows.append(dict(kind="model", model=name, hidden_error=err, top1_agreement=agree))
        print(f"| {name} | {err:.2e} | {agree:.4f} |", flush=True)
    if device == "cuda":
        timing.save(rows, "fp8-accuracy", args.out)


if __name__ == "__main__":
    main()
