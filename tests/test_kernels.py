"""The op's two implementations against the float64 oracle: the Triton kernels (run on the CPU by Triton's
interpreter) and the CPU path. Every test that calls `check` runs on both (the `impl` fixture).

conftest.py sets TRITON_INTERPRET=1 before Triton is imported. Sizes stay small (the interpreter is slow)
but cross block edges: the interpreter's config is BLOCK_M 32 x BLOCK_N 16, the CPU path's key block 512
(test_cpu_path_crosses_key_blocks crosses it).
"""
import os

import pytest
import torch

from flashfuse.kernels import configs, cpu, flash
from flashfuse.kernels.reference import oracle, oracle_gradients
from flashfuse.kernels.spec import AttentionSpec
from flashfuse.tolerances import FORWARD, GRADIENT, ZERO_GRADIENT, assert_close, relative_error

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="runs the kernels through Triton's interpreter (conftest.py sets it)"),
    # rows that see no key divide 0 by 0 and take log(0) on purpose (NaN out, lse -inf)
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]

NEG_INF = float("-inf")
IMPLEMENTATIONS = {"triton": flash, "cpu": cpu}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request):
    return request.param


def _tensor(shape, dtype, layout="bhnd", gen=None):
    """Fresh random values in the given memory layout: bhnd (contiguous), bnhd (transposed view), or
    slice (a view into a wider buffer)."""
    b, h, n, d = shape
    if layout == "bnhd":
        return torch.randn(b, n, h, d, generator=gen).to(dtype).transpose(1, 2)
    if layout == "slice":
        return torch.randn(b, h, n, d + 8, generator=gen).to(dtype)[..., 3:3 + d]
    return torch.randn(shape, generator=gen).to(dtype)


def _dropout_scale(impl, seed, shape, spec):
    if impl == "triton":
        return flash.dropout_scale(seed, shape, spec, "cpu", torch.float64)
    return cpu.dropout_scale(seed, shape, spec, "cpu", dtype=torch.float64)


def _lse_error(actual, expected):
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), "rows with lse = -inf differ"
    keep = torch.isfinite(expected)
    return relative_error(actual[keep], expected[keep])


def _out_error(actual, expected):
    assert torch.equal(torch.isnan(actual), torch.isnan(expected)), "rows with NaN out differ"
    keep = ~torch.isnan(expected)
    return relative_error(actual[keep], expected[keep])


def check(impl="triton", b=2, hq=2, hkv=2, nq=40, nk=56, d=32, dv=None, dtype=torch.float32, causal=False,
          window=(-1, -1), bias=None, bias_dtype=None, mask=None, mask_value=NEG_INF, softcap=0.0, dropout_p=0.0,
          layout="bhnd", scale=None, bias_grad=True, empty_rows="nan", fill_adds=False, bias_last=False, seed=0,
          fp32_delta=False):
    """Run forward and backward of one implementation and compare out, lse and every gradient with the oracle.

    bias / mask: the shape to broadcast from, e.g. (b, 1, 1, nk); "expand" builds a stride-0 bias. fp32_delta: the
    forward writes out's rounding residual, checked to be what rounding lost, and the backward reads it.
    """
    run = IMPLEMENTATIONS[impl]
    gen = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = _tensor((b, hq, nq, d), dtype, layout, gen)
    k = _tensor((b, hkv, nk, d), dtype, layout, gen)
    v = _tensor((b, hkv, nk, dv), dtype, layout, gen)
    bias_t = bias if isinstance(bias, torch.Tensor) else None
    if isinstance(bias, torch.Tensor):
        pass
    elif bias == "expand":
        bias_t = torch.randn(1, 1, nq, nk, generator=gen).to(bias_dtype or dtype).expand(b, hq, nq, nk)
    elif bias is not None:
        bias_t = torch.randn(bias, generator=gen).to(bias_dtype or dtype)
    mask_t = mask if isinstance(mask, torch.Tensor) else None if mask is None else torch.rand(mask, generator=gen) > 0.3
    spec = AttentionSpec(scale=d ** -0.5 if scale is None else scale, softcap=softcap, mask_value=mask_value,
                         causal=causal, window=window, dropout_p=dropout_p, empty_rows=empty_rows, fill_adds=fill_adds,
                         bias_last=bias_last, fp32_delta=fp32_delta)
    seed_t = torch.tensor([1234 + seed], dtype=torch.int64) if dropout_p else None
    residual = torch.full((b, hq, nq, dv), float("nan"), dtype=dtype) if fp32_delta else None
    out, stats = run.forward(q, k, v, bias_t, mask_t, seed_t, spec, residual=residual)
    if fp32_delta:
        _assert_rounding_residual(out, residual, stats)
    keep = _dropout_scale(impl, seed_t, (b, hq, nq, nk), spec) if dropout_p else None
    assert out.shape == (b, hq, nq, dv) and out.dtype == dtype
    assert stats.shape == (2, b, hq, nq) and stats.dtype == cpu.stats_dtype(dtype)
    dout = torch.randn(out.shape, generator=gen).to(dtype)
    ref_out, ref_lse, *ref_grads = oracle_gradients(dout, q, k, v, spec, bias_t, mask_t, keep)
    err = _out_error(out, ref_out)
    assert err < FORWARD[dtype], f"out: relative error {err:.3e} exceeds the {dtype} tolerance"
    assert _lse_error(stats[0].double() + stats[1].double(), ref_lse) < FORWARD[torch.float32]
    # backward
    want_bias_grad = bias_grad and bias_t is not None
    grads = run.backward(dout, q, k, v, bias_t, mask_t, seed_t, out, stats, spec, want_bias_grad, residual=residual)
    for name, got, want, like in zip("q k v bias".split(), grads, ref_grads, (q, k, v, bias_t)):
        if name == "bias" and not want_bias_grad:
            assert got is None
            continue
        assert got.shape == like.shape and got.dtype == like.dtype, name
        assert torch.isfinite(got).all(), f"d{name} has non-finite values"
        if name == "bias" and bias_t.shape[-1] == 1 and nk > 1:
            # a bias broadcast over keys shifts a whole row: its true gradient is 0 (sum_j dS = 0)
            assert got.double().abs().max() < ZERO_GRADIENT * dout.double().abs().max() * nk
            continue
        assert_close(got, want, max(dtype, bias_t.dtype, key=_rank) if name == "bias" else dtype,
                     "gradient", f"d{name}")
    return out, stats, grads


