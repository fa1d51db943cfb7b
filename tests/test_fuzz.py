"""Fuzzing the matcher with random attention programs (flashfuse.testing.attention_programs).

Attention programs must be rewritten (once per site) and stay equivalent to eager, forward and
gradients; near misses must be left alone and stay equivalent. How many programs run depends on
the Hypothesis profile (FLASHFUSE_HYPOTHESIS_PROFILE=ci|dev|fuzz, default ci: derandomized, a couple
of minutes on two CPU cores). The end of the file holds one regression test per bug the fuzzer found.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

import flashfuse
from flashfuse.kernels.reference import repeat_kv
from flashfuse.kernels.spec import AttentionSpec
from flashfuse.testing.equivalence import assert_equivalent
from flashfuse.testing.fuzz import fuzz_equivalence
from flashfuse.testing.profiles import PROFILE_ENV, PROFILES, fuzz_options, load_profile, profile_name
from flashfuse.testing.programs import LAYOUTS, NEAR_MISSES, OPEN_BUGS, attention_programs, build_program, check_program

FAST = {"compiler": "eager"}


# ---------------------------------------------------------------- the fuzz tests

@given(attention_programs(attention=True))
def test_attention_programs_are_rewritten_and_equivalent(program):
    assert program.is_attention and program.expected_sites >= 1
    check_program(program)


@given(attention_programs(attention=False))
def test_near_misses_are_left_alone_and_equivalent(program):
    assert not program.is_attention and program.expected_sites == 0
    check_program(program)


@pytest.mark.slow
@settings(max_examples=8)
@given(attention_programs())
def test_programs_through_inductor(program):
    """The same check with inductor compiling the rewritten graph (slow on a CPU: pytest -m slow)."""
    check_program(program, options=fuzz_options("inductor"))


# ---------------------------------------------------------------- the strategy itself (no compilation)

_NO_COMPILE = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                       suppress_health_check=[HealthCheck.too_slow])


def test_programs_run_in_eager_and_their_source_is_what_runs():
    seen = {"layout": set(), "kind": set()}

    @_NO_COMPILE
    @given(attention_programs())
    def check(program):
        outputs = program.module(*program.inputs)
        out = outputs[0] if isinstance(outputs, tuple) else outputs
        if out.requires_grad:  # a valid program: eager's own backward runs (no in-place op on a saved output)
            out.sum().backward()
        rebuilt = build_program(program.choices)
        assert rebuilt.source == program.source
        namespace = {}
        exec(compile(program.source, "<program>", "exec"), namespace)  # noqa: S102
        assert type(program.module).forward.__code__.co_code == namespace["Program"].forward.__code__.co_code
        assert program.expected_sites == (program.choices.get("calls", 1) if program.is_attention else 0)
        floats = [x for x in program.inputs if x.is_floating_point()]
        assert all(x.dtype == getattr(torch, program.choices["dtype"]) for x in floats)
        for name in seen:
            seen[name].add(program.choices[name])

    check()
    assert seen["layout"] == set(LAYOUTS)
    settings(max_examples=300)(given(attention_programs(attention=False))(check.hypothesis.inner_test))()
    assert seen["kind"] == {"attention", *NEAR_MISSES}


def test_failures_shrink_to_a_short_program():
    """Shrinking goes to the first (simplest) option of every choice: a bare 4-D attention."""
    program = find(attention_programs(attention=True), lambda p: p.choices["masks"] != "none",
                   settings=settings(database=None, max_examples=500, derandomize=True))
    assert program.choices["layout"] == "inputs" and program.choices["B"] == program.choices["NQ"] == 1
    body = program.source.split("def forward")[1].strip().splitlines()[1:]
    assert len(body) <= 6, program.source


# ---------------------------------------------------------------- profiles

def test_profiles_are_registered_and_chosen_by_environment(monkeypatch):
    assert set(PROFILES) == {"ci", "dev", "fuzz"}
    assert PROFILES["ci"]["derandomize"] and PROFILES["ci"]["deadline"] is None
    monkeypatch.setenv(PROFILE_ENV, "dev")
    assert profile_name() == "dev"
    monkeypatch.delenv(PROFILE_ENV)
    assert profile_name() == "ci"
    monkeypatch.setenv(PROFILE_ENV, "nope")
    with pytest.raises(ValueError):
        profile_name()
    monkeypatch.delenv(PROFILE_ENV)
    assert load_profile() == "ci" or os.environ.get(PROFILE_ENV)
    assert settings.default.deadline is None
    assert fuzz_options() == {"compiler": "eager"} and fuzz_options("inductor") == {"compiler": "inductor"}


# ---------------------------------------------------------------- fuzzing your own module

class TinyAttention(nn.Module):
    """What a user would bring: a small self-attention block with a padding mask."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, keep):
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (dim // self.heads) ** 0.5
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        return self.out((F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, dim))


def _tiny_inputs(batch, seq):
    keep = torch.ones(batch, seq, dtype=torch.bool)
    keep[0, : seq // 2] = False
    return torch.randn(batch, seq, 16, requires_grad=True), keep


@fuzz_equivalence(expected_sites=1, max_examples=3, batch=st.integers(1, 2), seq=st.integers(1, 6))
def test_fuzz_equivalence_decorator(batch, seq):
    torch.manual_seed(0)
    return TinyAttention().eval(), _tiny_inputs(batch, seq)


def test_flashfuse_fuzz_fixture(flashfuse_fuzz):
    flashfuse_fuzz(lambda seq: (TinyAttention().eval(), _tiny_inputs(2, seq)), expected_sites=1, max_examples=2,
                   seq=st.integers(1, 6))


def test_fuzz_equivalence_reports_a_wrong_site_count(flashfuse_fuzz):
    with pytest.raises(AssertionError, match="sites rewritten"):
        flashfuse_fuzz(lambda seq: (TinyAttention().eval(), _tiny_inputs(1, seq)), expected_sites=2, max_examples=1,
                       seq=st.just(3))


# ---------------------------------------------------------------- regressions: bugs the fuzzer found
# Each was a strict xfail until fixed (13f941e, abb811b); programs.OPEN_BUGS lists the ones still open.

def _r(*shape):
    return torch.randn(*shape, requires_grad=True)


HIDDEN_TRANSPOSES = {
    "movedim": lambda t: t.movedim(-1, -2),
    "moveaxis": lambda t: torch.moveaxis(t, -1, -2),
    "einsum": lambda t: torch.einsum("bhnd->bhdn", t),
}


@pytest.mark.parametrize("spelling", HIDDEN_TRANSPOSES)
@pytest.mark.parametrize("operand", ["q", "k", "v"])
def test_transpose_hidden_in_movedim_is_a_near_miss(operand, spelling):
    """Was rewritten: layout.py took movedim / moveaxis / einsum for the data's origin (and the CPU
    reference then read the movedim'd q with its last-dim stride != 1 as contiguous: garbage out)."""
    t = HIDDEN_TRANSPOSES[spelling]
    programs = {  # D == 8 == the token count of the transposed operand, so the wrong contraction type-checks
        "q": (lambda q, k, v: torch.softmax(t(q) @ k.mT, -1) @ v, (_r(1, 2, 8, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8))),
        "k": (lambda q, k, v: torch.softmax(q @ t(k).mT, -1) @ v, (_r(1, 2, 5, 8), _r(1, 2, 8, 8), _r(1, 2, 8, 8))),
        "v": (lambda q, k, v: torch.softmax(q @ k.mT, -1) @ t(v), (_r(1, 2, 5, 8), _r(1, 2, 8, 8), _r(1, 2, 8, 8))),
    }
    fn, inputs = programs[operand]
    assert_equivalent(fn, *inputs, expected_sites=0, options=FAST)


GQA_TRANSPOSED_K = {
    "scale_on_kT": lambda q, k, v: torch.softmax(q @ (repeat_kv(k, 2).transpose(-1, -2) * 0.3), -1) @ repeat_kv(v, 2),
    "interleave_scale_on_kT": lambda q, k, v: torch.softmax(
        q @ (k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3), -1) @ v.repeat_interleave(2, dim=1),
    "einsum_dk": lambda q, k, v: torch.softmax(
        torch.einsum("bhqd,bhdk->bhqk", q, repeat_kv(k, 2).transpose(-1, -2)), -1) @ repeat_kv(v, 2),
    "pre_permuted_k": lambda q, k, v: torch.softmax(q @ repeat_kv(k.permute(0, 1, 3, 2), 2), -1) @ repeat_kv(v, 2),
}


@pytest.mark.parametrize("name", GQA_TRANSPOSED_K)
def test_gqa_with_transposed_k_is_rewritten(name):
    """Was refused: 'repeat_kv was absorbed on only one of k and v' or 'k is not transposed'."""
    assert_equivalent(GQA_TRANSPOSED_K[name], _r(1, 2, 5, 8), _r(1, 1, 7, 8), _r(1, 1, 7, 8), expected_sites=1,
                      options=FAST)


@pytest.mark.parametrize("spelling", ["method", "function"])  # was open bug gqa_interleave_pre_permuted_k
def test_gqa_repeat_interleave_of_a_pre_permuted_k_is_rewritten(spelling):
    def fn(q, k, v):
        kt = k.permute(0, 1, 3, 2)
        kt = kt.repeat_interleave(2, dim=1) if spelling == "method" else torch.repeat_interleave(kt, 2, dim=1)
        return torch.softmax(q @ kt, -1) @ v.repeat_interleave(2, dim=1)
    assert_equivalent(fn, _r(1, 2, 5, 8), _r(1, 1, 7, 8), _r(1, 1, 7, 8), expected_sites=1, options=FAST)


@pytest.fixture
def reference_op(monkeypatch):
    """Run the op's CPU path (what CPU users get without Triton's interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _op(q, k, v, bias=None):
    return torch.ops.flashfuse.fwd(q, k, v, bias, None, None, AttentionSpec(scale=1.0).encode())[0]


def test_reference_value_head_dim_differs(reference_op):
    """Was a RuntimeError from the CPU reference's fused path (aten's flash kernel needs Dv == D)."""
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 16)
    torch.testing.assert_close(_op(q, k, v), torch.softmax(q @ k.mT, -1) @ v)


@pytest.mark.parametrize("layout", ["mT", "heads_last"])
def test_reference_query_with_strided_last_dim(reference_op, layout):
    """Was garbage (1e36) or NaN: the fused CPU kernel read q as if its last dim were contiguous."""
    q = torch.randn(1, 2, 8, 8).mT if layout == "mT" else torch.randn(1, 5, 8, 2).permute(0, 3, 1, 2)
    k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    torch.testing.assert_close(_op(q, k, v), torch.softmax(q @ k.mT, -1) @ v)


def test_reference_huge_positive_bias_gradients(reference_op):
    """Was a relative gradient error of 1.0: rows whose max is +3.4e38 (scores - a finfo.min bias)."""
    bias = torch.zeros(2, 1, 1, 4)
    bias[0, ..., 2:] = torch.finfo(torch.float32).min
    fn = lambda q, k, v, b: torch.softmax(q @ k.mT * 0.25 - b, -1) @ v  # noqa: E731
    assert_equivalent(fn, _r(2, 3, 4, 16), _r(2, 3, 4, 16), _r(2, 3, 4, 16), bias, expected_sites=1, options=FAST)


@pytest.mark.parametrize("spelling", ["baddbmm", "add"])
def test_reference_finfo_min_bias_broadcast_over_keys(reference_op, spelling):
    """Was a relative gradient error of 1.0: a (1,) finfo.min bias swallows every score, and the CPU path's row
    stats counted one key at the max instead of all of them."""
    bias = torch.full((1,), torch.finfo(torch.float32).min)

    def fn(q, k, v, bias):
        if spelling == "baddbmm":
            scores = torch.baddbmm(bias, q, k.transpose(-1, -2))
        else:
            scores = q @ k.transpose(-1, -2) + bias
        return torch.softmax(scores, -1) @ v
    assert_equivalent(fn, _r(2, 3, 8), _r(2, 4, 8), _r(2, 4, 8), bias, expected_sites=1, options=FAST)


def test_reference_scale_after_finfo_min_mask(reference_op):
    """Was a RuntimeError: finfo.min / 0.125 folded into a mask_value float32 cannot hold."""
    keep = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    keep[..., :2] = False

    def fn(q, k, v, keep):
        scores = (q @ k.mT).masked_fill(~keep, torch.finfo(torch.float32).min)
        return torch.softmax(scores / 0.125, -1) @ v
    assert_equivalent(fn, _r(1, 2, 4, 8), _r(1, 2, 6, 8), _r(1, 2, 6, 8), keep, expected_sites=1, options=FAST)


def test_one_key_per_row_gradients_are_judged_against_float64():
    """With Nk == 1, dq and dk are exactly 0 in eager but rounding noise in a flash backward (up to ~4e-3 of
    assert_equivalent's tolerance scale); check_program re-judges them against float64 (ROUNDING_FLOOR)."""
    program = build_program({
        "kind": "attention", "dtype": "float32", "layout": "inputs", "B": 1, "H": 2, "HKV": 1, "D": 8, "NQ": 2,
        "NK": 1, "gqa": "repeat_kv", "product": "at", "kT": "transpose_m1m2", "scale": "after", "scale_op": "div",
        "scale_value": 0.125, "bias": "none", "softcap": "none", "masks": "none", "softmax": "functional",
        "dropout": "none", "value_product": "at", "output": "as_is", "seed": 0})
    check_program(program)


def test_bf16_scores_filled_with_minus_1e4_are_masked():
    """Was refused after abb811b: the fill was rounded to bf16 (-9984) before the '<= -1e4' test (fixed 3e4c4ff)."""
    torch.manual_seed(0)
    q, k, v = (_r(1, 2, 4, 8).bfloat16() for _ in range(3))
    keep = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    keep[..., 0] = False
    fn = lambda q, k, v, keep: torch.softmax((q @ k.mT).masked_fill(~keep, -10000.0), -1) @ v  # noqa: E731
    # with gradients since bf16_peaked_gradients was fixed (at scale 1, 5 of 12 seeds missed before; 0 of 12 after)
    assert_equivalent(fn, q, k, v, keep, expected_sites=1, options=FAST)


@pytest.mark.parametrize("equation, shape", [("bqd,bdk->bqk", (2, 5, 8)), ("bhqd,bhdk->bhqk", (1, 2, 5, 8))])
def test_einsum_with_scaled_k_transposed_for_the_product(equation, shape):
    """Was a wrong answer (relative error 0.45): the scale on k was folded into the op's scale while k still
    reached the op multiplied (fixed 0add39d)."""
    q = _r(*shape[:-2], 3, 8)
    fn = lambda q, k, v: torch.softmax(torch.einsum(equation, q, (k * 0.35).transpose(-1, -2)), -1) @ v  # noqa: E731
    assert_equivalent(fn, q, _r(*shape), _r(*shape), expected_sites=1, options=FAST)


# Bug bf16_peaked_gradients (fixed by spec.fp32_delta): the backward's delta = rowsum(dO * O) came from the bf16
# output, so each row's dS = P * (dP - delta) no longer summed to zero, and on a peaked softmax dq and dk were
# 0.048 and 0.098 from float64 where eager bf16 is 0.008 and 0.006. These run on the Triton kernels in the CI
# (the interpreter) and on the CPU path with TRITON_INTERPRET=0.


def test_bf16_backward_of_a_peaked_softmax_is_as_accurate_as_eager():
    from flashfuse.tolerances import GRADIENT, relative_error
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 1, n, 8, dtype=torch.float64) for n in (3, 8, 8))
    dout = torch.randn(1, 1, 3, 8, dtype=torch.float64)

    def grads(dtype, fused):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        if fused:
            out = flashfuse.attention(*leaves, scale=3.33)
        else:
            out = torch.softmax(leaves[0] @ leaves[1].mT * 3.33, -1) @ leaves[2]
        return torch.autograd.grad(out, leaves, dout.to(dtype))

    exact, eager, fused = grads(torch.float64, False), grads(torch.bfloat16, False), grads(torch.bfloat16, True)
    for name, e, f, o in zip("qkv", eager, fused, exact):
        allowed = 2 * max(GRADIENT[torch.bfloat16], relative_error(e, o))
        assert relative_error(f, o) <= allowed, f"d{name}: {relative_error(f, o):.3g} > {allowed:.3g}"


