"""empty_rows="average" on the Triton path: the fix-ups of hidden_rows.py as one kernel each way (the flash
forward kernel averages its hidden rows itself; this forward fix-up serves the decode and FP8 kernels).

Same rule and formulas as hidden_rows.py (the CPU path's version, which its docstring derives). Most rows are
not hidden, so each program first reads its rows' max from stats and does nothing more when none is hidden:
the GPU reads the stats, and the host launches one kernel instead of inductor's dozen small ones per call.

Forward, one program per (BLOCK_M queries, batch, q head): hidden rows get mean(v) and max -inf, log-sum 0.
Backward in two launches over BLOCK_D columns of D. First one program per (BLOCK_M queries, batch, q head): its
hidden rows' dq (fill_adds), and their sums added atomically into a (B * Hkv, ...) fp32 buffer (so their
rounding depends on the order the blocks add in; relaxed atomics, as nothing reads the sums before the next
launch: half the kernel's time at GPT-2's padded shape went to acq_rel ordering). Then one per (BLOCK_N keys,
batch, kv head): dv += sum(dout) / Nk and, with fill_adds, the k term. V^T K and dout^T q are (Dv, BLOCK_D)
products, never (Nq, Nk); a query block with hidden rows reads all keys once.
"""
import math

import torch
import triton
import triton.language as tl

from flashfuse.kernels import configs
from flashfuse.kernels.flash_common import _dot, fill_argument, precision
from flashfuse.kernels.flash_fwd import _hidden, _mean_v

BLOCK_M = 64
BLOCK_N = 64
#: Elements of v one step of the forward's mean loads: 256 keys at d64, 128 at d128, 64 at d256. Each step waits on
#: its load (nothing pipelines a plain sum), so fewer, wider steps: 4 at GPT-2's 1k keys instead of 16.
MEAN_TILE = 16384