def _assert_rounding_residual(out, residual, stats):
    """On every row that saw a key, residual is what rounding the fp32 output to out's dtype lost: within one ulp
    of out (half an ulp on the GPU; Triton's interpreter truncates), and not all zero."""
    seen = torch.isfinite(stats[0])[..., None].expand_as(out) & torch.isfinite(out)
    o, r = out[seen].float(), residual[seen].float()
    assert torch.isfinite(r).all(), "the residual has non-finite values on rows that saw keys"
    ulp = o.abs() * torch.finfo(out.dtype).eps + torch.finfo(out.dtype).tiny
    assert (r.abs() <= ulp).all(), f"residual beyond an ulp of out: {(r.abs() / ulp).max():.3g} ulp"
    assert out.dtype == torch.float32 or not o.numel() or r.abs().max() > 0, "the residual is all zero"


def _rank(dtype):
    return GRADIENT[dtype]  # the looser tolerance of two dtypes


# -- core: shapes, ragged blocks, head dims, strides -------------------------------------------------------------

@pytest.mark.parametrize("nq,nk", [(40, 56), (64, 64), (1, 33), (17, 1), (70, 45)])
def test_shapes(impl, nq, nk):
    check(impl, nq=nq, nk=nk)


def _tiles(kind):
    """The tile shapes bench/tune.py may launch kernel `kind` with (warps and stages do not change results)."""
    return sorted({(c["BLOCK_M"], c["BLOCK_N"]) for c in configs.candidates(kind, 64)})


@pytest.mark.parametrize("kind,tile", [(kind, tile) for kind in ("fwd", "dq", "dkdv") for tile in _tiles(kind)])
def test_tuning_candidates_compute_attention(kind, tile):
    """Every tile shape a tuning run may pick gives the oracle's answer: causal with more keys than queries and
    more queries than keys, with key padding, over ragged block edges."""
    cfg = {"BLOCK_M": tile[0], "BLOCK_N": tile[1], "num_warps": 4, "num_stages": 1}
    with configs.override(kind, cfg):
        check("triton", b=1, nq=70, nk=150, causal=True, mask=(1, 1, 1, 150))
        check("triton", b=1, nq=150, nk=70, causal=True, window=(40, -1))


def test_config_override_is_launched_and_restored():
    launched = []
    cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}
    q = k = v = torch.randn(1, 1, 40, 16)  # 40 queries: the forward kernel, not decode's
    with configs.override("fwd", cfg):
        flash.forward(q, k, v, None, None, None, AttentionSpec(scale=0.25),
                      launch=lambda kernel, grid: lambda *a, **kw: launched.append(kw))
    assert {key: launched[0][key] for key in cfg} == cfg
    assert configs.default("fwd", 16) == configs.INTERPRETER
    with pytest.raises(ValueError, match="kind must be one of"):
        with configs.override("bwd", cfg):
            pass


@pytest.mark.parametrize("d,dv", [(16, 16), (40, 24), (64, 64), (80, 80), (96, 40), (160, 32)])
def test_head_dims(impl, d, dv):
    check(impl, b=1, hq=2, hkv=1, nq=33, nk=40, d=d, dv=dv)


@pytest.mark.parametrize("layout", ["bnhd", "slice"])
def test_strides(impl, layout):
    check(impl, layout=layout, causal=True, bias=(2, 1, 40, 56))


# -- causal and window, bottom-right aligned ---------------------------------------------------------------------

@pytest.mark.parametrize("nq,nk", [(64, 64), (40, 90), (70, 50), (1, 60)])
def test_causal(impl, nq, nk):
    check(impl, nq=nq, nk=nk, causal=True)


