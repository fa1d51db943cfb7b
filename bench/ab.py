"""This tree against another commit, side by side in one process on a CUDA GPU (the GPU is noisy across
processes): `flashfuse.attention` forward and forward + backward, wall and GPU kernel time per call.

    python bench/ab.py 83ba1ec                  # this tree (new) against commit 83ba1ec (old)
    python bench/ab.py 83ba1ec --shapes gpt2 d256   # only the shapes whose name contains "gpt2" or "d256"
    python bench/ab.py --prepare 83ba1ec .ab    # on a machine without git: write the old package first ...
    python bench/ab.py .ab                      # ... and compare against that folder

The other commit's package is copied out of git as `flashfuse_ab` (imports and op namespace renamed), so both
load at once; each shape alternates old, new, old, new and keeps each side's best p50.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import timing  # noqa: E402

import flashfuse  # noqa: E402

# name: (B, Hq, Hkv, Nq, Nk, D, causal[, dropout_p[, padded[, fp8[, bias]]]]); padded: a (B, 1, 1, Nk) key mask
# hiding the first third of the keys of row 0 ("row0", as bench/models.py pads) or of every row ("all"); fp8: the
# FP8 forward (fp8=True; forward rows only); bias: a bf16 bias that gets a gradient, of BIASES' shape
SHAPES = {
    "gpt2 8x12x1024 d64 c": (8, 12, 12, 1024, 1024, 64, True),
    "gpt2 8x12x1024 d64 c dropout 0.1": (8, 12, 12, 1024, 1024, 64, True, 0.1),
    "4x16x2048 d128 nc dropout 0.1": (4, 16, 16, 2048, 2048, 128, False, 0.1),
    "16x16x1024 d64 c": (16, 16, 16, 1024, 1024, 64, True),
    "16x16x1024 d64 nc": (16, 16, 16, 1024, 1024, 64, False),
    "4x16x4096 d128 nc": (4, 16, 16, 4096, 4096, 128, False),
    "4x16x4096 d128 c": (4, 16, 16, 4096, 4096, 128, True),
    "gqa 4x16/4x4096 d128 c": (4, 16, 4, 4096, 4096, 128, True),
    "1x16x16384 d128 c": (1, 16, 16, 16384, 16384, 128, True),
    "2x16x4096 d256 nc": (2, 16, 16, 4096, 4096, 256, False),
    "2x16x4096 d256 c": (2, 16, 16, 4096, 4096, 256, True),
    "gpt2 8x12x1024 d64 c keypad row0": (8, 12, 12, 1024, 1024, 64, True, 0.0, "row0"),
    "gpt2 8x12x1024 d64 c keypad all": (8, 12, 12, 1024, 1024, 64, True, 0.0, "all"),
    "4x16/4x2048 d128 nc keypad all": (4, 16, 4, 2048, 2048, 128, False, 0.0, "all"),
    "decode 8x32/4 q1 k4096 d128 keypad all": (8, 32, 4, 1, 4096, 128, False, 0.0, "all"),
    "decode 8x32/4 q1 k4096 d128": (8, 32, 4, 1, 4096, 128, False),
    "decode 8x32/4 q1 k131072 d128": (8, 32, 4, 1, 131072, 128, False),
    "fp8 4x16x4096 d128 nc": (4, 16, 16, 4096, 4096, 128, False, 0.0, None, True),
    "fp8 4x16x4096 d128 c": (4, 16, 16, 4096, 4096, 128, True, 0.0, None, True),
    "fp8 1x16x16384 d128 c": (1, 16, 16, 16384, 16384, 128, True, 0.0, None, True),
    "bias (B,1,N,N) 4x16x4096 d128 nc": (4, 16, 16, 4096, 4096, 128, False, 0.0, None, False, "batch"),
    "bias (1,H,N,N) 4x16x4096 d128 nc": (4, 16, 16, 4096, 4096, 128, False, 0.0, None, False, "head"),
    "bias (B,1,N,N) gpt2 8x12x1024 d64 c": (8, 12, 12, 1024, 1024, 64, True, 0.0, None, False, "batch"),
    "bias (B,1,1,N) gpt2 8x12x1024 d64 c": (8, 12, 12, 1024, 1024, 64, True, 0.0, None, False, "key"),
}
#: bias kind -> its shape for (B, Hq, Nq, Nk)
BIASES = {"batch": lambda b, h, nq, nk: (b, 1, nq, nk), "head": lambda b, h, nq, nk: (1, h, nq, nk),
          "key": lambda b, h, nq, nk: (b, 1, 1, nk)}


def prepare(commit, folder):
    """Write the package at `commit` into folder/flashfuse_ab."""
    os.makedirs(folder, exist_ok=True)
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, cwd=HERE,
                          check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "flashfuse"], capture_output=True, cwd=root, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    os.rename(os.path.join(folder, "flashfuse"), os.path.join(folder, "flashfuse_ab"))
    for dirpath, _, files in os.walk(os.path.join(folder, "flashfuse_ab")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                text = open(path).read()
                text = re.sub(r"\bflashfuse\.", "flashfuse_ab.", text)
                text = re.sub(r"\bfrom flashfuse import", "from flashfuse_ab import", text)
                text = text.replace('"flashfuse::', '"flashfuse_ab::').replace("ops.flashfuse.", "ops.flashfuse_ab.")
                text = text.replace('register_backend(flashfuse_backend, name="flashfuse")', "pass")
                open(path, "w").write(text)


def load_old(commit_or_folder):
    """The other package, importable as flashfuse_ab: from a folder `prepare` wrote, or from a commit."""
    folder = commit_or_folder
    if not os.path.isdir(os.path.join(folder, "flashfuse_ab")):
        folder = tempfile.mkdtemp(prefix="flashfuse-ab-")
        prepare(commit_or_folder, folder)
    sys.path.insert(0, os.path.abspath(folder))
    import flashfuse_ab
    return flashfuse_ab


def key_padding(b, nk, padded):
    """{} or {"mask": (B, 1, 1, Nk) bool} hiding the first third of row 0's keys or of every row's."""
    if not padded:
        return {}
    mask = torch.ones(b, 1, 1, nk, dtype=torch.bool, device="cuda")
    mask[:1 if padded == "row0" else b, ..., :nk // 3] = False
    return {"mask": mask}


def grad_inputs(q, k, v, extra):
    """What the backward differentiates: q, k, v and the bias when there is one."""
    return (q, k, v) + ((extra["bias"],) if "bias" in extra else ())


def with_bias(kind, b, hq, nq, nk, train):
    """{} or {"bias": a bf16 tensor of BIASES[kind]'s shape that requires grad when training}."""
    if not kind:
        return {}
    shape = BIASES[kind](b, hq, nq, nk)
    return {"bias": torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=train)}


