"""GPU check of the flash kernels: correctness at realistic sizes, then timing against SDPA's backends.

    python bench/gpu_check.py                 # correctness + timing table (fixed configs)
    python bench/gpu_check.py --no-bench      # correctness only
    compute-sanitizer --tool memcheck python bench/gpu_check.py --sanitize   # tiny ragged shapes only

--sanitize runs fp32 inputs with ieee products: Triton then multiplies without wgmma, whose shared-memory
operand reads compute-sanitizer misreports as out of bounds on Hopper (NVIDIA/compute-sanitizer-samples#19);
the global-memory addressing under test does not depend on the dtype.

Correctness compares out, logsumexp and every gradient with the float64 oracle
(flashfuse.kernels.reference.oracle_gradients) by ||x - ref|| / ||ref|| under flashfuse.tolerances.
Timing: median of triton.testing.do_bench; FLOPs fwd = 4 * B * H * Nq * Nk * D (x0.5 causal), bwd = 2.5 x fwd.
"""
import argparse
import os
import sys

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--no-bench", action="store_true", help="correctness only")
ARGS.add_argument("--sanitize", action="store_true",
                  help="tiny ragged shapes, correctness only (for compute-sanitizer)")
ARGS.add_argument("--only", default="", help="run only cases whose name contains this")
ARGS.add_argument("--bench-only", action="store_true", help="timing only")
ARGS.add_argument("--shapes", default="all", help="timing shapes: all, or main (4k d128 and 1k d64)")
OPTS = ARGS.parse_args()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fp8_accuracy  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import flashfuse  # noqa: E402
from flashfuse.kernels import flash  # noqa: E402
from flashfuse.kernels.reference import oracle, oracle_gradients  # noqa: E402
from flashfuse.kernels.spec import AttentionSpec  # noqa: E402
from flashfuse.tolerances import FORWARD, FP8_FORWARD, GRADIENT, TF32, relative_error  # noqa: E402

DEV = "cuda"
MIN = torch.finfo(torch.float32).min


def _err(a, b):
    a, b = a.double(), b.double()
    ok = torch.isfinite(b)
    if not torch.equal(ok, torch.isfinite(a)):
        return float("inf")
    return relative_error(a[ok], b[ok])