def test_bf16_runtime_temperature_gradient_on_a_peaked_softmax():
    """A runtime temperature's gradient flows through q / t (the rewrite scales q by it); on this peaked softmax
    it was 4-6x off through the bf16 delta, where eager bf16 is 1% off."""
    check_program(build_program({
        "kind": "attention", "dtype": "bfloat16", "layout": "inputs", "B": 1, "H": 1, "HKV": 1, "D": 8, "DV": 8,
        "NQ": 8, "NK": 3, "gqa": "none", "product": "at", "kT": "transpose_m1m2", "scale": "tensor",
        "scale_tensor": "param", "scale_op": "div", "scale_value": 0.125, "bias": "none", "softcap": "none",
        "masks": "none", "softmax": "functional", "dropout": "none", "value_product": "at", "output": "as_is",
        "seed": 0}))


def test_bf16_learned_temperature_gradient_through_the_triton_backward():
    """Found by the long interpreter run: a learned temperature at an ordinary scale (0.125, D 16) with random
    and causal masks over 4 keys; through the bf16 delta its gradient was 0.39 from float64 (0.28 allowed),
    eager bf16's 0.019."""
    check_program(build_program({
        "kind": "attention", "dtype": "bfloat16", "layout": "inputs_bnhd", "B": 2, "H": 2, "HKV": 2, "D": 16,
        "DV": 16, "NQ": 8, "NK": 4, "heads_split": "permute", "gqa": "none", "product": "matmul",
        "kT": "transpose_m2m1", "scale": "tensor", "scale_tensor": "param", "scale_op": "mul", "scale_value": 0.125,
        "bias": "padding_inf", "bias_shape": "11QK", "softcap": "none", "bias_add": "sub", "masks": "random+causal",
        "random_shape": "B1QK", "random_polarity": "hide", "causal_source": "buffer_bool", "pad_side": "right",
        "pads": (0, 0), "combine": "separate", "fill_form0": "where_hide", "fill_form1": "torch_masked_fill",
        "negation": "torch_logical_not", "fill": "-1e9", "softmax": "float_type_as", "dropout": "torch_dropout",
        "value_product": "matmul", "output": "as_is", "seed": 8096}))


