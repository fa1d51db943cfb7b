"""One test per spelling the matcher supports, and near misses it must leave alone.

Every program is compiled with flashfuse and checked against eager: forward and gradients,
and the number of rewritten sites (0 for the near misses).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flashfuse.kernels.reference import repeat_kv
from flashfuse.testing import assert_equivalent
from flashfuse.tolerances import FORWARD, relative_error

B, H, HKV, NQ, NK, D = 2, 4, 2, 10, 13, 16
FAST = {"compiler": "eager"}
MIN = torch.finfo(torch.float32).min


def rand(*shape, grad=True, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def qkv(nq=NQ, nk=NK, d=D, hkv=H, dtype=torch.float32):
    return rand(B, H, nq, d, dtype=dtype), rand(B, hkv, nk, d, dtype=dtype), rand(B, hkv, nk, d, dtype=dtype)


def padding_mask(nk=NK):
    keep = torch.ones(B, 1, 1, nk, dtype=torch.bool)
    keep[0, ..., : nk // 3] = False
    return keep


def tril(nq=NQ, nk=NK):
    return torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)


# ---------------------------------------------------------------- scale spellings

SCALES = {
    "div_after": lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1) @ v,
    "mul_after": lambda q, k, v: torch.softmax(torch.matmul(q, k.transpose(2, 3)) * D**-0.5, -1) @ v,
    "on_q": lambda q, k, v: torch.softmax((q * D**-0.5) @ k.transpose(-2, -1), -1) @ v,
    "on_k": lambda q, k, v: torch.softmax(q @ (k / 4.0).transpose(-2, -1), -1) @ v,
    "quarter_on_both": lambda q, k, v: torch.softmax((q * D**-0.25) @ (k * D**-0.25).mT, -1) @ v,
    "zero_dim_tensor": lambda q, k, v: torch.softmax(q @ k.mT / torch.full([], math.sqrt(D)), -1) @ v,
    "tensor_constant": lambda q, k, v: torch.softmax(q @ k.mT * torch.tensor(0.3), -1) @ v,
    "none": lambda q, k, v: torch.softmax(q @ k.mT, -1) @ v,
    "after_bias": lambda q, k, v: torch.softmax((q @ k.mT + torch.ones(NK) * 0.5) * 0.2, -1) @ v,
    "twice": lambda q, k, v: torch.softmax((q * 0.5) @ k.mT / 2.0 * 0.7, -1) @ v,
}


@pytest.mark.parametrize("name", SCALES)
def test_scale_spellings(name):
    assert_equivalent(SCALES[name], *qkv(), expected_sites=1, options=FAST)


def test_scale_is_folded_into_one_scalar():
    sites = assert_equivalent(SCALES["quarter_on_both"], *qkv(), expected_sites=1, options=FAST)
    assert sites[0].spec.scale == pytest.approx(D**-0.5)
    sites = assert_equivalent(SCALES["div_after"], *qkv(), expected_sites=1, options=FAST)
    assert sites[0].spec.scale == pytest.approx(D**-0.5)


def test_runtime_zero_dim_scale():
    temperature = torch.tensor(0.7, requires_grad=True)
    fn = lambda q, k, v, t: torch.softmax(q @ k.mT * t, -1) @ v  # noqa: E731
    assert_equivalent(fn, *qkv(), temperature, expected_sites=1, options=FAST)


def test_baddbmm_alpha_and_beta():
    q, k, v = (rand(B * H, n, D) for n in (NQ, NK, NK))
    alibi = rand(B * H, 1, NK)
    fn = lambda q, k, v, a: torch.bmm(torch.baddbmm(a, q, k.transpose(1, 2), beta=1.0, alpha=0.25).softmax(-1), v)  # noqa: E731,E501
    assert_equivalent(fn, q, k, v, alibi, expected_sites=1, options=FAST)
    method = lambda q, k, v, a: torch.bmm(a.baddbmm(q, k.transpose(1, 2), beta=0.5, alpha=0.3).softmax(-1), v)  # noqa: E731,E501
    assert_equivalent(method, q, k, v, alibi, expected_sites=1, options=FAST)
    empty = lambda q, k, v: torch.bmm(  # noqa: E731  GPT-2's reorder_and_upcast_attn
        torch.baddbmm(torch.empty(B * H, NQ, NK), q, k.transpose(-1, -2), beta=0, alpha=0.25).softmax(-1), v)
    assert_equivalent(empty, q, k, v, expected_sites=1, options=FAST)


# ---------------------------------------------------------------- softcap, bias, masks

def test_softcap():
    fn = lambda q, k, v: torch.softmax(30.0 * torch.tanh(q @ k.mT * 0.25 / 30.0), -1) @ v  # noqa: E731
    sites = assert_equivalent(fn, *qkv(), expected_sites=1, options=FAST)
    assert sites[0].spec.softcap == pytest.approx(30.0)


@pytest.mark.parametrize("shape", [(B, 1, 1, NK), (1, H, 1, NK), (1, H, NQ, NK), (B, H, NQ, NK), (NQ, NK), (NK,)])
def test_bias_shapes(shape):
    fn = lambda q, k, v, bias: torch.softmax(q @ k.mT * 0.25 + bias, -1) @ v  # noqa: E731
    sites = assert_equivalent(fn, *qkv(), rand(*shape), expected_sites=1, options=FAST)
    assert sites[0].operands["bias"] is True


def test_padding_mask_as_finfo_min_bias_with_empty_rows():
    keep = padding_mask() & tril()  # causal with left padding: some queries see no key
    bias = torch.where(keep, 0.0, MIN)
    fn = lambda q, k, v, bias: torch.softmax(q @ k.mT * 0.25 + bias, -1) @ v  # noqa: E731
    assert_equivalent(fn, *qkv(), bias, expected_sites=1, options=FAST)


def test_commuted_bias_and_subtraction():
    fn = lambda q, k, v, b: torch.softmax(b + q @ k.mT * 0.25 - b * 0.5, -1) @ v  # noqa: E731
    assert_equivalent(fn, *qkv(), rand(1, H, NQ, NK), expected_sites=1, options=FAST)


MASKS = {
    "masked_fill_inf": lambda s, keep: s.masked_fill(~keep, float("-inf")),
    "masked_fill_min_eq0": lambda s, keep: s.masked_fill(keep.long() == 0, MIN),
    "where_keep": lambda s, keep: torch.where(keep, s, float("-inf")),
    "where_hide": lambda s, keep: torch.where(~keep, MIN, s),
    "large_negative": lambda s, keep: s.masked_fill(~keep, -1e9),
    "torch_masked_fill": lambda s, keep: torch.masked_fill(s, ~keep, -10000.0),
    "two_masks": lambda s, keep: s.masked_fill(~keep, -1e9).masked_fill(~tril(), -1e9),
}


@pytest.mark.parametrize("name", MASKS)
def test_bool_mask_spellings(name):
    spell = MASKS[name]
    fn = lambda q, k, v, keep: torch.softmax(spell(q @ k.mT * 0.25, keep), -1) @ v  # noqa: E731
    sites = assert_equivalent(fn, *qkv(), padding_mask(), expected_sites=1, options=FAST)
    assert sites[0].operands["mask"] is True


def test_causal_buffer_slice():
    buffer = torch.ones(32, 32, dtype=torch.bool).tril().view(1, 1, 32, 32)
    fn = lambda q, k, v: torch.softmax(  # noqa: E731  nanoGPT
        (q @ k.mT * 0.25).masked_fill(buffer[:, :, :NQ, :NQ] == 0, float("-inf")), -1) @ v
    assert_equivalent(fn, *qkv(nk=NQ), expected_sites=1, options=FAST)


# ---------------------------------------------------------------- softmax forms, dtypes, dropout

SOFTMAXES = {
    "functional": lambda s: F.softmax(s, dim=-1),
    "method": lambda s: s.softmax(-1),
    "module": lambda s: nn.Softmax(dim=-1)(s),
    "torch": lambda s: torch.softmax(s, dim=3),
    "dtype_fp32_to": lambda s: F.softmax(s, dim=-1, dtype=torch.float32).to(s.dtype),
    "float_type_as": lambda s: s.float().softmax(-1).type_as(s),
    "type": lambda s: F.softmax(s.to(torch.float32), -1).type(s.dtype),
}


@pytest.mark.parametrize("name", SOFTMAXES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_spellings(name, dtype):
    sm = SOFTMAXES[name]
    fn = lambda q, k, v: sm(q @ k.mT * 0.25) @ v  # noqa: E731
    assert_equivalent(fn, *qkv(dtype=dtype), expected_sites=1, options=FAST)


def test_dropout_in_eval_and_training():
    drop = nn.Dropout(0.1).eval()
    fn = lambda q, k, v: F.dropout(drop(torch.softmax(q @ k.mT * 0.25, -1)), 0.2, training=False) @ v  # noqa: E731
    assert_equivalent(fn, *qkv(), expected_sites=1, options=FAST)
    train = lambda q, k, v: F.dropout(torch.softmax(q @ k.mT * 0.25, -1), 0.3, training=True) @ v  # noqa: E731
    q, k, v = qkv()
    from flashfuse.testing import compile_and_report
    compiled, sites = compile_and_report(train, FAST)
    out = compiled(q, k, v)
    assert out.shape == (B, H, NQ, D) and torch.isfinite(out).all()
    assert sites[0].rewritten and sites[0].spec.dropout_p == pytest.approx(0.3)


# ---------------------------------------------------------------- GQA, layouts, products

def test_gqa_repeat_kv_is_absorbed():
    q, k, v = qkv(hkv=HKV)
    fn = lambda q, k, v: torch.softmax(q @ repeat_kv(k, H // HKV).mT * 0.25, -1) @ repeat_kv(v, H // HKV)  # noqa: E731
    sites = assert_equivalent(fn, q, k, v, expected_sites=1, options=FAST)
    assert sites[0].operands["gqa"] == H // HKV


def test_repeat_interleave_and_mqa_broadcast():
    q, k, v = qkv(hkv=HKV)
    fn = lambda q, k, v: torch.softmax(  # noqa: E731
        q @ k.repeat_interleave(2, dim=1).mT * 0.25, -1) @ v.repeat_interleave(2, dim=1)
    assert_equivalent(fn, q, k, v, expected_sites=1, options=FAST)
    q, k, v = qkv(hkv=1)
    mqa = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v  # noqa: E731
    assert_equivalent(mqa, q, k, v, expected_sites=1, options=FAST)


def test_bmm_over_flattened_heads():
    def bart(x, wq, wk, wv):
        q = (x @ wq * D**-0.5).view(B, NQ, H, D).transpose(1, 2).reshape(B * H, NQ, D)
        k = (x @ wk).view(B, NQ, H, D).transpose(1, 2).reshape(B * H, NQ, D)
        v = (x @ wv).view(B, NQ, H, D).transpose(1, 2).reshape(B * H, NQ, D)
        p = torch.bmm(q, k.transpose(1, 2)).softmax(-1)
        return torch.bmm(p, v).view(B, H, NQ, D).transpose(1, 2).reshape(B, NQ, H * D)
    x, ws = rand(B, NQ, H * D), [rand(H * D, H * D) for _ in range(3)]
    assert_equivalent(bart, x, *ws, expected_sites=1, options=FAST)


def test_fused_qkv_permute_unbind_and_output_layout():
    def timm_attention(x, w):
        q, k, v = (x @ w).reshape(B, NQ, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        q = q * D**-0.5
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(B, NQ, H * D)
    assert_equivalent(timm_attention, rand(B, NQ, H * D), rand(H * D, 3 * H * D), expected_sites=1, options=FAST)


def test_key_permuted_straight_to_transposed_layout():
    def whisper_old(x, wq, wk, wv):
        q = (x @ wq).view(B, NQ, H, D).permute(0, 2, 1, 3) * D**-0.25
        k = (x @ wk).view(B, NQ, H, D).permute(0, 2, 3, 1) * D**-0.25
        v = (x @ wv).view(B, NQ, H, D).permute(0, 2, 1, 3)
        return (torch.softmax((q @ k).float(), dim=-1).to(q.dtype) @ v).permute(0, 2, 1, 3).flatten(2)
    x, ws = rand(B, NQ, H * D), [rand(H * D, H * D) for _ in range(3)]
    assert_equivalent(whisper_old, x, *ws, expected_sites=1, options=FAST)


def _complex_rope(x, freqs):
    """Rotary embeddings as Meta's Llama code (and transformers' Llama 4) write them: feature pairs as complex
    numbers, rotated, and flattened back. x (B, N, H, D); freqs (N, D / 2, 2): cos and sin."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rotation = torch.view_as_complex(freqs.contiguous())[None, :, None, :]
    return torch.view_as_real(pairs * rotation).flatten(3).type_as(x)