@pytest.mark.parametrize("window,causal", [((10, 5), False), ((0, 0), False), ((20, -1), False), ((-1, 7), True),
                                          ((16, 40), True), ((33, 3), False)])
def test_window(impl, window, causal):
    check(impl, nq=50, nk=64, window=window, causal=causal)


def test_rows_that_see_no_key(impl):
    """Queries left of every key (causal, Nq > Nk) give NaN and lse -inf; their gradients are zero."""
    out, stats, (dq, dk, dv, _) = check(impl, nq=60, nk=20, causal=True)
    hidden = 60 - 20
    assert torch.isnan(out[:, :, :hidden]).all() and torch.isneginf(stats[0, :, :, :hidden]).all()
    assert not torch.isnan(out[:, :, hidden:]).any()
    assert (dq[:, :, :hidden] == 0).all()


# -- bias, mask, softcap, GQA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 2, 40, 56), (1, 2, 40, 56), (2, 1, 1, 56), (1, 1, 40, 56), (1, 1, 1, 1),
                                   (2, 2, 40, 1), "expand"])
def test_bias(impl, shape):
    check(impl, bias=shape, causal=shape == (1, 1, 40, 56))


@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.float64])
def test_bias_dtype(impl, bias_dtype):
    check(impl, bias=(2, 2, 24, 33), bias_dtype=bias_dtype, nq=24, nk=33)


def test_bias_without_grad(impl):
    check(impl, bias=(2, 2, 40, 56), bias_grad=False)


@pytest.mark.parametrize("shape,mask_value", [((2, 1, 1, 56), NEG_INF), ((2, 2, 40, 56), NEG_INF),
                                              ((2, 2, 40, 56), -3.4e38), ((1, 2, 40, 1), -10.0)])
def test_mask(impl, shape, mask_value):
    check(impl, mask=shape, mask_value=mask_value, bias=(1, 2, 40, 56))


@pytest.mark.parametrize("mask_value", [-5.0, 2.0])
def test_bias_after_the_mask_fill(impl, mask_value):
    """bias_last: where(mask, s, mask_value) + bias. A small fill lets the masked keys weigh, so the order shows
    everywhere, and the bias takes its gradient at every key, masked ones too."""
    check(impl, mask=(1, 2, 40, 56), mask_value=mask_value, bias=(2, 2, 40, 56), bias_last=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_bias_after_a_causal_buffer_fill_hides_whole_rows(impl, side):
    """GPT-Neo's spelling: where(causal buffer, s, finfo.min) + a padding bias of 0 / finfo.min. A query whose
    causal keys are all padded sees no key: its softmax is uniform over the keys exactly one of the two hid (a
    key both hid gets fill + fill = -inf), forward and gradients as the oracle's."""
    nq = nk = 40
    fill = torch.finfo(torch.float32).min
    causal = torch.ones(1, 1, nq, nk, dtype=torch.bool).tril()  # a tensor, as a buffer is
    padding = torch.zeros(2, 1, 1, nk)
    padding[0, ..., :15] = fill if side == "left" else 0.0
    padding[1, ..., 30:] = fill
    out, stats, _ = check(impl, nq=nq, nk=nk, mask=causal, mask_value=fill, bias=padding, bias_grad=False,
                          bias_last=True)
    assert torch.isfinite(out).all() and (stats[0, 0, :, :15] == fill).all() == (side == "left")


def test_finite_mask_value_on_fully_masked_rows(impl):
    """A finite mask_value gives a fully masked row a uniform softmax (the formula), not NaN."""
    out, stats, _ = check(impl, mask=(2, 2, 40, 1), mask_value=-100.0, nq=40, nk=30)
    assert torch.isfinite(out).all() and torch.isfinite(stats).all()


def test_huge_finite_mask_value_on_fully_masked_rows(impl):
    """finfo.min fills: the row max (-3.4e38) would swallow the log-sum; the stats keep them apart."""
    out, stats, _ = check(impl, mask=(2, 2, 40, 1), mask_value=-3.4e38, nq=40, nk=30)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("causal,bias", [(False, None), (True, (2, 1, 40, 56))])
def test_softcap(impl, causal, bias):
    check(impl, softcap=5.0, causal=causal, bias=bias, scale=0.5)


@pytest.mark.parametrize("hq,hkv,causal", [(6, 2, False), (4, 1, True), (8, 4, True)])
def test_gqa(impl, hq, hkv, causal):
    check(impl, b=1, hq=hq, hkv=hkv, nq=35, nk=47, causal=causal, bias=(1, hq, 1, 47) if hq == 6 else None)


def test_negative_scale(impl):
    check(impl, scale=-0.3, causal=True)


# -- dropout ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal,hq,hkv", [(False, 2, 2), (True, 4, 2)])
def test_dropout(impl, causal, hq, hkv):
    check(impl, dropout_p=0.25, causal=causal, hq=hq, hkv=hkv, bias=(1, hq, 40, 56))


def test_dropout_stream():
    seed = torch.tensor([7], dtype=torch.int64)
    spec = AttentionSpec(dropout_p=0.3)
    scale = flash.dropout_scale(seed, (2, 3, 50, 70), spec, "cpu")
    assert torch.equal(scale, flash.dropout_scale(seed, (2, 3, 50, 70), spec, "cpu"))
    assert not torch.equal(scale, flash.dropout_scale(seed + 1, (2, 3, 50, 70), spec, "cpu"))
    assert set(scale.unique().tolist()) == {0.0, torch.tensor(1 / 0.7).item()}
    keep = scale > 0
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    # one Philox call serves 8 keys: each of the 8 lanes keeps 70%, and neighbours are independent
    lanes = keep.float().reshape(-1, 70)[:, :64].reshape(-1, 8).mean(0)
    assert (lanes - 0.7).abs().max().item() < 0.04, lanes
    both = (keep[..., 1:] & keep[..., :-1]).float().mean().item()
    assert abs(both - 0.49) < 0.02, both
    rows = (keep[..., 1:, :] & keep[..., :-1, :]).float().mean().item()  # neighbouring queries: counters a row apart
    assert abs(rows - 0.49) < 0.02, rows


# -- decode (split keys) ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("nq,hq,hkv,extra", [
    (1, 4, 1, {}),
    (4, 8, 2, dict(causal=True)),
    (16, 4, 2, dict(window=(30, 0), mask=(2, 1, 1, 90))),
    (3, 2, 2, dict(bias=(2, 2, 3, 90), softcap=4.0)),
    (2, 4, 2, dict(dropout_p=0.2)),
    (5, 2, 1, dict(causal=True, window=(2, -1))),
])
def test_decode(impl, nq, hq, hkv, extra):
    check(impl, nq=nq, nk=90, hq=hq, hkv=hkv, **extra)