@triton.jit
def _hidden_fwd_kernel(Out, Stats, V, so_b, so_h, so_m, ss_t, ss_b, ss_h, sv_b, sv_h, sv_n, n_heads, group, nq, nk,
                       fill, FINITE_FILL: tl.constexpr, DV: tl.constexpr, HEAD_DV: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(1) // n_heads
    h = tl.program_id(1) % n_heads
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ptrs = Stats + b * ss_b + h * ss_h + i
    m = tl.load(m_ptrs, mask=i < nq, other=0.0)
    # without FINITE_FILL, fill is a stand-in (fill_argument): -inf has no spelling in inductor's generated code
    hidden = _hidden(m, i < nq, tl.cast(fill, tl.float32), FINITE_FILL)
    if tl.sum(hidden.to(tl.int32), 0) > 0:
        offs_dv = tl.arange(0, HEAD_DV)
        mean = _mean_v(V + b * sv_b + (h // group) * sv_h, sv_n, nk, DV, HEAD_DV, BLOCK_N)
        rows = tl.zeros([BLOCK_M, HEAD_DV], tl.float32) + mean[None, :]
        tl.store(Out + b * so_b + h * so_h + i[:, None] * so_m + offs_dv[None, :], rows.to(Out.dtype.element_ty),
                 mask=hidden[:, None] & (offs_dv[None, :] < DV))
        tl.store(m_ptrs, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=hidden)
        tl.store(m_ptrs + ss_t, tl.zeros([BLOCK_M], tl.float32), mask=hidden)


@triton.jit
def _hidden_rows_bwd_kernel(Q, K, V, DO, Stats, GradQ, Sums, sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                            sdo_b, sdo_h, sdo_m, sdq_b, sdq_h, sdq_m, ss_b, ss_h, n_heads, group, nq, nk,
                            SCALE: tl.constexpr, FILL_ADDS: tl.constexpr, PRECISION: tl.constexpr, D: tl.constexpr,
                            DV: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """The hidden rows of BLOCK_M queries: their dq (FILL_ADDS), and their sums into Sums[b, kv head]:
    [count, sum(dout) (DV), dout^T q (DV, D), sum(delta q) (D)]."""
    b = tl.program_id(1) // n_heads
    h = tl.program_id(1) % n_heads
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m = tl.load(Stats + b * ss_b + h * ss_h + i, mask=i < nq, other=0.0)
    hid = (i < nq) & (m == float("-inf"))
    if tl.sum(hid.to(tl.int32), 0) > 0:
        offs_dv = tl.arange(0, HEAD_DV)
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        dv_ok = offs_dv[None, :] < DV
        d_ok = offs_d[None, :] < D
        W = Sums + (b * (n_heads // group) + h // group) * (1 + DV + DV * D + D)
        do = tl.load(DO + b * sdo_b + h * sdo_h + i[:, None] * sdo_m + offs_dv[None, :], mask=hid[:, None] & dv_ok,
                     other=0.0)
        if tl.program_id(2) == 0:
            count = tl.sum(hid.to(tl.float32), 0) + tl.zeros([1], tl.float32)
            tl.atomic_add(W + tl.arange(0, 1), count, sem="relaxed")
            tl.atomic_add(W + 1 + offs_dv, tl.sum(do.to(tl.float32), 0), mask=offs_dv < DV, sem="relaxed")
        if FILL_ADDS:
            # keys: mean(v), and V^T K and sum(k) on this program's columns of D
            Kh = K + b * sk_b + (h // group) * sk_h
            Vh = V + b * sv_b + (h // group) * sv_h
            v_total = tl.zeros([HEAD_DV], tl.float32)
            vtk = tl.zeros([HEAD_DV, BLOCK_D], tl.float32)
            k_total = tl.zeros([BLOCK_D], tl.float32)
            for start in range(0, nk, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N)
                vj = tl.load(Vh + j[:, None] * sv_n + offs_dv[None, :], mask=(j[:, None] < nk) & dv_ok, other=0.0)
                kj = tl.load(Kh + j[:, None] * sk_n + offs_d[None, :], mask=(j[:, None] < nk) & d_ok, other=0.0)
                v_total += tl.sum(vj.to(tl.float32), 0)
                vtk = _dot(tl.trans(vj), kj, vtk, PRECISION)
                k_total += tl.sum(kj.to(tl.float32), 0)
            c = SCALE / nk
            delta = tl.sum(do.to(tl.float32) * (v_total / nk)[None, :], 1)  # (BLOCK_M,): dout . mean(v)
            qi = tl.load(Q + b * sq_b + h * sq_h + i[:, None] * sq_m + offs_d[None, :], mask=hid[:, None] & d_ok,
                         other=0.0)
            dq_ptrs = GradQ + b * sdq_b + h * sdq_h + i[:, None] * sdq_m + offs_d[None, :]
            extra = _dot(do, vtk.to(do.dtype), None, PRECISION) - delta[:, None] * k_total[None, :]
            dq = tl.load(dq_ptrs, mask=hid[:, None] & d_ok, other=0.0).to(tl.float32) + c * extra
            tl.store(dq_ptrs, dq.to(GradQ.dtype.element_ty), mask=hid[:, None] & d_ok)
            doq = _dot(tl.trans(do), qi, None, PRECISION)  # (HEAD_DV, BLOCK_D)
            tl.atomic_add(W + 1 + DV + offs_dv[:, None] * D + offs_d[None, :], doq, mask=dv_ok.T & d_ok,
                          sem="relaxed")
            tl.atomic_add(W + 1 + DV + DV * D + offs_d, tl.sum(delta[:, None] * qi.to(tl.float32), 0),
                          mask=offs_d < D, sem="relaxed")


@triton.jit
def _hidden_keys_bwd_kernel(V, GradK, GradV, Sums, sv_b, sv_h, sv_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
                            n_kv_heads, nk, SCALE: tl.constexpr, FILL_ADDS: tl.constexpr, PRECISION: tl.constexpr,
                            D: tl.constexpr, DV: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_N: tl.constexpr):
    """BLOCK_N keys of one kv head, from Sums: dv += sum(dout) / Nk, dk += c (v @ dout^T q - sum(delta q))."""
    bg = tl.program_id(1)
    b = bg // n_kv_heads
    g = bg % n_kv_heads
    W = Sums + bg * (1 + DV + DV * D + D)
    if tl.load(W) > 0:
        j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_dv = tl.arange(0, HEAD_DV)
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        key_ok = j[:, None] < nk
        dv_ok = offs_dv[None, :] < DV
        d_ok = offs_d[None, :] < D
        if tl.program_id(2) == 0:
            dv_ptrs = GradV + b * sdv_b + g * sdv_h + j[:, None] * sdv_n + offs_dv[None, :]
            do_total = tl.load(W + 1 + offs_dv, mask=offs_dv < DV, other=0.0)
            dv = tl.load(dv_ptrs, mask=key_ok & dv_ok, other=0.0).to(tl.float32) + do_total[None, :] / nk
            tl.store(dv_ptrs, dv.to(GradV.dtype.element_ty), mask=key_ok & dv_ok)
        if FILL_ADDS:
            vj = tl.load(V + b * sv_b + g * sv_h + j[:, None] * sv_n + offs_dv[None, :], mask=key_ok & dv_ok,
                         other=0.0)
            doq = tl.load(W + 1 + DV + offs_dv[:, None] * D + offs_d[None, :], mask=dv_ok.T & d_ok, other=0.0)
            dq_total = tl.load(W + 1 + DV + DV * D + offs_d, mask=offs_d < D, other=0.0)
            dk_ptrs = GradK + b * sdk_b + g * sdk_h + j[:, None] * sdk_n + offs_d[None, :]
            extra = _dot(vj, doq.to(vj.dtype), None, PRECISION) - dq_total[None, :]
            dk = tl.load(dk_ptrs, mask=key_ok & d_ok, other=0.0).to(tl.float32) + (SCALE / nk) * extra
            tl.store(dk_ptrs, dk.to(GradK.dtype.element_ty), mask=key_ok & d_ok)


def _head_dim(n):
    return max(16, configs.pow2(n))


def _warps(dv):
    return 8 if dv > 128 else 4  # the (BLOCK, Dv) fp32 tiles spill on 4 warps at d256 (scripts/compile_kernels.py)


def finish_forward(out, stats, v, spec, launch):
    """hidden_rows.finish_forward on the GPU, in place on out (B, Hq, Nq, Dv) and stats (2, B, Hq, Nq)."""
    if spec.empty_rows != "average":
        return out, stats
    b, hq, nq, dv = out.shape
    hkv, nk = v.shape[1], v.shape[2]
    head_dv = _head_dim(dv)
    # the interpreter's small blocks, so that short test sequences take several steps
    block_n = configs.INTERPRETER["BLOCK_N"] if configs.INTERPRET else max(16, MEAN_TILE // head_dv)
    launch(_hidden_fwd_kernel, (configs.cdiv(nq, BLOCK_M), b * hq))(
        out, stats, v, out.stride(0), out.stride(1), out.stride(2), stats.stride(0), stats.stride(1),
        stats.stride(2), v.stride(0), v.stride(1), v.stride(2), hq, hq // hkv, nq, nk, fill_argument(spec),
        FINITE_FILL=spec.mask_value != -math.inf, DV=dv, HEAD_DV=head_dv, BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        num_warps=8)  # the (block_n, head_dv) fp32 sum: 64 registers a thread at 8 warps
    return out, stats


def finish_backward(grads, dout, q, k, v, stats, spec, launch):
    """hidden_rows.finish_backward on the GPU, in place on the kernels' (dq, dk, dv)."""
    dq, dk, dv = grads
    if spec.empty_rows != "average" or dout.numel() == 0 or v.numel() == 0:
        return dq, dk, dv
    b, hq, nq, d = q.shape
    hkv, nk, d_v = v.shape[1], v.shape[2], v.shape[3]
    head_dv = _head_dim(d_v)
    block_d = min(_head_dim(d), 64 if head_dv <= 64 else 32)
    columns = configs.cdiv(d, block_d) if spec.fill_adds else 1
    sums = torch.zeros((b * hkv, 1 + d_v + d_v * d + d), dtype=torch.float32, device=q.device)
    shared = dict(SCALE=spec.scale, FILL_ADDS=spec.fill_adds, PRECISION=precision(q.dtype), D=d, DV=d_v,
                  HEAD_DV=head_dv, BLOCK_D=block_d, BLOCK_N=BLOCK_N, num_warps=_warps(d_v))
    launch(_hidden_rows_bwd_kernel, (configs.cdiv(nq, BLOCK_M), b * hq, columns))(
        q, k, v, dout, stats, dq, sums, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3],
        *dq.stride()[:3], stats.stride(1), stats.stride(2), hq, hq // hkv, nq, nk, BLOCK_M=BLOCK_M, **shared)
    launch(_hidden_keys_bwd_kernel, (configs.cdiv(nk, BLOCK_N), b * hkv, columns))(
        v, dk, dv, sums, *v.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], hkv, nk, **shared)
    return dq, dk, dv