def check(name, b, hq, hkv, nq, nk, d, dv=None, dtype=torch.bfloat16, causal=False, window=(-1, -1), bias=None,
          mask=None, mask_value=float("-inf"), softcap=0.0, dropout_p=0.0, layout="bhnd", tf32=False, left_pad=0,
          right_pad=0, empty_rows="nan", fill_adds=False, bias_last=False, dlse=False):
    dv = d if dv is None else dv
    torch.backends.cuda.matmul.allow_tf32 = tf32
    mk = (lambda s: torch.randn(s[0], s[2], s[1], s[3], device=DEV, dtype=dtype).transpose(1, 2)) \
        if layout == "bnhd" else (lambda s: torch.randn(s, device=DEV, dtype=dtype))
    q, k, v = mk((b, hq, nq, d)), mk((b, hkv, nk, d)), mk((b, hkv, nk, dv))
    bias_t = None if bias is None else torch.randn(bias, device=DEV, dtype=dtype)
    mask_t = None if mask is None else torch.rand(mask, device=DEV) > 0.2
    if left_pad:
        mask_t[0, ..., :left_pad] = False  # the first queries of batch 0 see no key under causal
    if right_pad:
        mask_t[-1, ..., nk - right_pad:] = False
    seed = torch.tensor([42], dtype=torch.int64, device=DEV) if dropout_p else None
    spec = AttentionSpec(scale=d ** -0.5, softcap=softcap, mask_value=mask_value, causal=causal, window=window,
                         dropout_p=dropout_p, empty_rows=empty_rows, fill_adds=fill_adds, bias_last=bias_last)
    out, stats = flash.forward(q, k, v, bias_t, mask_t, seed, spec)
    dout = torch.randn_like(out)
    dlse_t = torch.randn(stats.shape[1:], device=DEV) if dlse else None  # a sink's gradient of the logsumexp
    grads = flash.backward(dout, q, k, v, bias_t, mask_t, seed, out, stats, spec, bias_t is not None, dlse=dlse_t)
    torch.cuda.synchronize()
    keep = flash.dropout_scale(seed, (b, hq, nq, nk), spec, DEV, torch.float64) if dropout_p else None
    ref_out, ref_lse, *ref_grads = oracle_gradients(dout, q, k, v, spec, bias_t, mask_t, keep)
    if dlse:  # float64 autograd through the oracle's out and lse together
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        o, lse = oracle(*leaves, spec, mask=mask_t)
        loss = (o * dout.double()).sum() + (lse * dlse_t.double()).sum()
        ref_grads = [*torch.autograd.grad(loss, leaves), None]
    errs = {"out": _err(out, ref_out), "lse": _err(stats[0].double() + stats[1].double(), ref_lse)}
    for n, g, want in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
        if want is not None and g is not None:
            errs[n] = relative_error(g, want) if torch.isfinite(g).all() else float("inf")
    if dtype == torch.float32 and tf32:
        tol_f, tol_g = TF32["forward"], TF32["gradient"]
    else:
        tol_f, tol_g = FORWARD[dtype], GRADIENT[dtype]
    ok = all(e < (tol_f if n in ("out", "lse") else tol_g) for n, e in errs.items())
    print(f"{'ok ' if ok else 'BAD'} {name:<34} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    del ref_out, ref_grads
    torch.cuda.empty_cache()
    return ok


CASES = [
    ("nc 2x4x2048 d64 fp16", dict(b=2, hq=4, hkv=4, nq=2048, nk=2048, d=64, dtype=torch.float16)),
    ("causal 1x2x8192 d128", dict(b=1, hq=2, hkv=2, nq=8192, nk=8192, d=128, causal=True)),
    ("causal 1x2x4096 d256", dict(b=1, hq=2, hkv=2, nq=4096, nk=4096, d=256, causal=True)),
    ("gqa 1x8/2x2048 d128 causal", dict(b=1, hq=8, hkv=2, nq=2048, nk=2048, d=128, causal=True)),
    ("bias B1NN 2x4x1024 d128", dict(b=2, hq=4, hkv=4, nq=1024, nk=1024, d=128, bias=(2, 1, 1024, 1024))),
    ("bias 1H1N+mask 2x4x2048 d64", dict(b=2, hq=4, hkv=4, nq=2048, nk=2048, d=64, bias=(1, 4, 1, 2048),
                                         mask=(2, 1, 1, 2048))),
    ("window(256,0) 1x4x4096 d128", dict(b=1, hq=4, hkv=4, nq=4096, nk=4096, d=128, window=(256, 0))),
    ("ragged 2x3x1000x1531 d96 fp16", dict(b=2, hq=3, hkv=3, nq=1000, nk=1531, d=96, dtype=torch.float16,
                                           mask=(2, 3, 1000, 1531), softcap=30.0, layout="bnhd")),
    ("d80/dv160 causal 1x2x777x1200", dict(b=1, hq=2, hkv=1, nq=777, nk=1200, d=80, dv=160, causal=True)),
    # GPT-Neo's order, where(mask, s, fill) + bias; a small fill lets masked keys weigh, and dbias covers every key
    ("bias_last fill -5 2x4x1024 d64", dict(b=2, hq=4, hkv=4, nq=1024, nk=1024, d=64, mask=(1, 4, 1024, 1024),
                                            mask_value=-5.0, bias=(2, 1, 1024, 1024), bias_last=True)),
    ("finfo.min mask 1x2x512 d64", dict(b=1, hq=2, hkv=2, nq=512, nk=512, d=64, mask=(1, 1, 512, 1),
                                        mask_value=-3.4e38)),
    ("keypad causal avg 2x8/2x2048 d128", dict(b=2, hq=8, hkv=2, nq=2048, nk=2048, d=128, causal=True,
                                               mask=(2, 1, 1, 2048), mask_value=MIN, left_pad=300,
                                               empty_rows="average", fill_adds=True)),
    ("keypad window avg 2x4x1024 d64", dict(b=2, hq=4, hkv=4, nq=1024, nk=1024, d=64, window=(256, 0),
                                            mask=(2, 1, 1, 1024), mask_value=-1e9, left_pad=100,
                                            empty_rows="average")),
    # ModernBERT's local layers: a two-sided band with key padding, rows whose band is all padding averaged
    ("keypad window(64,64) avg 2x4x1024 d64", dict(b=2, hq=4, hkv=4, nq=1024, nk=1024, d=64, window=(64, 64),
                                                   mask=(2, 1, 1, 1024), mask_value=MIN, left_pad=300,
                                                   empty_rows="average", fill_adds=True)),
    ("keypad decode 4x32/8 q1 k4096", dict(b=4, hq=32, hkv=8, nq=1, nk=4096, d=128, causal=True,
                                           mask=(4, 1, 1, 4096), mask_value=MIN, empty_rows="average")),
    # whole key blocks hidden, so the kernels skip them (flash_common.skips_padding)
    ("keypad -inf left/right 2x8/2x2048 d64 c", dict(b=2, hq=8, hkv=2, nq=2048, nk=2048, d=64, causal=True,
                                                     mask=(2, 1, 1, 2048), left_pad=700, right_pad=500,
                                                     empty_rows="zero")),
    ("keypad decode left 4x32/8 q1 k8192", dict(b=4, hq=32, hkv=8, nq=1, nk=8192, d=128, causal=True,
                                                mask=(4, 1, 1, 8192), mask_value=MIN, left_pad=3000,
                                                empty_rows="average")),
    ("lse gradient gqa causal 2x8/2x1024 d128", dict(b=2, hq=8, hkv=2, nq=1024, nk=1024, d=128, causal=True,
                                                     dlse=True)),
    ("dropout 1x2x1024 d64", dict(b=1, hq=2, hkv=2, nq=1024, nk=1024, d=64, dropout_p=0.1, causal=True)),
    ("ragged d40/dv24 bf16 1x2x77x131", dict(b=1, hq=2, hkv=1, nq=77, nk=131, d=40, dv=24, causal=True,
                                              bias=(1, 2, 77, 131))),
    ("fp32 ieee 1x2x1024 d64", dict(b=1, hq=2, hkv=2, nq=1024, nk=1024, d=64, dtype=torch.float32)),
    ("fp32 tf32 1x2x1024 d64", dict(b=1, hq=2, hkv=2, nq=1024, nk=1024, d=64, dtype=torch.float32, tf32=True)),
    ("decode 4x32/8 q1 k16384 d128", dict(b=4, hq=32, hkv=8, nq=1, nk=16384, d=128)),
    ("decode 2x16/2 q16 k8192 causal", dict(b=2, hq=16, hkv=2, nq=16, nk=8192, d=128, causal=True)),
    ("decode dropout 2x8/2 q2 k5000", dict(b=2, hq=8, hkv=2, nq=2, nk=5000, d=128, dropout_p=0.2)),
    ("decode q4 k5000 bias window d64", dict(b=2, hq=4, hkv=2, nq=4, nk=5000, d=64, bias=(2, 4, 4, 5000),
                                             window=(1000, 0))),
]

SANITIZE = [(name, dict(kw, dtype=torch.float32)) for name, kw in [
    ("san ragged causal", dict(b=1, hq=2, hkv=1, nq=77, nk=131, d=40, dv=24, causal=True, bias=(1, 2, 77, 131))),
    ("san window mask", dict(b=2, hq=2, hkv=2, nq=130, nk=65, d=72, window=(20, 3), mask=(2, 1, 130, 1),
                             layout="bnhd")),
    ("san bias bcast", dict(b=2, hq=4, hkv=2, nq=33, nk=190, d=64, bias=(1, 4, 1, 190), dropout_p=0.2)),
    ("san decode", dict(b=2, hq=8, hkv=2, nq=3, nk=1000, d=128, causal=True, bias=(2, 1, 3, 1000))),
    ("san d256", dict(b=1, hq=1, hkv=1, nq=100, nk=100, d=256, causal=True)),
]]


FP8_CASES = [  # (name, B, Hq, Hkv, N, D, causal, key-padding left pad of batch 0 or 0, softcap)
    ("fp8 2x8/2x4096 d128", 2, 8, 2, 4096, 128, False, 0, 0.0),
    ("fp8 1x4x8192 d128 causal", 1, 4, 4, 8192, 128, True, 0, 0.0),
    ("fp8 2x4x2048 d64 causal keypad softcap", 2, 4, 4, 2048, 64, True, 300, 30.0),
    ("fp8 1x4x2048 d256", 1, 4, 4, 2048, 256, False, 0, 0.0),
]


def check_fp8(name, b, hq, hkv, n, d, causal, left_pad, softcap):
    """The FP8 forward (plain and incoherent) against the float64 oracle: within FP8_FORWARD on random inputs, and
    on outlier channels the rotation must lower the error (bench/fp8_accuracy.py has the same inputs)."""
    errs = {}
    for outliers in (False, True):
        q, k, v, scale = fp8_accuracy.inputs(b, hq, hkv, n, d, outliers, DEV)
        mask = None
        if left_pad:
            mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=DEV)
            mask[0, ..., :left_pad] = False
        spec = AttentionSpec(scale=scale, causal=causal, softcap=softcap, empty_rows="zero")
        want, _ = oracle(q.double(), k.double(), v.double(), spec, mask=mask)
        for mode in ("plain", "incoherent"):
            with torch.no_grad():
                out = flashfuse.attention(q, k, v, scale=scale, mask=mask, causal=causal, softcap=softcap or None,
                                          empty_rows="zero", fp8=mode)
            errs[("outliers " if outliers else "") + mode] = _err(out, want)
        del want
    ok = errs["plain"] < FP8_FORWARD and errs["incoherent"] < FP8_FORWARD \
        and errs["outliers incoherent"] < errs["outliers plain"]
    print(f"{'ok ' if ok else 'BAD'} {name:<34} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    torch.cuda.empty_cache()
    return ok


# -- timing ------------------------------------------------------------------------------------------------------

EDGES = [  # (name, B, Hq, Nq, Nk, D): nothing to compute, or a head dim no kernel tile holds
    ("edge empty batch", 0, 4, 64, 64, 64), ("edge no heads", 2, 0, 64, 64, 64),
    ("edge no queries", 2, 4, 0, 64, 64), ("edge no keys", 2, 4, 64, 0, 64), ("edge decode no keys", 2, 4, 1, 0, 64),
    ("edge d512 causal bf16", 1, 2, 300, 300, 512),
]


def check_edge(name, b, hq, nq, nk, d, device=DEV):
    """flashfuse.attention end to end (autograd) at an edge: eager's shapes and zeros when there is nothing to
    compute; the oracle's answer at a head dim the kernels cannot hold (decided before launch, never raised)."""
    dtype = torch.bfloat16
    q = torch.randn(b, hq, nq, d, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, hq, nk, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    try:
        out = flashfuse.attention(q, k, v, causal=nq == nk)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    except Exception as e:  # an edge must never raise
        print(f"BAD {name:<34} raised {type(e).__name__}: {str(e).splitlines()[0][:80]}", flush=True)
        return False
    if min(b, hq, nq, nk) == 0:
        ok = out.shape == (b, hq, nq, d) and not out.any() and all(
            g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v)))
        print(f"{'ok ' if ok else 'BAD'} {name:<34} shapes and zeros as eager", flush=True)
        return ok
    spec = AttentionSpec(scale=d ** -0.5, causal=nq == nk)
    ref_out, _, *ref_grads = oracle_gradients(dout, q, k, v, spec)
    errs = {"out": relative_error(out, ref_out), **{n: relative_error(g, w) for n, g, w in
                                                      zip(("dq", "dk", "dv"), grads, ref_grads)}}
    ok = errs["out"] < FORWARD[dtype] and all(e < GRADIENT[dtype] for n, e in errs.items() if n != "out")
    print(f"{'ok ' if ok else 'BAD'} {name:<34} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()), flush=True)
    return ok


def _time(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sdpa(backend, q, k, v, causal, gqa):
    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    return run


def bench_shape(b, h, hkv, n, d, causal, dtype=torch.bfloat16):
    q = torch.randn(b, h, n, d, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, n, d, device=DEV, dtype=dtype, requires_grad=True)
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    spec = AttentionSpec(scale=d ** -0.5, causal=causal)
    rows = []
    out, stats = flash.forward(q, k, v, None, None, None, spec)
    dout = torch.randn_like(out)
    fwd = _time(lambda: flash.forward(q, k, v, None, None, None, spec))
    bwd = _time(lambda: flash.backward(dout, q, k, v, None, None, None, out, stats, spec, False))
    rows.append(("flashfuse", fwd, bwd))
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        run = _sdpa(backend, q, k, v, causal, hkv != h)
        try:
            o = run()
            f = _time(run)
            fb = _time(lambda run=run: torch.autograd.grad(run(), (q, k, v), dout))
            rows.append((name, f, fb - f))
            del o
        except RuntimeError as e:
            rows.append((name + " (refused)", float("nan"), float("nan")))
            print(f"  {name}: {str(e).splitlines()[0][:90]}")
    shape = f"{b}x{h}{'/' + str(hkv) if hkv != h else ''}x{n}x{d}"
    for impl, f, bw in rows:
        print(f"| {shape:<16} | {'c' if causal else 'nc':<2} | {impl:<15} | {f:7.3f} | {flops / f * 1e-9:5.0f} "
              f"| {bw:7.3f} | {2.5 * flops / bw * 1e-9:5.0f} |", flush=True)


def _time_graph(fn):
    """GPU time alone: replay a CUDA graph of fn (decode is short enough for launch overhead to show)."""
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def bench_decode(b, h, hkv, nk, d, dtype=torch.bfloat16):
    q = torch.randn(b, h, 1, d, device=DEV, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, device=DEV, dtype=dtype)
    nbytes = 2 * k.numel() * k.element_size()
    spec = AttentionSpec(scale=d ** -0.5)
    ours = lambda: flash.forward(q, k, v, None, None, None, spec)  # noqa: E731
    rows = [("flashfuse", ours)]
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        rows.append((name, _sdpa(backend, q, k, v, False, True)))
    for impl, fn in rows:
        try:
            fn()
            t, tg = _time(fn), _time_graph(fn)
        except RuntimeError:
            t = tg = float("nan")
        print(f"| decode {b}x{h}/{hkv} Nk={nk} | {impl:<15} | {t * 1e3:7.1f} us | {tg * 1e3:7.1f} us "
              f"| {nbytes / tg * 1e-9:5.2f} TB/s |", flush=True)


def main():
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    cases = [] if OPTS.bench_only else SANITIZE if OPTS.sanitize else CASES
    cases = [(name, kw) for name, kw in cases if OPTS.only in name]
    bad = 0
    for name, kw in cases:
        bad += not check(name, **kw)
    edges = [] if OPTS.bench_only or OPTS.sanitize else [e for e in EDGES if OPTS.only in e[0]]
    for edge in edges:
        bad += not check_edge(*edge)
    fp8_cases = [] if OPTS.bench_only or OPTS.sanitize else [c for c in FP8_CASES if OPTS.only in c[0]]
    for case in fp8_cases:
        bad += not check_fp8(*case)
    total = len(cases) + len(edges) + len(fp8_cases)
    print(f"correctness: {total - bad}/{total} ok", flush=True)
    if OPTS.sanitize or OPTS.no_bench:
        return bad
    torch.backends.cuda.matmul.allow_tf32 = False
    print("| B x H x N x D | c | impl | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    shapes = ((16, 16, 16, 1024, 64), (8, 16, 16, 2048, 128), (4, 16, 16, 4096, 128), (1, 16, 16, 16384, 128),
              (4, 16, 4, 4096, 128), (2, 16, 16, 4096, 256))
    if OPTS.shapes == "main":
        shapes = ((16, 16, 16, 1024, 64), (4, 16, 16, 4096, 128))
    for b, h, hkv, n, d in shapes:
        for causal in (False, True):
            bench_shape(b, h, hkv, n, d, causal)
    print("| decode | impl | eager | CUDA graph | K/V read |")
    print("|---|---|---|---|---|")
    for nk in (4096, 16384, 65536):
        bench_decode(8, 32, 4, nk, 128)
    return bad


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
