"""On a CUDA machine: host and GPU time of one compiled attention forward + backward, per spec feature, beside
SDPA's (cuDNN) under the same torch.compile. Shows what each feature of the op adds to the host's work when
inductor launches the kernels (flashfuse's op is a triton_op, so its launches sit in inductor's code).

    python scripts/op_host_cost.py [--code DIR]    # DIR: inductor's generated code for each variant

GPT-2's attention shape by default (8 x 12 x 1024, d64, bf16); a (B, 1, 1, N) key mask hides a third of the
first sequence's keys on the left.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import timing  # noqa: E402

from flashfuse.kernels import op  # noqa: E402
from flashfuse.kernels.spec import AttentionSpec  # noqa: E402

FINFO_MIN = torch.finfo(torch.bfloat16).min
VARIANTS = {
    "causal": dict(causal=True),
    "causal + key mask": dict(causal=True, mask=True),
    "causal + key mask, average rows": dict(causal=True, mask=True, mask_value=FINFO_MIN, empty_rows="average"),
    "causal + key mask, average rows, fill adds": dict(causal=True, mask=True, mask_value=FINFO_MIN,
                                                      empty_rows="average", fill_adds=True),
    "causal + dropout 0.1": dict(causal=True, dropout_p=0.1),
    "GPT-2 padded training (all of the above)": dict(causal=True, mask=True, mask_value=FINFO_MIN,
                                                     empty_rows="average", fill_adds=True, dropout_p=0.1),
}


def flashfuse_step(options, q, k, v, keys):
    options = dict(options)
    mask = keys if options.pop("mask", False) else None
    spec = AttentionSpec(scale=q.shape[-1] ** -0.5, **options)
    return op.call(q, k, v, spec, mask=mask)[0]


def sdpa_step(mask, q, k, v, keys):
    if mask:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys.expand(-1, -1, q.shape[2], -1).tril())
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def measure(fn, q, k, v, keys):
    compiled = torch.compile(fn, fullgraph=True)
    dout = torch.randn_like(q)

    def call():
        out = compiled(q, k, v, keys)
        out.backward(dout)
    _, code = run_and_get_code(call)
    return timing.host_ms(call, calls=21) * 1e3, timing.gpu_ms(call, calls=5) * 1e3, timing.wall_ms(call)[1] * 1e3, code


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[8, 12, 1024, 64], metavar=("B", "H", "N", "D"))
    parser.add_argument("--code", default=None, help="write inductor's generated code per variant to this folder")
    args = parser.parse_args()
    b, h, n, d = args.shape
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    keys = torch.ones(b, 1, 1, n, dtype=torch.bool, device="cuda")
    keys[0, ..., : n // 3] = False
    rows = [(name, lambda *t, o=options: flashfuse_step(o, *t)) for name, options in VARIANTS.items()]
    rows += [("SDPA causal", lambda *t: sdpa_step(False, *t)),
             ("SDPA causal + key mask", lambda *t: sdpa_step(True, *t))]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, B{b} H{h} N{n} d{d} bf16, compiled fwd+bwd")
    print("| variant | host µs | GPU µs | wall µs |\n|---|---|---|---|")
    for i, (name, fn) in enumerate(rows):
        torch._dynamo.reset()
        host, gpu, wall, code = measure(fn, q, k, v, keys)
        if args.code:
            os.makedirs(args.code, exist_ok=True)
            with open(os.path.join(args.code, f"variant{i}.py"), "w") as f:
                f.write(f"# {name}\n" + "\n\n".join(code))
        print(f"| {name} | {host:.0f} | {gpu:.0f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
