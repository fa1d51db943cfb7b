"""The Triton flash kernels against the float64 oracle, run on the CPU by Triton's interpreter.

conftest.py sets TRITON_INTERPRET=1 before Triton is imported. Sizes stay small (the interpreter is slow)
but cross block edges: the interpreter's config is BLOCK_M 32 x BLOCK_N 16.
"""
import os

import pytest
import torch

from flashfuse.kernels import flash, reference
from flashfuse.tolerances import FORWARD, GRADIENT, assert_close, relative_error

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="runs the kernels through Triton's interpreter (conftest.py sets it)"),
    # rows that see no key divide 0 by 0 and take log(0) on purpose (NaN out, lse -inf)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

NEG_INF = float("-inf")


def _tensor(shape, dtype, layout="bhnd", gen=None):
    """Fresh random values in the given memory layout: bhnd (contiguous), bnhd (transposed view), or
    slice (a view into a wider buffer)."""
    b, h, n, d = shape
    if layout == "bnhd":
        return torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
    if layout == "slice":
        return torch.randn(b, h, n, d + 8, generator=gen).to(dtype)[..., 3:3 + d]
    return torch.randn(shape, generator=gen).to(dtype)


def _oracle(q, k, v, bias, mask, keep, dropout_p, flags):
    """The formula in float64 with autograd; a row that sees no key contributes zero to every gradient."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    bias = None if bias is None else bias.detach().double().requires_grad_()
    s = reference._scores(q, k, bias, mask, flags["scale"], flags["softcap"], flags["mask_value"], flags["causal"],
                          flags["window_left"], flags["window_right"], 0, k.shape[2])
    dead = torch.isneginf(s).all(-1, keepdim=True)
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if keep is not None:
        p = p * keep / (1.0 - dropout_p)
    out = p @ reference._expand_kv(v, q.shape[1])
    return out, lse, (q, k, v, bias)


def _lse_error(actual, expected):
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "rows with lse = -inf differ"
    keep = torch.isfinite(expected)
    return relative_error(actual[keep], expected[keep])


def check(b=2, hq=2, hkv=2, nq=40, nk=56, d=32, dv=None, dtype=torch.float32, causal=False, window=(-1, -1),
          bias=None, bias_dtype=None, mask=None, mask_value=NEG_INF, softcap=0.0, dropout_p=0.0, layout="bhnd",
          scale=None, bias_grad=True, seed=0):
    """Run forward and backward of flash.py and compare out, lse and every gradient with the oracle.

    bias / mask: the shape to broadcast from, e.g. (b, 1, 1, nk); "expand" builds a stride-0 bias.
    """
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = _tensor((b, hq, nq, d), dtype, layout, gen)
    k = _tensor((b, hkv, nk, d), dtype, layout, gen)
    v = _tensor((b, hkv, nk, dv), dtype, layout, gen)
    bias_t = None
    if bias == "expand":
        bias_t = torch.randn(1, 1, nq, nk, generator=gen).to(bias_dtype or dtype).expand(b, hq, nq, nk)
    elif bias is not None:
        bias_t = torch.randn(bias, generator=gen).to(bias_dtype or dtype)
    mask_t = None if mask is None else torch.rand(mask, generator=gen) > 0.3
    flags = dict(scale=d ** -0.5 if scale is None else scale, softcap=softcap, mask_value=mask_value, causal=causal,
                 window_left=window[0], window_right=window[1], dropout_p=dropout_p)
    seed_t = torch.tensor([1234 + seed], dtype=torch.int64) if dropout_p else None
    out, stats = flash.forward(q, k, v, bias_t, mask_t, seed=seed_t, **flags)
    keep = flash.dropout_keep_mask(seed_t, (b, hq, nq, nk), dropout_p, "cpu") if dropout_p else None
    # forward: the reference oracle itself
    naive_flags = {key: val for key, val in flags.items() if key != "dropout_p"}
    expected = reference.naive(q, k, v, bias_t, mask_t, dropout_keep_mask=keep, dropout_p=dropout_p, **naive_flags)
    assert out.shape == (b, hq, nq, dv) and out.dtype == dtype and out.is_contiguous()
    assert stats.shape == (2, b, hq, nq) and stats.dtype == reference.stats_dtype(dtype)
    assert_close(out, expected, dtype, "forward", "out")
    ref_out, ref_lse, leaves = _oracle(q, k, v, bias_t, mask_t, keep, dropout_p, flags)
    assert _lse_error(stats[0].double() + stats[1].double(), ref_lse) < FORWARD[torch.float32]
    # backward
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    want_bias_grad = bias_grad and bias_t is not None
    grads = flash.backward(dout, q, k, v, bias_t, mask_t, out, stats, seed=seed_t, bias_grad=want_bias_grad, **flags)
    ref_out.backward(dout.double())
    for name, got, leaf, like in zip("q k v bias".split(), grads, leaves, (q, k, v, bias_t)):
        if name == "bias" and not want_bias_grad:
            assert got is None
            continue
        assert got.shape == like.shape and got.dtype == like.dtype, name
        assert torch.isfinite(got).all(), f"d{name} has non-finite values"
        if name == "bias" and bias_t.shape[-1] == 1 and nk > 1:
            # a bias broadcast over keys shifts a whole row: its true gradient is 0 (sum_j dS = 0)
            assert got.double().abs().max() < 1e-3 * dout.double().abs().max() * nk
            continue
        assert_close(got, leaf.grad, max(dtype, bias_t.dtype, key=_rank) if name == "bias" else dtype,
                     "gradient", f"d{name}")
    return out, stats, grads


def _rank(dtype):
    return GRADIENT[dtype]  # the looser tolerance of two dtypes


# -- core: shapes, ragged blocks, head dims, strides -------------------------------------------------------------

@pytest.mark.parametrize("nq,nk", [(40, 56), (64, 64), (1, 33), (17, 1), (70, 45)])
def test_shapes(nq, nk):
    check(nq=nq, nk=nk)


@pytest.mark.parametrize("d,dv", [(16, 16), (40, 24), (64, 64), (80, 80), (96, 40), (160, 32)])
def test_head_dims(d, dv):
    check(b=1, hq=2, hkv=1, nq=33, nk=40, d=d, dv=dv)


@pytest.mark.parametrize("layout", ["bnhd", "slice"])
def test_strides(layout):
    check(layout=layout, causal=True, bias=(2, 1, 40, 56))


# -- causal and window, bottom-right aligned ---------------------------------------------------------------------

@pytest.mark.parametrize("nq,nk", [(64, 64), (40, 90), (70, 50), (1, 60)])
def test_causal(nq, nk):
    check(nq=nq, nk=nk, causal=True)


@pytest.mark.parametrize("window,causal", [((10, 5), False), ((0, 0), False), ((20, -1), False), ((-1, 7), True),
                                          ((16, 40), True), ((33, 3), False)])
def test_window(window, causal):
    check(nq=50, nk=64, window=window, causal=causal)


def test_rows_that_see_no_key():
    """Queries left of every key (causal, Nq > Nk) give NaN and lse -inf; their gradients are zero."""
    out, stats, (dq, dk, dv, _) = check(nq=60, nk=20, causal=True)
    hidden = 60 - 20
    assert torch.isnan(out[:, :, :hidden]).all() and torch.isneginf(stats[0, :, :, :hidden]).all()
    assert not torch.isnan(out[:, :, hidden:]).any()
    assert (dq[:, :, :hidden] == 0).all()


# -- bias, mask, softcap, GQA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 2, 40, 56), (1, 2, 40, 56), (2, 1, 1, 56), (1, 1, 40, 56), (1, 1, 1, 1),
                                   (2, 2, 40, 1), "expand"])
def test_bias(shape):
    check(bias=shape, causal=shape == (1, 1, 40, 56))


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float64])
def test_bias_dtype(bias_dtype):
    check(bias=(2, 2, 24, 33), bias_dtype=bias_dtype, nq=24, nk=33)


def test_bias_without_grad():
    check(bias=(2, 2, 40, 56), bias_grad=False)


@pytest.mark.parametrize("shape,mask_value", [((2, 1, 1, 56), NEG_INF), ((2, 2, 40, 56), NEG_INF),
                                              ((2, 2, 40, 56), -3.4e38), ((1, 2, 40, 1), -10.0)])
def test_mask(shape, mask_value):
    check(mask=shape, mask_value=mask_value, bias=(1, 2, 40, 56))


def test_finite_mask_value_on_fully_masked_rows():
    """A finite mask_value gives a fully masked row a uniform softmax (the formula), not NaN."""
    out, stats, _ = check(mask=(2, 2, 40, 1), mask_value=-100.0, nq=40, nk=30)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()


def test_huge_finite_mask_value_on_fully_masked_rows():
    """finfo.min fills: the row max (-3.4e38) would swallow the log-sum; the stats keep them apart."""
    out, stats, _ = check(mask=(2, 2, 40, 1), mask_value=-3.4e38, nq=40, nk=30)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal,bias", [(False, None), (True, (2, 1, 40, 56))])
def test_softcap(causal, bias):
    check(softcap=5.0, causal=causal, bias=bias, scale=0.5)


@pytest.mark.parametrize("hq,hkv,causal", [(6, 2, False), (4, 1, True), (8, 4, True)])
def test_gqa(hq, hkv, causal):
    check(b=1, hq=hq, hkv=hkv, nq=35, nk=47, causal=causal, bias=(1, hq, 1, 47) if hq == 6 else None)


def test_negative_scale():
    check(scale=-0.3, causal=True)


# -- dropout ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,hq,hkv", [(False, 2, 2), (True, 4, 2)])
def test_dropout(causal, hq, hkv):
    check(dropout_p=0.25, causal=causal, hq=hq, hkv=hkv, bias=(1, hq, 40, 56))


def test_dropout_stream():
    seed = torch.tensor([7], dtype=torch.int64)
    keep = flash.dropout_keep_mask(seed, (2, 3, 50, 70), 0.3, "cpu")
    assert torch.equal(keep, flash.dropout_keep_mask(seed, (2, 3, 50, 70), 0.3, "cpu"))
    assert not torch.equal(keep, flash.dropout_keep_mask(seed + 1, (2, 3, 50, 70), 0.3, "cpu"))
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    # one Philox call serves 8 keys: each of the 8 lanes keeps 70%, and neighbours are independent
    lanes = keep.float().reshape(-1, 70)[:, :64].reshape(-1, 8).mean(0)
    assert (lanes - 0.7).abs().max().item() < 0.04, lanes
    both = (keep[..., 1:] & keep[..., :-1]).float().mean().item()
    assert abs(both - 0.49) < 0.02, both


# -- decode (split keys) ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("nq,hq,hkv,extra", [
    (1, 4, 1, {}),
    (4, 8, 2, dict(causal=True)),
    (16, 4, 2, dict(window=(30, 0), mask=(2, 1, 1, 90))),
    (3, 2, 2, dict(bias=(2, 2, 3, 90), softcap=4.0)),
    (2, 4, 2, dict(dropout_p=0.2)),
    (5, 2, 1, dict(causal=True, window=(2, -1))),
])
def test_decode(nq, hq, hkv, extra):
    check(nq=nq, nk=90, hq=hq, hkv=hkv, **extra)


# -- half precision -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extra", [dict(causal=True, hq=4, hkv=2), dict(bias=(2, 1, 40, 56), mask=(2, 1, 1, 56)),
                                   dict(nq=2, nk=70, window=(40, 0))])
def test_half(dtype, extra):
    check(dtype=dtype, **extra)


def test_float64_falls_back_to_reference():
    check(dtype=torch.float64, causal=True, bias=(2, 2, 40, 56))


# -- the op, end to end -----------------------------------------------------------------------------------------

def test_op_autograd_runs_the_kernels():
    from flashfuse.kernels import op
    import flashfuse
    q, k, v = (torch.randn(2, 4, 37, 32, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 37, 37, requires_grad=True)
    before = op.CALLS["triton"]
    out = flashfuse.attention(q, k, v, bias=bias, causal=True)
    assert op.CALLS["triton"] == before + 1
    out.backward(torch.randn_like(out))
    expected = reference.naive(q, k, v, bias, causal=True)
    assert relative_error(out, expected) < FORWARD[torch.float32]
    for t in (q, k, v, bias):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_op_matches_oracle_gradients():
    torch.manual_seed(3)
    q = torch.randn(1, 4, 30, 40)
    k, v = torch.randn(1, 2, 45, 40), torch.randn(1, 2, 45, 24)
    bias = torch.randn(1, 4, 1, 45)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    out, _ = torch.ops.flashfuse.fwd(*leaves, None, 0.2, 0.0, NEG_INF, True, 20, -1, 0.0, None)
    dout = torch.randn_like(out)
    out.backward(dout)
    flags = dict(scale=0.2, softcap=0.0, mask_value=NEG_INF, causal=True, window_left=20, window_right=-1)
    ref_out, ref_lse, ref_leaves = _oracle(q, k, v, bias, None, None, 0.0, flags)
    ref_out.backward(dout.double())
    assert_close(out, ref_out, torch.float32, "forward", "out")
    for got, want, name in zip(leaves, ref_leaves, "q k v bias".split()):
        assert_close(got.grad, want.grad, torch.float32, "gradient", f"d{name}")