def measure(attention, b, hq, hkv, nq, nk, d, causal, dropout_p=0.0, padded=None, fp8=False, bias=None):
    torch.manual_seed(0)
    train = nq > 1 and not fp8
    q = torch.randn(b, hq, nq, d, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    k = torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    v = torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    extra = dict(key_padding(b, nk, padded), **({"fp8": True} if fp8 else {}),
                 **with_bias(bias, b, hq, nq, nk, train))
    fwd = lambda: attention(q, k, v, causal=causal, dropout_p=dropout_p, **extra)  # noqa: E731
    with torch.no_grad():
        result = {"fwd": timing.wall_ms(fwd)[1], "fwd_gpu": timing.gpu_ms(fwd), "fwd_host": timing.host_ms(fwd)}
    if train:
        out = fwd()
        dout = torch.randn_like(out)
        both = lambda: torch.autograd.grad(fwd(), grad_inputs(q, k, v, extra), dout)  # noqa: E731
        both()
        result.update(both=timing.wall_ms(both)[1], both_gpu=timing.gpu_ms(both), both_host=timing.host_ms(both))
    return result


def kernel_times(attention, b, hq, hkv, nq, nk, d, causal, dropout_p=0.0, padded=None, fp8=False, bias=None,
                 calls=5):
    """{kernel name: GPU us per forward + backward call} (per forward call for fp8)."""
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=not fp8)
               for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    extra = dict(key_padding(b, nk, padded), **with_bias(bias, b, hq, nq, nk, not fp8))
    if fp8:
        with torch.no_grad():
            return timing.kernel_us(lambda: attention(q, k, v, causal=causal, fp8=True, **extra), calls)
    out = attention(q, k, v, causal=causal, dropout_p=dropout_p, **extra)
    dout = torch.randn_like(out)
    return timing.kernel_us(lambda: torch.autograd.grad(
        attention(q, k, v, causal=causal, dropout_p=dropout_p, **extra), grad_inputs(q, k, v, extra), dout), calls)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="a commit, or a folder written by --prepare")
    parser.add_argument("folder", nargs="?", help="with --prepare: where to write the old package")
    parser.add_argument("--prepare", action="store_true", help="only write the old package into `folder`")
    parser.add_argument("--shapes", nargs="+", default=[""], help="only shapes whose name contains one of these")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kernels", action="store_true", help="also each side's GPU time per kernel")
    args = parser.parse_args()
    if args.prepare:
        return prepare(args.commit, args.folder)
    old = load_old(args.commit)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; old = {args.commit}, new = this tree; "
          f"us per call, best p50 of {args.rounds} alternating rounds")
    print("| shape | fwd wall old / new | fwd gpu old / new | fwd host old / new | fwd+bwd wall old / new "
          "| fwd+bwd gpu old / new | fwd+bwd host old / new |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        if not any(part in name for part in args.shapes):
            continue
        best = {"old": {}, "new": {}}
        for _ in range(args.rounds):
            for side, module in (("old", old), ("new", flashfuse)):
                for key, value in measure(module.attention, *shape).items():
                    best[side][key] = min(value, best[side].get(key, float("inf")))
        cells = []
        for key in ("fwd", "fwd_gpu", "fwd_host", "both", "both_gpu", "both_host"):
            if key in best["new"]:
                o, n = best["old"][key] * 1e3, best["new"][key] * 1e3
                cells.append(f"{o:.0f} / {n:.0f} ({n / o:.2f}x)")
            else:
                cells.append("")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
        if args.kernels and shape[3] > 1:
            for side, module in (("old", old), ("new", flashfuse)):
                times = sorted(kernel_times(module.attention, *shape).items(), key=lambda item: -item[1])
                print(f"    {side}: " + ", ".join(f"{kernel} {us:.0f} us" for kernel, us in times))


if __name__ == "__main__":
    main()