def _paired_rope(x, freqs):
    """The same in real numbers, as gpt-fast writes it: the pairs' two rotated components stacked."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs[None, :, None]
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1)
    return out.flatten(3).type_as(x)


@pytest.mark.parametrize("rope", [_complex_rope, _paired_rope])
def test_rotary_embeddings_on_feature_pairs_keep_the_feature_axis(rope):
    def fn(x, wq, wk, wv, freqs):
        q = rope((x @ wq).view(B, NQ, H, D), freqs).transpose(1, 2)
        k = rope((x @ wk).view(B, NQ, H, D), freqs).transpose(1, 2)
        v = (x @ wv).view(B, NQ, H, D).transpose(1, 2)
        return (torch.softmax(q @ k.transpose(2, 3) * D**-0.5, dim=-1) @ v).transpose(1, 2).reshape(B, NQ, H * D)
    x, ws = rand(B, NQ, H * D), [rand(H * D, H * D) for _ in range(3)]
    angles = torch.arange(NQ)[:, None] * torch.rand(D // 2)
    assert_equivalent(fn, x, *ws, torch.stack([angles.cos(), angles.sin()], -1), expected_sites=1, options=FAST)


def test_pairs_of_two_tensors_stacked_prove_nothing():
    """The proof needs every stacked component to come from one tensor's pairs; components of two tensors' pairs
    prove nothing, so the site is left alone (fail closed) and says why."""
    def fn(q, k, v):
        qs, ks = q.reshape(B, H, NQ, -1, 2), k.reshape(B, H, NQ, -1, 2)
        q2 = torch.stack([qs[..., 0], ks[..., 1]], -1).flatten(3)
        return torch.softmax(q2 @ k.mT, -1) @ v
    left_alone(fn, *qkv(nk=NQ), reason="feature")


def test_merging_tokens_into_the_features_is_not_attention():
    """A reshape that merges a token axis into the last one makes a product over tokens and features together."""
    def fn(q, k, v):
        qs, ks = q.reshape(B, H, 1, NQ * D), k.reshape(B, H, 1, NQ * D)
        return torch.softmax(qs @ ks.mT, -1) @ v[:, :, :1]
    left_alone(fn, *qkv(nk=NQ), reason="feature")


def test_einsum_products():
    fn = lambda q, k, v: torch.einsum(  # noqa: E731
        "bhqk,bhkd->bhqd", torch.einsum("bhqd,bhkd->bhqk", q, k).mul(0.25).softmax(-1), v)
    assert_equivalent(fn, *qkv(), expected_sites=1, options=FAST)


def test_in_place_ops():
    def fn(q, k, v, bias, keep):
        s = q @ k.mT
        s /= 4.0
        s += bias
        s.masked_fill_(~keep, float("-inf"))
        return s.softmax(-1) @ v
    assert_equivalent(fn, *qkv(), rand(1, H, NQ, NK), padding_mask(), expected_sites=1, options=FAST)


def test_sdpa_calls_are_routed():
    q, k, v = qkv(nk=NQ)
    fn = lambda q, k, v, m: (F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
                             + F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3))
    keep = padding_mask(NQ) & tril(NQ, NQ)
    assert_equivalent(fn, q, k, v, keep, expected_sites=2, options=FAST)
    gqa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    assert_equivalent(gqa, *qkv(hkv=HKV), expected_sites=1, options=FAST)


def test_inductor_compiles_the_rewritten_graph():
    fn = lambda q, k, v, b: torch.softmax(q @ k.mT * 0.25 + b, -1) @ v  # noqa: E731
    assert_equivalent(fn, *qkv(), rand(B, 1, 1, NK), expected_sites=1)


# ---------------------------------------------------------------- near misses: left alone, still correct

def left_alone(fn, *inputs, reason):
    """The program runs unchanged (every site refused) and equal to eager, for the stated reason."""
    sites = assert_equivalent(fn, *inputs, expected_sites=0, options=FAST)
    assert sites and all(reason in s.reason and not s.reason.startswith("internal error") for s in sites), \
        [s.reason for s in sites]


def test_softmax_over_queries_is_not_attention():
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, dim=-2) @ v  # noqa: E731
    left_alone(fn, *qkv(nk=NQ), reason='softmax over dim -2')


def test_returned_weights_are_left_alone():
    def fn(q, k, v):
        w = torch.softmax(q @ k.mT * 0.25, -1)
        return w @ v, w
    left_alone(fn, *qkv(), reason='other users')


def test_missing_transpose_with_n_equal_d():
    fn = lambda q, k, v: torch.softmax(q @ k * 0.25, -1) @ v  # noqa: E731  k is (B, H, N, D) with N == D
    left_alone(fn, *qkv(nq=D, nk=D), reason='k is not transposed')


def test_mask_after_softmax():
    fn = lambda q, k, v, keep: torch.softmax(q @ k.mT * 0.25, -1).masked_fill(~keep, 0.0) @ v  # noqa: E731
    left_alone(fn, *qkv(), padding_mask(), reason='not a p.v product')


def test_scores_reused_elsewhere():
    def fn(q, k, v):
        s = q @ k.mT * 0.25
        return torch.softmax(s, -1) @ v, s.mean()
    left_alone(fn, *qkv(), reason='other users')


def test_value_contracted_over_features():
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v.mT  # noqa: E731  v is (B, H, N, D) with N == D
    left_alone(fn, *qkv(nq=D, nk=D), reason="does not contract v's token dim")


def test_small_fill_value_is_not_a_mask():
    fn = lambda q, k, v, keep: torch.softmax((q @ k.mT).masked_fill(~keep, -5.0), -1) @ v  # noqa: E731
    left_alone(fn, *qkv(), padding_mask(), reason='is not a mask')


def test_scale_that_dynamo_made_an_input():
    # after a recompile, Dynamo passes a float argument that changed as a SymFloat graph input
    from flashfuse.testing import compile_and_report
    fn = lambda q, k, v, scale: torch.softmax(q @ k.mT * scale, -1) @ v  # noqa: E731
    q, k, v = qkv()
    with torch._dynamo.config.patch(specialize_float=False):
        compiled, sites = compile_and_report(fn, FAST)
        for scale in (0.37, 0.41):
            out = compiled(q, k, v, scale)
            assert relative_error(out, fn(q, k, v, scale)) < FORWARD[torch.float32]
    assert sites[-1].rewritten and sites[-1].operands["runtime_scale"] is True


def test_scores_regrouped_between_bmm_and_four_dims():
    def bloom(q, k, v, alibi, bias):  # (B*H, N, D) products, a (B, H, N, N) softmax
        s = alibi.baddbmm(batch1=q, batch2=k.transpose(-1, -2), beta=1.0, alpha=0.25).view(B, H, NQ, NK)
        p = F.softmax(s + bias, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(p.view(B * H, NQ, NK), v).view(B, H, NQ, D)
    q, k, v = rand(B * H, NQ, D), rand(B * H, NK, D), rand(B * H, NK, D)
    assert_equivalent(bloom, q, k, v, rand(B * H, 1, NK), rand(B, 1, NQ, NK), expected_sites=1, options=FAST)


def test_window_mask_added_in_a_five_dim_view():
    windows = 3

    def swin(q, k, v, rel, mask):  # q, k, v: (B * windows, H, N, D)
        s = q * 0.25 @ k.transpose(-2, -1) + rel.unsqueeze(0)
        s = s.view(-1, windows, H, NQ, NQ) + mask.unsqueeze(1).unsqueeze(0)
        return s.view(-1, H, NQ, NQ).softmax(-1) @ v
    q, k, v = (rand(B * windows, H, NQ, D) for _ in range(3))
    mask = torch.where(torch.rand(windows, NQ, NQ) > 0.3, 0.0, -100.0)
    assert_equivalent(swin, q, k, v, rand(H, NQ, NQ), mask, expected_sites=1, options=FAST)


def hf_mask(nq, nk, window=None, padding=None):
    """A mask built in the graph the way transformers' masking_utils does."""
    q_idx = (torch.arange(nq) + (nk - nq))[None, None, :, None]
    kv_idx = (torch.arange(nk) + 0)[None, None, None, :]
    keep = q_idx.new_ones((), dtype=torch.bool)
    if window is not None:
        keep = keep & (kv_idx > q_idx - window).to("cpu")
    keep = keep & (kv_idx <= q_idx).to("cpu")
    if padding is not None:
        keep = keep & padding[:, None, None, :]
    return torch.where(keep.expand(B, -1, nq, nk), torch.zeros(()), torch.finfo(torch.float32).min)


