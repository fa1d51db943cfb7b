"""Attention kernels side by side on a CUDA GPU: flashfuse against SDPA's backends and FlexAttention.

    python bench/kernels.py                         # the full grid, GQA, bias and decode rows
    python bench/kernels.py --n 1024 4096 --d 64 128 --impl flashfuse sdpa_cudnn --no-decode
    python bench/plot.py bench/results/kernels-<date>.json    # the PNG (also written here when matplotlib is there)

Rows (one per implementation and shape): fwd and bwd wall ms (p20 / p50 / p80 of triton's do_bench), GPU
kernel ms per call (torch.profiler), TFLOP/s from the p50 wall time, and host ms per call. `flashfuse` runs
through its public function, `flashfuse.attention`, so its host cost is in the wall time as it is for SDPA;
`flashfuse_compiled` is an SDPA call compiled with backend="flashfuse", the kernels launched from inductor's
code as in a compiled model; `flashfuse_fp8` the public function with fp8=True (forward rows only: inference).
bwd = (fwd + bwd) - fwd for every other implementation.

FLOPs (counting multiply-adds as 2): forward 4 * B * Hq * Nq * Nk * D, halved when causal (half the pairs are
visible); backward 2.5 x forward (dQ, dK, dV and the recomputed scores). Decode rows report TB/s: the K/V bytes
read over the GPU time. Grid: B * H * N = 256k (H = 16), N in 512..16k, D in 64, 128, 256.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import timing  # noqa: E402

import flashfuse  # noqa: E402

DEV = "cuda"
SDPA = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
IMPLS = ["flashfuse", "flashfuse_compiled", "flashfuse_fp8", *SDPA, "flex"]
FORWARD_ONLY = {"flashfuse_fp8"}  # inference paths: forward rows only


def attention_fn(impl, q, k, v, causal, bias=None):
    """fn() computing attention with `impl`, or None when the implementation cannot run the case."""
    gqa = q.shape[1] != k.shape[1]
    if impl == "flashfuse":
        return lambda: flashfuse.attention(q, k, v, causal=causal, bias=bias)
    if impl == "flashfuse_fp8":  # e4m3 q, k, v after the Hadamard rotation of q and k; bf16 out
        return lambda: flashfuse.attention(q, k, v, causal=causal, bias=bias, fp8=True)
    if impl == "flashfuse_compiled":  # an SDPA call compiled with backend="flashfuse": what a model's graph runs
        def sdpa(q, k, v, bias):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, enable_gqa=gqa)
        torch._dynamo.reset()
        compiled = torch.compile(sdpa, backend="flashfuse")
        return lambda: compiled(q, k, v, bias)
    if impl in SDPA:
        def run():
            with sdpa_kernel(SDPA[impl]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal, enable_gqa=gqa)
        return run
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        torch._dynamo.reset()  # a fresh compile per shape: past dynamo's recompile limit flex runs unfused, eagerly
        compiled = torch.compile(flex_attention, dynamic=False)
        n, nk = q.shape[2], k.shape[2]
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, i, j: j <= i + nk - n, None, None, n, nk, device=DEV)
        score_mod = None
        if bias is not None:
            def score_mod(score, b, h, i, j):
                return score + bias[b, 0, i, j]
        return lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
    raise ValueError(impl)


def measure(impl, b, h, hkv, n, d, causal, bias=False, dtype=torch.bfloat16, by_kernel=False):
    """One row: forward and backward of `impl` at (B, H/Hkv, N, D); with `by_kernel`, also the forward's GPU us
    per kernel (`fwd_kernels_us`)."""
    torch.manual_seed(0)
    q = torch.randn(b, h, n, d, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, n, d, device=DEV, dtype=dtype, requires_grad=True)
    bias_t = torch.randn(b, 1, n, n, device=DEV, dtype=dtype, requires_grad=True) if bias else None
    leaves = [t for t in (q, k, v, bias_t) if t is not None]
    row = dict(impl=impl, B=b, H=h, Hkv=hkv, N=n, D=d, causal=causal, bias=bias, dtype=str(dtype).split(".")[-1])
    if impl in FORWARD_ONLY:
        return _measure_forward(impl, row, q.detach(), k.detach(), v.detach(), causal, bias_t, by_kernel)
    try:
        fwd = attention_fn(impl, q, k, v, causal, bias_t)
        out = fwd()
        dout = torch.randn_like(out)
        both = lambda: torch.autograd.grad(fwd(), leaves, dout)  # noqa: E731
        both()
    except Exception as exc:  # an implementation that refuses the case gets a row that says so
        return dict(row, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    f20, f50, f80 = timing.wall_ms(fwd)
    a20, a50, a80 = timing.wall_ms(both)
    f_gpu, a_gpu = timing.gpu_ms(fwd), timing.gpu_ms(both)
    row.update(fwd_ms=f50, fwd_ms_p20=f20, fwd_ms_p80=f80, bwd_ms=a50 - f50, bwd_ms_p20=a20 - f20, bwd_ms_p80=a80 - f80,
               fwd_gpu_ms=f_gpu, bwd_gpu_ms=a_gpu - f_gpu, fwd_host_ms=timing.host_ms(fwd),
               fwd_bwd_host_ms=timing.host_ms(both))
    row.update(fwd_tflops=flops / f50 * 1e-9, bwd_tflops=2.5 * flops / max(a50 - f50, 1e-9) * 1e-9)
    if by_kernel:
        row["fwd_kernels_us"] = timing.kernel_us(fwd)
    return row


def _measure_forward(impl, row, q, k, v, causal, bias, by_kernel=False):
    """A forward-only row (no backward: bwd fields None)."""
    b, h, n, d = q.shape
    try:
        fwd = attention_fn(impl, q, k, v, causal, None if bias is None else bias.detach())
        with torch.no_grad():
            fwd()
            f20, f50, f80 = timing.wall_ms(fwd)
            f_gpu, host = timing.gpu_ms(fwd), timing.host_ms(fwd)
            if by_kernel:
                row = dict(row, fwd_kernels_us=timing.kernel_us(fwd))
    except Exception as exc:
        return dict(row, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    return dict(row, fwd_ms=f50, fwd_ms_p20=f20, fwd_ms_p80=f80, fwd_gpu_ms=f_gpu, fwd_host_ms=host,
                fwd_tflops=flops / f50 * 1e-9, bwd_ms=None, bwd_gpu_ms=None, fwd_bwd_host_ms=None, bwd_tflops=None)


def measure_decode(impl, b, h, hkv, nk, d, dtype=torch.bfloat16):
    torch.manual_seed(0)
    q = torch.randn(b, h, 1, d, device=DEV, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, device=DEV, dtype=dtype)
    row = dict(impl=impl, B=b, H=h, Hkv=hkv, N=1, Nk=nk, D=d, causal=False, bias=False, dtype="bfloat16",
               decode=True)
    nbytes = 2 * k.numel() * k.element_size()
    if impl == "copy":  # the bandwidth ceiling: a device copy of the same bytes (read + write counted)
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEV)
        dst = torch.empty_like(src)
        fn = lambda: dst.copy_(src)  # noqa: E731
    else:
        fn = attention_fn(impl, q, k, v, False)
    try:
        with torch.no_grad():
            fn()
            f20, f50, f80 = timing.wall_ms(fn)
            gpu = timing.gpu_ms(fn)
            host = timing.host_ms(fn)
    except Exception as exc:
        return dict(row, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    return dict(row, fwd_ms=f50, fwd_ms_p20=f20, fwd_ms_p80=f80, fwd_gpu_ms=gpu, fwd_host_ms=host,
                tbps=nbytes / (gpu * 1e-3) * 1e-12, fwd_tflops=None, bwd_tflops=None)


def show(row):
    if "fwd_kernels_us" in row:
        kernels = sorted(row["fwd_kernels_us"].items(), key=lambda item: -item[1])
        print(f"| {row['impl']:<14} | {_shape(row):<24} | forward by kernel: "
              + ", ".join(f"{name} {us:.0f} us" for name, us in kernels), flush=True)
    if "error" in row:
        print(f"| {row['impl']:<14} | {_shape(row):<24} | refused: {row['error'][:80]}", flush=True)
        return
    if row.get("decode"):
        print(f"| {row['impl']:<14} | {_shape(row):<24} | wall {row['fwd_ms'] * 1e3:7.1f} us | gpu "
              f"{row['fwd_gpu_ms'] * 1e3:7.1f} us | host {row['fwd_host_ms'] * 1e3:6.1f} us | {row['tbps']:.2f} TB/s |",
              flush=True)
        return
    if row.get("bwd_ms") is None:
        print(f"| {row['impl']:<14} | {_shape(row):<24} | fwd {row['fwd_ms']:7.3f} ms {row['fwd_tflops']:4.0f} TF/s "
              f"gpu {row['fwd_gpu_ms']:7.3f} | bwd — | host fwd {row['fwd_host_ms']:.3f} ms |", flush=True)
        return
    print(f"| {row['impl']:<14} | {_shape(row):<24} | fwd {row['fwd_ms']:7.3f} ms {row['fwd_tflops']:4.0f} TF/s "
          f"gpu {row['fwd_gpu_ms']:7.3f} | bwd {row['bwd_ms']:7.3f} ms {row['bwd_tflops']:4.0f} TF/s gpu "
          f"{row['bwd_gpu_ms']:7.3f} | host fwd {row['fwd_host_ms']:.3f} fwd+bwd {row['fwd_bwd_host_ms']:.3f} ms |",
          flush=True)


def _shape(row):
    heads = f"{row['H']}/{row['Hkv']}" if row["Hkv"] != row["H"] else f"{row['H']}"
    n = f"1x{row['Nk']}" if row.get("decode") else f"{row['N']}"
    flags = ("c" if row["causal"] else "nc") + (" bias" if row["bias"] else "")
    return f"{row['B']}x{heads}x{n} d{row['D']} {flags}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--impl", nargs="+", default=IMPLS)
    parser.add_argument("--causal", choices=list(timing.CAUSAL), default="both", help="grid cells to run")
    parser.add_argument("--tokens", type=int, default=256 * 1024, help="B * H * N of every grid cell")
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--no-extra", action="store_true", help="skip the GQA and bias rows")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--by-kernel", action="store_true", help="also each forward's GPU time per kernel")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []

    def add(row):  # saved after every row, so a run cut short keeps what it measured
        rows.append(row)
        show(row)
        timing.save(rows, "kernels", args.out)
    h = 16
    if not args.no_grid:
        for d in args.d:
            for n in args.n:
                for causal in timing.CAUSAL[args.causal]:
                    for impl in args.impl:
                        add(measure(impl, max(1, args.tokens // (h * n)), h, h, n, d, causal,
                                    by_kernel=args.by_kernel))
    if not args.no_extra:
        for hkv in (4, 2):  # GQA 4:1 and 8:1
            for causal in (False, True):
                for impl in args.impl:
                    add(measure(impl, 4, h, hkv, 4096, 128, causal))
        for impl in args.impl:
            add(measure(impl, 4, h, h, 4096, 128, False, bias=True))
    if not args.no_decode:
        for nk in (1024, 4096, 16384, 32768, 65536, 131072):
            for impl in ["flashfuse", "sdpa_cudnn", "sdpa_flash", "copy"]:
                add(measure_decode(impl, 8, 32, 4, nk, 128))
    path = timing.save(rows, "kernels", args.out)
    print(f"saved {path}", flush=True)
    try:
        import plot
        print(f"plotted {plot.plot(path)}", flush=True)
    except ImportError as exc:
        print(f"no plot ({exc}): run python bench/plot.py {path}")
    except ValueError as exc:
        print(f"no plot ({exc})")


if __name__ == "__main__":
    main()
