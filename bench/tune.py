"""Sweep the launch configs of one kernel (configs.candidates) against the fixed one (configs.FIXED).

    python bench/tune.py --kind dkdv --d 256                  # on a CUDA GPU: GPU time of every candidate
    python bench/tune.py --kind fwd dq dkdv --d 64 128 256    # the whole sweep (minutes per kernel and head dim)
    python bench/tune.py --kind dkdv --d 256 --compile-only   # no GPU needed: registers, spills, shared memory

On a GPU, each candidate runs forward + backward of `flashfuse.attention` at B x 16 heads x N (bf16, B * N = 16k
tokens per head, causal and not) with only kernel `kind` launched through the candidate (configs.override); the
row is that kernel's GPU time per call (torch.profiler) and its ratio to the fixed config's in the same process.
A candidate's output and gradients must equal the fixed config's within the bf16 tolerance, else it is reported
as wrong and never a winner. Results go to bench/results/tune-<date>.json. A winner worth keeping goes into
configs.FIXED by hand, after bench/kernels.py and bench/gpu_check.py agree.

--compile-only compiles each candidate's launch for sm_90 (scripts/compile_kernels.py) and prints what it uses:
the first screen for spills before any GPU time is spent.
"""
import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"  # the GPU configs, never the interpreter's
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "scripts"))

import compile_kernels  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flashfuse  # noqa: E402
from flashfuse.kernels import configs  # noqa: E402
from flashfuse.tolerances import GRADIENT, relative_error  # noqa: E402

KERNELS = {"fwd": "_fwd_kernel", "dq": "_dq_kernel", "dkdv": "_dkdv_kernel", "fp8": "_fp8_fwd_kernel"}


def _label(cfg):
    return f"M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"


def compile_only(kinds, dims):
    """Print registers, spill bytes and shared memory of every candidate, compiled for sm_90."""
    ck = compile_kernels
    target = GPUTarget("cuda", 90, 32)
    print(f"triton {triton.__version__}, sm_90; fixed configs marked *")
    for d in dims:
        for causal in (False, True):
            fields = {"causal": True} if causal else {}
            for kind in kinds:
                fixed = configs.default(kind, d)
                for cfg in configs.candidates(kind, d):
                    with configs.override(kind, cfg):
                        recorded = ck.launches(1, 2, 2, 512, 512, d, torch.bfloat16,
                                               {**fields, "fp8": "incoherent"} if kind == "fp8" else fields, None,
                                               None)
                    kernel, args, kwargs = next(r for r in recorded if r[0].fn.__name__ == KERNELS[kind])
                    sig, constants, attrs, options = ck.signature(kernel, args, kwargs)
                    try:
                        compiled = triton.compile(ASTSource(kernel, sig, constants, attrs), target=target,
                                                  options=options)
                    except Exception as exc:  # a config the compiler rejects is a result, not a crash
                        print(f"{kind:<5} d{d} {'c ' if causal else 'nc'} {_label(cfg):<18} failed: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}", flush=True)
                        continue
                    regs, stack = ck.resources(compiled)
                    shared = compiled.metadata.shared
                    over = " > shared memory" if shared > configs.SHARED_MEMORY[90] else ""
                    mark = "*" if cfg == fixed else " "
                    print(f"{kind:<5} d{d} {'c ' if causal else 'nc'} {_label(cfg):<18}{mark} regs {regs:>3} "
                          f"spill {stack:>5} B smem {shared:>6}{over}", flush=True)


def sweep(kinds, dims, n, causals):
    """Time every candidate on the GPU; returns the rows."""
    rows = []
    for d in dims:
        for causal in causals:
            b, h = max(1, 16 * 1024 // n), 16
            problems = {}  # fp8 or not -> (run, its result with the fixed configs)
            for kind in kinds:
                if (kind == "fp8") not in problems:
                    run = _problem(b, h, n, d, causal, fp8=kind == "fp8")
                    problems[kind == "fp8"] = run, run()
                run, expected = problems[kind == "fp8"]
                fixed = configs.default(kind, d)
                base = None  # the fixed config's time, measured first
                for cfg in [fixed] + [c for c in configs.candidates(kind, d) if c != fixed]:
                    row = dict(kind=kind, B=b, H=h, N=n, D=d, causal=causal, config=cfg, fixed=cfg == fixed)
                    with configs.override(kind, cfg):
                        try:
                            got = run()
                        except Exception as exc:  # out of resources: a result, not a crash
                            rows.append(dict(row, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"))
                            print(f"{kind:<5} d{d} {'c ' if causal else 'nc'} {_label(cfg):<18} "
                                  f"{rows[-1]['error']}", flush=True)
                            continue
                        error = max(relative_error(a, e) for a, e in zip(got, expected))
                        us = timing.gpu_ms(run, kernel=KERNELS[kind]) * 1e3
                    if row["fixed"]:
                        base = us
                    ratio = base / us if base else None
                    # against the fixed config's bf16 result, itself checked against float64 by gpu_check.py
                    row.update(gpu_us=us, vs_fixed=ratio, max_rel_error=error, wrong=error > GRADIENT[torch.bfloat16])
                    rows.append(row)
                    print(f"{kind:<5} d{d} {'c ' if causal else 'nc'} {_label(cfg):<18}{'*' if row['fixed'] else ' '} "
                          f"{us:8.1f} us  {ratio or 0:5.2f}x  err {error:.1e}{'  WRONG' if row['wrong'] else ''}",
                          flush=True)
                    timing.save(rows, "tune")
    return rows


def _problem(b, h, n, d, causal, fp8=False):
    """fn() -> (out, dq, dk, dv) of one bf16 forward + backward on fresh random inputs; with fp8, (out,) of the
    FP8 forward (the kernel kind "fp8" has no backward)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=not fp8)
               for _ in range(3))
    dout = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    if fp8:
        return lambda: (flashfuse.attention(q, k, v, causal=causal, fp8=True),)

    def run():
        out = flashfuse.attention(q, k, v, causal=causal)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", nargs="+", choices=sorted(KERNELS), default=sorted(KERNELS))
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--causal", choices=list(timing.CAUSAL), default="both")
    parser.add_argument("--compile-only", action="store_true", help="no GPU: compile each candidate for sm_90")
    args = parser.parse_args(argv)
    if args.compile_only:
        compile_only(args.kind, args.d)
        return
    causals = timing.CAUSAL[args.causal]
    rows = sweep(args.kind, args.d, args.n, causals)
    for kind in args.kind:
        for d in args.d:
            for causal in causals:
                found = [r for r in rows if r["kind"] == kind and r["D"] == d and r["causal"] == causal
                         and r.get("vs_fixed") and not r["wrong"]]
                if found:
                    best = max(found, key=lambda r: r["vs_fixed"])
                    print(f"best {kind:<5} d{d} {'causal' if causal else 'non-causal'}: {_label(best['config'])} "
                          f"{best['vs_fixed']:.2f}x the fixed config")


if __name__ == "__main__":
    main()