def test_fp32_learned_temperature_over_one_key_through_the_triton_backward():
    """Was bug #15 (interpreter run of 2026-12-02): fp32, one key, a learned temperature dividing the scores. Its
    gradient is 0 in exact arithmetic and in eager; a flash backward leaves rounding noise (9.0e-05 here, 3.0e-5 of
    all gradients' norm) that 1 / t^2 amplifies. Torch's own flash backward does the same (the test below), so the
    float64 rule's floor (tolerances.ROUNDING_FLOOR) now clears it."""
    check_program(build_program({
        "kind": "attention", "dtype": "float32", "layout": "inputs", "B": 1, "H": 1, "HKV": 1, "D": 8, "DV": 8,
        "NQ": 1, "NK": 1, "gqa": "none", "product": "at", "kT": "transpose_m1m2", "scale": "tensor",
        "scale_tensor": "param", "scale_op": "div", "scale_value": 0.125, "bias": "none", "softcap": "none",
        "masks": "none", "softmax": "functional", "dropout": "none", "value_product": "at", "output": "as_is",
        "seed": 320}))


def test_fp32_learned_temperature_over_one_key_with_softcap_and_gqa():
    """Found by the fuzzer on the CPU path (seed 2300000, 2026-12-03): as above, with a softcap, an additive bias
    and GQA; the temperature's gradient was 4.8e-4 from float64 (2.3e-5 of all gradients' norm), eager's 0."""
    check_program(build_program({
        "kind": "attention", "dtype": "float32", "layout": "inputs", "B": 2, "H": 3, "HKV": 1, "D": 16, "DV": 16,
        "NQ": 5, "NK": 1, "gqa": "repeat_kv_inline", "product": "einsum", "kT": "transpose_m2m1", "einsum_form": "dk",
        "scale": "tensor", "scale_tensor": "param", "scale_op": "div", "scale_value": 0.125, "bias": "input",
        "bias_shape": "1HQK", "softcap": "tanh_mul", "softcap_value": 50.0, "bias_add": "plus", "masks": "causal",
        "causal_source": "inline_tril", "fill_form0": "masked_fill_", "negation": "logical_not", "fill": "-inf",
        "inf_spelling": "float", "order": "mask_first", "softmax": "torch", "dropout": "functional_training",
        "value_product": "at", "output": "merge_reshape", "seed": 4360}))