# -- half precision -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extra", [dict(causal=True, hq=4, hkv=2), dict(bias=(2, 1, 40, 56), mask=(2, 1, 1, 56)),
                                   dict(nq=2, nk=70, window=(40, 0))])
def test_half(impl, dtype, extra):
    check(impl, dtype=dtype, **extra)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extra", [dict(causal=True, hq=4, hkv=2, dv=24), dict(bias=(2, 1, 40, 56), mask=(2, 1, 1, 56)),
                                   dict(dropout_p=0.3, window=(20, 5)), dict(nq=3, nk=70)])
def test_fp32_delta(impl, dtype, extra):
    """Half-precision training keeps out's rounding residual (spec.fp32_delta): every feature still matches the
    oracle, forward and gradients; three queries over 70 keys take the flash kernel, not decode's."""
    check(impl, dtype=dtype, fp32_delta=True, **extra)


@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_delta_brings_peaked_dq_and_dk_to_dv_accuracy(impl, seed):
    """A peaked bf16 softmax (scale 2, D 16): with delta from the rounded out, each row's dS no longer sums to zero
    and dq, dk are about twice as far from float64 as dv (which delta does not touch); with fp32_delta they are
    within 1.3x of dv's error and at most 0.75x of their own error without it (interpreter: 0.013 -> 0.007)."""
    run = IMPLEMENTATIONS[impl]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen).bfloat16() for n in (40, 56, 56))
    dout = torch.randn(2, 2, 40, 16, generator=gen).bfloat16()
    errors = {}
    for fp32_delta in (False, True):
        spec = AttentionSpec(scale=2.0, causal=True, fp32_delta=fp32_delta)
        residual = torch.empty(2, 2, 40, 16, dtype=torch.bfloat16) if fp32_delta else None
        out, stats = run.forward(q, k, v, None, None, None, spec, residual=residual)
        grads = run.backward(dout, q, k, v, None, None, None, out, stats, spec, False, residual=residual)[:3]
        want = oracle_gradients(dout, q, k, v, spec)[2:5]
        errors[fp32_delta] = [relative_error(g, w) for g, w in zip(grads, want)]
    (dq0, dk0, _), (dq1, dk1, dv1) = errors[False], errors[True]
    assert dq1 <= 0.75 * dq0 and dk1 <= 0.75 * dk0, errors
    assert max(dq1, dk1) <= 1.3 * dv1, errors


def test_float64_takes_the_cpu_path(impl):
    check(impl, dtype=torch.float64, causal=True, bias=(2, 2, 40, 56))


def test_empty_rows_zero(impl):
    """SDPA's rule: a query that sees no key gives 0 (not NaN); its gradients stay zero."""
    out, stats, (dq, _, _, _) = check(impl, nq=50, nk=20, causal=True, empty_rows="zero", bias=(1, 2, 50, 20))
    assert (out[:, :, :30] == 0).all() and torch.isneginf(stats[0, :, :, :30]).all() and (dq[:, :, :30] == 0).all()


@pytest.mark.parametrize("causal,window,nq,fill_adds", [
    (True, (-1, -1), 40, False), (True, (-1, -1), 40, True), (True, (6, -1), 40, True), (False, (-1, -1), 40, False),
    (True, (-1, -1), 3, True)])
