"""Compile the Triton kernels for a GPU target on a machine without one: every launch the launchers make for a
set of specs, through Triton's compiler to machine code, with each kernel's registers, spills and shared memory.

    python scripts/compile_kernels.py                 # sm_90 (Hopper), the default cases
    python scripts/compile_kernels.py --arch 90 --only decode

Catches what the interpreter cannot (constructs the compiler rejects, resources a config exceeds) before any
GPU time is spent. The launchers run on small CPU tensors with a launch hook that records each launch instead
of running it; the recorded arguments give the kernel's signature and constexprs.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ["TRITON_INTERPRET"] = "0"  # the GPU configs, not the interpreter's
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashfuse.kernels import configs, flash  # noqa: E402
from flashfuse.kernels.spec import AttentionSpec  # noqa: E402

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "u8", torch.float8_e4m3fn: "fp8e4nv"}

# name: (B, Hq, Hkv, Nq, Nk, D, dtype, spec fields (and dlse=True: a logsumexp gradient), bias shape, mask shape)
CASES = {
    "plain d64": (2, 4, 4, 300, 300, 64, torch.bfloat16, {}, None, None),
    "causal d128": (2, 4, 4, 300, 300, 128, torch.bfloat16, dict(causal=True), None, None),
    "plain d128": (2, 4, 4, 300, 300, 128, torch.bfloat16, {}, None, None),
    "aligned d128 4k": (1, 2, 2, 4096, 4096, 128, torch.bfloat16, {}, None, None),
    "window gqa d128": (2, 8, 2, 300, 300, 128, torch.bfloat16, dict(window=(64, 0)), None, None),
    "bias grad d64": (2, 4, 4, 300, 300, 64, torch.bfloat16, {}, (2, 1, 300, 300), None),
    "bias bcast mask softcap d64": (2, 4, 4, 300, 300, 64, torch.bfloat16, dict(softcap=30.0, mask_value=-1e9),
                                    (1, 4, 1, 300), (2, 1, 1, 300)),
    "bias last grad d64": (2, 4, 4, 300, 300, 64, torch.bfloat16, dict(mask_value=-5.0, bias_last=True),
                           (2, 1, 300, 300), (1, 4, 300, 300)),
    "dropout causal d64": (2, 4, 4, 300, 300, 64, torch.bfloat16, dict(causal=True, dropout_p=0.1), None, None),
    "d256 causal": (1, 2, 2, 300, 300, 256, torch.bfloat16, dict(causal=True), None, None),
    "d80/dv160 fp16": (1, 2, 1, 300, 300, 80, torch.float16, dict(causal=True), None, None),
    "fp32": (1, 2, 2, 300, 300, 64, torch.float32, {}, None, None),
    "decode gqa d128": (2, 32, 4, 1, 5000, 128, torch.bfloat16, {}, None, None),
    "decode mask window": (2, 8, 2, 4, 5000, 64, torch.bfloat16, dict(window=(1000, 0)), None, (2, 1, 1, 5000)),
    "empty rows zero": (2, 4, 4, 300, 200, 64, torch.bfloat16, dict(causal=True, empty_rows="zero"), None, None),
    "key padding causal d64": (2, 4, 2, 300, 300, 64, torch.bfloat16,
                               dict(causal=True, mask_value=-3.4e38, empty_rows="average", fill_adds=True,
                                    dlse=True), None, (2, 1, 1, 300)),
    "key padding gqa d128": (2, 8, 2, 300, 300, 128, torch.bfloat16,
                             dict(causal=True, mask_value=-3.4e38, empty_rows="average", fill_adds=True), None,
                             (2, 1, 1, 300)),
    "key padding d256": (1, 4, 2, 200, 200, 256, torch.bfloat16,
                         dict(mask_value=-3.4e38, empty_rows="average", fill_adds=True), None, (1, 1, 1, 200)),
    "key padding d256 decode": (2, 8, 2, 4, 3000, 256, torch.bfloat16,
                                dict(mask_value=-3.4e38, empty_rows="average", fill_adds=True), None, (2, 1, 1, 3000)),
    "fp8 d128": (2, 4, 4, 300, 300, 128, torch.bfloat16, dict(fp8="incoherent"), None, None),
    "fp8 aligned d128 4k": (1, 2, 2, 4096, 4096, 128, torch.bfloat16, dict(fp8="incoherent"), None, None),
    "fp8 plain causal d64": (2, 4, 4, 300, 300, 64, torch.bfloat16, dict(fp8="plain", causal=True), None, None),
    "fp8 key padding gqa softcap d128": (2, 8, 2, 300, 300, 128, torch.bfloat16,
                                         dict(fp8="incoherent", causal=True, softcap=30.0, mask_value=-3.4e38,
                                              empty_rows="average"), None, (2, 1, 1, 300)),
    "fp8 d256 window": (1, 4, 4, 300, 300, 256, torch.bfloat16, dict(fp8="incoherent", window=(100, 0)), None,
                        None),
}


def launches(b, hq, hkv, nq, nk, d, dtype, fields, bias_shape, mask_shape):
    """The (kernel, args, kwargs) of every launch a forward and a backward make for this case."""
    recorded = []

    def record(kernel, grid):
        return lambda *args, **kwargs: recorded.append((kernel, args, kwargs))
    dv = 2 * d if d == 80 else d
    q, k, v = torch.randn(b, hq, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype), \
        torch.randn(b, hkv, nk, dv, dtype=dtype)
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=dtype)
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.5
    fields = dict(fields)
    dlse = torch.zeros(b, hq, nq) if fields.pop("dlse", False) else None  # a gradient of the stats (a sink)
    spec = AttentionSpec(scale=d ** -0.5, **fields)
    seed = torch.zeros(1, dtype=torch.int64) if spec.dropout_p else None
    flash.forward(q, k, v, bias, mask, seed, spec, launch=record)
    out, stats = torch.zeros(b, hq, nq, dv, dtype=dtype), torch.zeros(2, b, hq, nq)
    if nq > 16 and not spec.fp8:  # the backward, unless this is a decode case or FP8 (forward only)
        flash.backward(out, q, k, v, bias, mask, seed, out, stats, spec, bias is not None, launch=record, dlse=dlse)
    return recorded


def signature(kernel, args, kwargs):
    """(signature, constexprs, attributes, options) as Triton's launcher would specialize them: ints equal to 1
    become constexprs, pointers and ints divisible by 16 are marked so."""
    names = list(kernel.arg_names)
    sig, constants, attrs = {}, {}, {}
    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    values = dict(zip(names, args)) | {key: val for key, val in kwargs.items() if key not in options}
    for index, name in enumerate(names):
        value = values[name]
        if index in kernel.constexprs:
            sig[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                sig[name] = "constexpr"
                constants[name] = 1
            else:
                sig[name] = "i64" if abs(value) >= 2**31 else "i32"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp64"  # as inductor types a Python float (a direct launch types it fp32)
    return sig, constants, attrs, options


def resources(compiled):
    """(registers, spill stores + loads in bytes) from the cubin, by the cuobjdump that ships with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return (int(regs.group(1)) if regs else -1), (int(stack.group(1)) if stack else -1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--only", default="", help="cases whose name contains this")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    print(f"triton {triton.__version__}, target sm_{args.arch}")
    failed = 0
    for name, case in CASES.items():
        if args.only not in name:
            continue
        for kernel, kargs, kwargs in launches(*case):
            sig, constants, attrs, options = signature(kernel, kargs, kwargs)
            start = time.time()
            try:
                compiled = triton.compile(ASTSource(kernel, sig, constants, attrs), target=target, options=options)
            except Exception as exc:
                failed += 1
                print(f"FAIL {name:<28} {kernel.fn.__name__:<22} {type(exc).__name__}: {str(exc)[:2000]}")
                continue
            meta = compiled.metadata
            limit = configs.SHARED_MEMORY.get(args.arch)
            if limit is not None and meta.shared > limit:
                failed += 1
                print(f"FAIL {name:<28} {kernel.fn.__name__:<22} shared memory {meta.shared} > {limit}")
                continue
            if os.environ.get("FLASHFUSE_DUMP"):
                os.makedirs(os.environ["FLASHFUSE_DUMP"], exist_ok=True)
                for ir in ("ttgir", "ptx", "cubin"):
                    case = re.sub(r"\W+", "_", name)  # one file per case and kernel
                    with open(os.path.join(os.environ["FLASHFUSE_DUMP"], f"{case}-{kernel.fn.__name__}.{ir}"),
                              "wb" if ir == "cubin" else "w") as f:
                        f.write(compiled.asm[ir])
            regs, stack = resources(compiled)
            print(f"ok   {name:<28} {kernel.fn.__name__:<22} regs {regs:>3} stack {stack:>4} smem {meta.shared:>6} "
                  f"warps {meta.num_warps} stages {meta.num_stages} {time.time() - start:5.1f}s", flush=True)
    print("all compiled" if not failed else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