def test_the_fp32_rounding_floor_clears_torch_own_flash_backward():
    """The float64 rule's floor is what a flash backward needs, measured on torch's own: SDPA's flash kernel on the
    CPU gives a learned temperature over one key a gradient (0 in exact arithmetic) within the rule's allowance."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashfuse.tolerances import FLOAT64_SLACK, ROUNDING_FLOOR
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16) for n in (5, 1, 1))
    t = torch.tensor(0.125, requires_grad=True)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q / t, k, v, scale=1.0)
    grads = torch.autograd.grad(out, (q, k, v, t), torch.randn_like(out))
    total = sum(g.double().norm() ** 2 for g in grads[:3]) ** 0.5  # dt is 0 in exact arithmetic
    assert abs(grads[3].item()) <= FLOAT64_SLACK * ROUNDING_FLOOR[torch.float32] * total


def test_a_minus_inf_bias_before_a_finite_causal_fill_keeps_the_mask_a_tensor():
    """Was a wrong answer (interpreter run, 2026-12-03, seed 3300000, when the strategy learned causal masks built
    from positions): a -inf padding bias, then where(causal, s, -1e9). Query 0 of the padded row sees only key 0,
    which the bias makes -inf, so eager puts its weight on the filled key 1; with causal structure the op hid key 1
    with -inf too (NaN). A finite fill beside another bias now keeps the mask a tensor."""
    check_program(build_program({
        "kind": "attention", "dtype": "bfloat16", "layout": "proj3d", "B": 2, "H": 2, "D": 8, "DV": 16, "NQ": 2,
        "cross": False, "NK": 2, "sizes": "shape", "linear_bias": False, "heads_split": "view_transpose",
        "flatten_heads": "reshape", "gqa": "none", "product": "einsum", "kT": "torch_transpose", "einsum_form": "dk",
        "scale": "after", "scale_op": "mul", "scale_value": "sqrt_d", "bias": "padding_inf", "bias_shape": "XQK",
        "softcap": "tanh_mul", "softcap_value": 50.0, "bias_add": "iadd", "masks": "causal",
        "causal_source": "positions", "pad_side": "left", "pads": (0, 1), "fill_form0": "where_keep",
        "negation": "eq0", "fill": "-1e9", "softmax": "float_type_as", "dropout": "module", "value_product": "matmul",
        "output": "merge", "o_proj": True, "calls": 2, "seed": 36533}))


def test_a_minus_inf_bias_beside_a_finite_key_fill_keeps_eager_weights():
    """Was a wrong answer (GPU run, 2026-12-01: relative error 0.84): a -inf padding bias hid a query's visible keys
    and a finite fill the rest; eager puts all the weight on the filled keys, and the op's empty_rows="average"
    averaged v over all keys. With no structure, the op fills exactly the keys eager fills: the formula is exact."""
    check_program(build_program({
        "kind": "attention", "dtype": "float32", "layout": "inputs3d", "B": 1, "H": 3, "D": 16, "DV": 16, "NQ": 2,
        "NK": 3, "gqa": "none", "product": "at", "kT": "transpose_m1m2", "scale": "on_q", "scale_op": "mul",
        "scale_value": 0.125, "bias": "padding_inf", "bias_shape": "K", "softcap": "method", "softcap_value": 50.0,
        "bias_add": "torch_add", "masks": "random", "random_shape": "K", "random_polarity": "keep",
        "pad_side": "left", "pads": (2,), "fill_form0": "where_keep", "negation": "~", "fill": "-1e9",
        "softmax": "special", "dropout": "none", "value_product": "einsum", "output": "merge", "seed": 10929}))


def test_a_minus_inf_bias_beside_causal_padding_keeps_the_mask_a_tensor():
    """The same with causal structure: a padded query whose band the bias hides averages, in eager, the padded
    and the out-of-band keys but not the -inf ones, which empty_rows="average" cannot say; the mask stays a tensor."""
    def fn(q, k, v, bias, keep_keys):
        n = q.shape[-2]
        idx = torch.arange(n)
        keep = (idx[None, :] <= idx[:, None]) & keep_keys[:, None, None, :]  # causal, as transformers builds it
        scores = q @ k.mT * 0.3 + bias
        return torch.softmax(torch.where(keep, scores, torch.finfo(scores.dtype).min), -1) @ v

    keep_keys = torch.tensor([[False, False, True, True, True], [True] * 5])
    bias = torch.tensor([0.0, 0.0, float("-inf"), 0.0, 0.0])  # query 2 sees keys 0-2: two padded, one -inf
    sites = assert_equivalent(fn, _r(2, 2, 5, 8), _r(2, 2, 5, 8), _r(2, 2, 5, 8), bias, keep_keys,
                              expected_sites=1, options=FAST)
    assert "bias beside structure" in sites[0].describe(), sites[0].describe()


def test_open_bugs_each_have_a_regression_test():
    source = open(__file__).read()
    for name in OPEN_BUGS:
        assert f"open bug {name}" in source, name
    with pytest.raises(ValueError, match="unknown names"):
        attention_programs(avoid=("no_such_bug",))


def test_fuzz_long_counts_the_programs_finished_before_an_interrupt(tmp_path, monkeypatch):
    """A time limit ends scripts/fuzz_long.py with SIGINT (bench/gpu_fuzz.sh): its summary must hold exactly the
    programs that finished, with the one interrupted left out."""
    import importlib.util
    import json

    import flashfuse.testing.programs as programs
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "fuzz_long.py")
    spec = importlib.util.spec_from_file_location("fuzz_long", path)
    fuzz_long = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz_long)
    calls = []

    def check_program(program, options=None):  # the fourth program is cut short
        calls.append(program)
        if len(calls) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(programs, "check_program", check_program)
    summary = tmp_path / "fuzz.json"
    assert fuzz_long.main(["--examples", "10", "--every", "2", "--log", str(tmp_path / "fuzz.log"),
                           "--summary", str(summary)]) == 0
    written = json.loads(summary.read_text())
    assert len(calls) == 4 and written["programs_run"] == written["programs_generated"] == 3
    assert "interrupted" in (tmp_path / "fuzz.log").read_text()


def test_fuzz_long_keeps_a_failure_whose_shrink_a_time_limit_stopped(tmp_path, monkeypatch):
    """Run 11 on a GPU lost a failure: the time limit came while Hypothesis was shrinking it, and only finished
    shrinks were recorded. Now the smallest failing program so far is a failure in the summary (`shrunk` false),
    and the log names the program as soon as it first fails."""
    import importlib.util
    import json

    import flashfuse.testing.programs as programs
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "fuzz_long.py")
    spec = importlib.util.spec_from_file_location("fuzz_long", path)
    fuzz_long = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz_long)
    calls = []

    def check_program(program, options=None):  # the third program fails; the time limit comes while shrinking
        calls.append(program)
        if len(calls) == 3:
            raise AssertionError("outcome: failed")
        if len(calls) > 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(programs, "check_program", check_program)
    summary = tmp_path / "fuzz.json"
    assert fuzz_long.main(["--examples", "10", "--log", str(tmp_path / "fuzz.log"), "--summary", str(summary)]) == 1
    written = json.loads(summary.read_text())
    assert written["programs_generated"] == 3 and len(written["failures"]) == 1
    failure = written["failures"][0]
    assert failure["shrunk"] is False and "outcome: failed" in failure["message"]
    assert failure["choices"] == json.loads(json.dumps(calls[2].choices, default=str))  # as the summary holds it
    assert "failing program, shrinking it" in (tmp_path / "fuzz.log").read_text()
    assert "runs stopped while shrinking" not in fuzz_long.merge([str(summary)])