def test_empty_rows_average_with_key_padding(impl, causal, window, nq, fill_adds):
    """Left and right padding as a (B, 1, 1, Nk) key mask with a finite fill under causal / window structure:
    a query that sees no key averages v over all keys (eager's answer when one fill hides the whole row). Its
    gradient reaches v, and with fill_adds (eager's s + fill) q and k too. Rows that see a key are plain attention."""
    nk = 40
    keys = torch.ones(2, 1, 1, nk, dtype=torch.bool)
    keys[0, ..., :9] = False  # left padding: queries 0..8 see no key under causal
    keys[1, ..., 31:] = False  # right padding
    fill = torch.finfo(torch.float32).min
    out, stats, (dq, dk, dv, _) = check(impl, nq=nq, nk=nk, causal=causal, window=window, mask=keys,
                                        mask_value=fill, empty_rows="average", fill_adds=fill_adds, hkv=1,
                                        bias=(2, 1, 1, nk))
    if causal and nq == nk:
        hidden = torch.isneginf(stats[0])
        assert hidden[0, :, :9].all() and (dq[0, :, :9] == 0).all() != fill_adds
        assert hidden[1].any() == (window != (-1, -1))  # right padding hides a whole window only


@pytest.mark.parametrize("fill_adds", [False, True])
def test_fp32_delta_with_hidden_rows(impl, fill_adds):
    """bf16 training with left padding under causal structure: the rows that see no key take the fix-up's mean of v
    (their residual is never read: the main backward skips them), the others delta from the fp32 output."""
    keys = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    keys[0, ..., :9] = False
    check(impl, nq=40, nk=40, causal=True, mask=keys, mask_value=torch.finfo(torch.float32).min, hkv=1,
          empty_rows="average", fill_adds=fill_adds, dtype=torch.bfloat16, fp32_delta=True)


def _padding(nk, *kept):
    """(len(kept), 1, 1, nk) key-padding mask keeping keys [start, stop) of each batch."""
    keys = torch.zeros(len(kept), 1, 1, nk, dtype=torch.bool)
    for row, (start, stop) in enumerate(kept):
        keys[row, ..., start:stop] = True
    return keys


# (fill, fill_adds, empty_rows, causal): SDPA's bool mask; transformers' finfo.min added under causal structure;
# BERT's added finfo.min without structure; a fill too small to zero p (the kernels keep every block); an added fill
# above HUGE_FILL (kept too)
PADDING_FILLS = [(NEG_INF, False, "zero", False), (torch.finfo(torch.float32).min, True, "average", True),
                 (torch.finfo(torch.float32).min, True, "nan", False), (-30.0, False, "nan", False),
                 (-1e9, True, "average", True)]


@pytest.mark.parametrize("fill,fill_adds,empty_rows,causal", PADDING_FILLS)
def test_key_padding_over_whole_blocks(impl, fill, fill_adds, empty_rows, causal):
    """Key padding that hides whole key blocks (left, right, all keys of a batch), the rows that see no kept key
    included, against the oracle: the Triton kernels skip such blocks where that is exact."""
    nk = 150
    keys = _padding(nk, (53, nk), (0, 37), (0, 0), (20, 90))
    check(impl, b=4, hq=4, hkv=2, nq=nk, nk=nk, causal=causal, mask=keys, mask_value=fill, fill_adds=fill_adds,
          empty_rows=empty_rows)