@pytest.mark.parametrize("nq, nk, window, spec", [(NQ, NQ, None, (True, (-1, -1))), (NQ, NK, None, (True, (-1, -1))),
                                                   (NK, NK, 4, (True, (3, -1)))])
def test_index_built_causal_and_window_masks_become_flags(nq, nk, window, spec):
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25 + hf_mask(nq, nk, window), -1) @ v  # noqa: E731
    sites = assert_equivalent(fn, *qkv(nq=nq, nk=nk), expected_sites=1, options=FAST)
    assert (sites[0].spec.causal, sites[0].spec.window) == spec and sites[0].operands["bias"] is False


def test_index_built_mask_with_padding_is_causal_plus_key_padding():
    pad = torch.ones(B, NQ, dtype=torch.bool)
    pad[0, :4] = False  # left padding: early queries of sequence 0 see no key, as eager computes them
    fn = lambda q, k, v, pad: torch.softmax(q @ k.mT * 0.25 + hf_mask(NQ, NQ, padding=pad), -1) @ v  # noqa: E731
    sites = assert_equivalent(fn, *qkv(nk=NQ), pad, expected_sites=1, options=FAST)
    assert sites[0].operands["bias"] is False and sites[0].spec.causal
    assert sites[0].operands["mask_note"] == "key_padding" and sites[0].spec.empty_rows == "average"