@pytest.mark.parametrize("nq", [150, 3])  # 3 queries: the decode kernel's splits
@pytest.mark.parametrize("fill,fill_adds,empty_rows,causal", PADDING_FILLS)
def test_key_padding_skips_the_blocks_it_hides(fill, fill_adds, empty_rows, causal, nq):
    """NaN in k and v under the blocks padding hides whole: a skipped block leaves every result finite and equal
    to the oracle's on clean inputs (dk, dv 0 there). Where skipping could change an answer (a fill that leaves
    p > 0, or rows that see no kept key averaging the filled ones) the kernels read those keys, and the NaN comes
    through as in eager."""
    nk, block = 150, configs.INTERPRETER["BLOCK_N"]
    keys = _padding(nk, (53, nk), (0, 37))
    hidden = torch.zeros(nk, 2, dtype=torch.bool)  # (key, batch): in a block that keeps no key
    for row, (start, stop) in enumerate([(53, nk), (0, 37)]):
        hidden[:start // block * block, row] = True
        hidden[-(-stop // block) * block:, row] = True
    spec = AttentionSpec(scale=0.125, causal=causal, mask_value=fill, fill_adds=fill_adds, empty_rows=empty_rows)
    gen = torch.Generator().manual_seed(3)
    q, dout = (torch.randn(2, 2, nq, 32, generator=gen) for _ in range(2))
    k, v = (torch.randn(2, 2, nk, 32, generator=gen) for _ in range(2))
    poisoned = [t.clone() for t in (k, v)]
    for t in poisoned:
        t.permute(2, 0, 1, 3)[hidden] = float("nan")
    out, stats = flash.forward(q, *poisoned, None, keys, None, spec)
    dq, dk, dv, _ = flash.backward(dout, q, *poisoned, None, keys, None, out, stats, spec, False)
    if spec.empty_rows == "average" and causal:  # rows that see no kept key average v over all keys, NaN included
        seen = torch.isfinite(stats[0])
    else:
        seen = torch.ones_like(stats[0], dtype=torch.bool)
    skipped = fill == NEG_INF or (empty_rows == "average" and fill <= -1e37)  # flash_common.skips_padding
    if not skipped:
        assert torch.isnan(out[seen]).any(), "a fill that leaves p > 0 must read the hidden keys"
        return
    ref_out, _, ref_dq, ref_dk, ref_dv, *_ = oracle_gradients(dout.masked_fill(~seen[..., None], 0.0), q, k, v, spec,
                                                              None, keys)
    assert_close(out[seen], ref_out[seen].to(out.dtype), torch.float32, "forward", "out")
    assert_close(dq[seen], ref_dq[seen].to(dq.dtype), torch.float32, "gradient", "dq")
    if not (spec.empty_rows == "average" and causal):  # there the average's dv and dk reach the NaN keys
        assert_close(dk, ref_dk.to(dk.dtype), torch.float32, "gradient", "dk")
        assert_close(dv, ref_dv.to(dv.dtype), torch.float32, "gradient", "dv")
        assert (dv.permute(2, 0, 1, 3)[hidden] == 0).all()


@pytest.mark.parametrize("window,nq,dtype", [((-1, -1), 40, torch.float32), ((6, -1), 40, torch.float32),
                                            ((-1, -1), 3, torch.float32), ((-1, -1), 40, torch.bfloat16)])
def test_added_fill_under_structure_softmaxes_the_visible_keys(impl, window, nq, dtype):
    """fill_adds with empty_rows="nan", eager's where(causal, s, fill) + where(causal & keep, 0, fill): a query
    whose visible keys are all padded takes the uniform softmax over those keys (the others overflow to -inf), and
    its gradient reaches q and k through the scores the fill swallowed."""
    nk = 40
    keys = torch.ones(2, 1, 1, nk, dtype=torch.bool)
    keys[0, ..., :9] = False  # left padding: queries 0..8 see only padded keys under causal
    keys[1, ..., 31:] = False
    fill = torch.finfo(dtype).min
    out, stats, (dq, dk, dv, _) = check(impl, nq=nq, nk=nk, causal=True, window=window, mask=keys, mask_value=fill,
                                        empty_rows="nan", fill_adds=True, hkv=1, dtype=dtype)
    if nq == nk:
        assert torch.isfinite(out[0, :, :9]).all() and (stats[0, 0, :, :9] == fill).all()
        assert (dq[0, :, 1:9] != 0).any(), "a hidden row's gradient reaches q"


@pytest.mark.parametrize("dtype,hq,hkv,d,dv,layout", [
    (torch.float32, 4, 2, 16, 24, "bhnd"), (torch.float32, 2, 1, 80, 96, "bnhd"),
    (torch.bfloat16, 3, 3, 64, 64, "slice")])
def test_triton_hidden_row_fixups_match_the_cpu_paths(dtype, hq, hkv, d, dv, layout):
    """flash_hidden's kernels (the Triton path's empty_rows="average") against hidden_rows.py in float64, on
    stats with rows hidden by the fill and by -inf: forward rows, and what each adds to dq, dk, dv."""
    from flashfuse.kernels import flash_hidden, hidden_rows
    gen = torch.Generator().manual_seed(7)
    b, nq, nk, fill = 2, 70, 90, -1e9
    q, dq = _tensor((b, hq, nq, d), dtype, layout, gen), _tensor((b, hq, nq, d), dtype, layout, gen)
    k, dk = _tensor((b, hkv, nk, d), dtype, layout, gen), _tensor((b, hkv, nk, d), dtype, layout, gen)
    v, dv_ = _tensor((b, hkv, nk, dv), dtype, layout, gen), _tensor((b, hkv, nk, dv), dtype, layout, gen)
    dout, out = _tensor((b, hq, nq, dv), dtype, layout, gen), torch.randn(b, hq, nq, dv, generator=gen).to(dtype)
    stats = torch.randn(2, b, hq, nq, generator=gen)
    stats[0, 0, :, :23] = fill  # left padding: hidden by the fill
    stats[0, 1, -1, 60:] = NEG_INF  # rows that saw no key at all
    spec = AttentionSpec(scale=d ** -0.5, mask_value=fill, empty_rows="average", fill_adds=True)
    wide = [t.double() for t in (out, stats, v)]
    want_out, want_stats = hidden_rows.finish_forward(*wide, spec)
    got_out, got_stats = flash_hidden.finish_forward(out.clone(), stats.clone(), v, spec, flash.direct)
    assert torch.equal(got_stats, want_stats.float())
    assert_close(got_out, want_out, dtype)
    grads = (dq.contiguous(), dk.contiguous(), dv_.contiguous())
    want = hidden_rows.finish_backward([g.double() for g in grads], *(t.double() for t in (dout, q, k, v, got_stats)),
                                       spec)
    got = flash_hidden.finish_backward([g.clone() for g in grads], dout, q, k, v, got_stats, spec, flash.direct)
    for name, g, w, before in zip(("dq", "dk", "dv"), got, want, grads):
        assert (w - before.double()).abs().max() > 0.1, f"{name}: the case must move it"
        assert_close(g, w, dtype, "gradient", name)
        if dtype == torch.float32:  # what was added, alone (in bf16 the sum's rounding is larger than it)
            assert_close(g.double() - before.double(), w - before.double(), dtype, "gradient", name)


def test_triton_hidden_rows_with_an_infinite_fill():
    """With mask_value -inf the kernel takes a stand-in fill (fill_argument: 0.0) and must not read it: a row
    whose max score is exactly 0.0 keeps its output, rows that saw only -inf take the mean of v."""
    from flashfuse.kernels import flash_hidden, hidden_rows
    gen = torch.Generator().manual_seed(3)
    v, out = torch.randn(2, 2, 90, 24, generator=gen), torch.randn(2, 4, 70, 24, generator=gen)
    stats = torch.randn(2, 2, 4, 70, generator=gen)
    stats[0, 0, :, :5] = 0.0
    stats[0, 1, 2, 40:] = NEG_INF
    spec = AttentionSpec(empty_rows="average")
    want_out, want_stats = hidden_rows.finish_forward(out.double(), stats.double(), v.double(), spec)
    got_out, got_stats = flash_hidden.finish_forward(out.clone(), stats.clone(), v, spec, flash.direct)
    assert torch.equal(got_out[0, :, :5], out[0, :, :5]) and not torch.equal(got_out, out)
    assert torch.equal(got_stats, want_stats.float())
    assert_close(got_out, want_out, torch.float32)


@pytest.mark.parametrize("mask_value,empty_rows,nq", [(NEG_INF, "nan", 40), (NEG_INF, "average", 40),
                                                      (-1e9, "average", 40), (NEG_INF, "average", 2)])
def test_kernel_arguments_are_finite_floats(mask_value, empty_rows, nq):
    """AOTInductor writes a kernel's float arguments into Python source and spells -inf as `inf`, an undefined
    name: every launch (forward, decode, backward, hidden-row fix-ups) must take finite floats only."""
    import math
    seen = []

    def recording(kernel, grid):
        def call(*args, **kwargs):
            seen.extend(x for x in (*args, *kwargs.values()) if isinstance(x, float))
            return kernel[grid](*args, **kwargs)
        return call

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 16, generator=gen) for n in (nq, 56, 56))
    mask = torch.rand(2, 1, 1, 56, generator=gen) > 0.3
    spec = AttentionSpec(scale=0.25, mask_value=mask_value, empty_rows=empty_rows, causal=True)
    out, stats = flash.forward(q, k, v, None, mask, None, spec, launch=recording)
    flash.backward(torch.randn_like(out), q, k, v, None, mask, None, out, stats, spec, False, launch=recording)
    assert seen and all(math.isfinite(x) for x in seen), seen


def test_cpu_path_crosses_key_blocks():
    """The CPU path's online softmax over several key blocks, and its aten fast path for plain causal."""
    check("cpu", nq=600, nk=1100, b=1, hq=2, d=16, mask=(1, 1, 600, 1100), dropout_p=0.1)
    check("cpu", nq=700, nk=700, b=1, hq=2, hkv=1, d=16, causal=True)


# -- edges: nothing to compute, shapes the kernels cannot hold ---------------------------------------------------

@pytest.mark.parametrize("b,hq,nq,nk", [(0, 2, 5, 7), (2, 0, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)])
def test_empty_problems_give_eager_results(impl, b, hq, nq, nk):
    """No batch, heads, queries or keys: eager's shapes, zeros (softmax over no keys times no values is 0)
    and zero gradients, from both implementations (interpreter: the kernels are never launched)."""
    run = IMPLEMENTATIONS[impl]
    q, k, v = torch.randn(b, hq, nq, 16), torch.randn(b, hq, nk, 16), torch.randn(b, hq, nk, 8)
    bias = torch.randn(1, 1, nq, nk)
    spec = AttentionSpec(scale=0.25, causal=True)
    out, stats = run.forward(q, k, v, bias, None, None, spec)
    assert out.shape == (b, hq, nq, 8) and (out == 0).all() and stats.shape == (2, b, hq, nq)
    grads = run.backward(torch.randn_like(out), q, k, v, bias, None, None, out, stats, spec, True)
    for got, like in zip(grads, (q, k, v, bias)):
        assert got.shape == like.shape and (got == 0).all()


def test_head_dim_beyond_the_tiles_takes_the_blockwise_path():
    """A head dim no kernel tile holds (512) is routed before launch to the blockwise CPU-path code."""
    import flashfuse
    from flashfuse.kernels import op
    q, k, v = (torch.randn(1, 2, 20, 512, requires_grad=True) for _ in range(3))
    assert op.path(q, v)[0] == "cpu" and "512" in op.path(q, v)[1]
    before = dict(op.CALLS)
    out = flashfuse.attention(q, k, v, causal=True)
    assert op.CALLS["cpu"] == before["cpu"] + 1 and op.CALLS["triton"] == before["triton"]
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out, _, *ref_grads = oracle_gradients(dout, q, k, v, AttentionSpec(scale=512 ** -0.5, causal=True))
    assert_close(out, ref_out, torch.float32, "forward", "out")
    for t, want, name in zip((q, k, v), ref_grads, "qkv"):
        assert_close(t.grad, want, torch.float32, "gradient", f"d{name}")


# -- the op, end to end -----------------------------------------------------------------------------------------

def test_op_autograd_runs_the_kernels():
    import flashfuse
    from flashfuse.kernels import op
    q, k, v = (torch.randn(2, 4, 37, 32, requires_grad=True) for _ in range(3))
    bias = torch.randn(2, 1, 37, 37, requires_grad=True)
    before = op.CALLS["triton"]
    out = flashfuse.attention(q, k, v, bias=bias, causal=True)
    assert op.CALLS["triton"] == before + 1
    dout = torch.randn_like(out)
    out.backward(dout)
    spec = AttentionSpec(scale=32 ** -0.5, causal=True)
    expected, _, *grads = oracle_gradients(dout, q, k, v, spec, bias)
    assert relative_error(out, expected) < FORWARD[torch.float32]
    for t, want, name in zip((q, k, v, bias), grads, "q k v bias".split()):
        assert_close(t.grad, want, torch.float32, "gradient", f"d{name}")


def test_op_schema_takes_the_encoded_spec():
    torch.manual_seed(3)
    q = torch.randn(1, 4, 30, 40)
    k, v = torch.randn(1, 2, 45, 40), torch.randn(1, 2, 45, 24)
    bias = torch.randn(1, 4, 1, 45)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    spec = AttentionSpec(scale=0.2, causal=True, window=(20, -1))
    out, _, _ = torch.ops.flashfuse.fwd(*leaves, None, None, spec.encode())
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_out, _, *ref_grads = oracle_gradients(dout, q, k, v, spec, bias)
    assert_close(out, ref_out, torch.float32, "forward", "out")
    for got, want, name in zip(leaves, ref_grads, "q k v bias".split()):
        assert_close(got.grad, want, torch.float32, "gradient", f"d{name}")


def test_logsumexp_gradient(impl):
    """dlse, a gradient reaching each row's logsumexp (stats[0] + stats[1]; an attention sink's rescale reads it),
    flows back as d lse / d s = p: checked against float64 autograd through the oracle's lse."""
    run = IMPLEMENTATIONS[impl]
    gen = torch.Generator().manual_seed(7)
    q, k, v = torch.randn(2, 2, 30, 16, generator=gen), torch.randn(2, 1, 40, 16, generator=gen), \
        torch.randn(2, 1, 40, 16, generator=gen)
    spec = AttentionSpec(scale=0.25, causal=True)
    out, stats = run.forward(q, k, v, None, None, None, spec)
    dout, dlse = torch.randn(out.shape, generator=gen), torch.randn(stats.shape[1:], generator=gen)
    grads = run.backward(dout, q, k, v, None, None, None, out, stats, spec, False, dlse=dlse)[:3]
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = oracle(*leaves, spec)
    loss = (ref_out * dout.double()).sum() + (ref_lse * dlse.double()).sum()
    for name, got, want in zip("qkv", grads, torch.autograd.grad(loss, leaves)):
        assert_close(got, want, torch.float32, "gradient", f"d{name}")


def test_saturating_bias_broadcast_over_keys(impl):
    """A bias of finfo.min broadcast over every key (found by the fuzzer: baddbmm with a (1,) bias) swallows the
    scores: the softmax is uniform over the keys, and the row's stats must count all of them."""
    fill = torch.full((1, 1, 1, 1), torch.finfo(torch.float32).min)
    check(impl, nq=3, nk=5, bias=fill, bias_grad=False)


def test_kernels_name_their_helpers_directly():
    """Inductor runs a compiled graph's Triton kernels from a copy of their source, with the jit helpers each one
    names; it resolves no attribute of another module there. A kernel calling `fp8.to_e4m3(...)` ran eagerly and
    failed under torch.compile on a GPU with NameError: helpers are imported by name (`from ... import to_e4m3`)."""
    import ast
    import importlib
    import inspect
    import pkgutil
    import textwrap

    import flashfuse.kernels
    found, checked = [], 0
    for info in pkgutil.iter_modules(flashfuse.kernels.__path__):
        module = importlib.import_module(f"flashfuse.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)  # a JITFunction, or the interpreter's wrapper of one
            if not (inspect.isfunction(fn) and fn.__module__ == module.__name__ and "triton" in type(obj).__module__):
                continue
            checked += 1
            for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn)))):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                    target = fn.__globals__.get(node.value.id)
                    if inspect.ismodule(target) and not target.__name__.startswith("triton"):
                        found.append(f"{module.__name__}.{name}: {node.value.id}.{node.attr}")
    assert checked >= 20 and not found, found