def test_fill_scaled_past_the_dtype_range_becomes_minus_inf():
    # finfo.min / 0.125 overflows to -inf in the scores' dtype; the op must get -inf, not a float it cannot hold
    fn = lambda q, k, v, keep: torch.softmax((q @ k.mT).masked_fill(~keep, MIN) / 0.125, -1) @ v  # noqa: E731
    sites = assert_equivalent(fn, *qkv(), padding_mask(), expected_sites=1, options=FAST)
    assert sites[0].rewritten


def test_scale_on_k_under_a_transpose_that_einsum_contracts_back():
    # found by the fuzzer: the scale was folded and the multiply kept, scaling the scores twice
    def fn(q, k, v):
        k = k * D**-0.5
        return F.softmax(torch.einsum("bqd,bdk->bqk", q, k.transpose(-1, -2)), dim=-1) @ v
    assert_equivalent(fn, rand(B, NQ, D), rand(B, NK, D), rand(B, NK, D), expected_sites=1, options=FAST)
    fn4 = lambda q, k, v: torch.softmax(q @ (repeat_kv(k, 2).transpose(-1, -2) * 0.3), -1) @ repeat_kv(v, 2)  # noqa: E731
    assert_equivalent(fn4, *qkv(hkv=HKV), expected_sites=1, options=FAST)
