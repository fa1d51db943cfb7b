"""How flashfuse's checks judge a difference from eager: "upstream" when stock torch.compile shows it too
(docs/known-upstream-issues.md), "float64" when the compiled program is as close to a float64 run as eager is,
"failed" otherwise.

Each upstream entry has a strict xfail that asserts the stock result is right: it fails (XPASS) the day torch
fixes the bug, so the entry and its test can go.
"""
import pytest
import torch

from flashfuse.testing import check_equivalence
from flashfuse.tolerances import FORWARD, relative_error

INDUCTOR = {"compiler": "inductor"}


def softmax_over_queries(q, k, v):
    return torch.softmax(q @ k.mT * 0.25, dim=-2) @ v


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, 9, 16, generator=gen) for _ in range(3))


def _stock_error(fn, inputs):
    torch._dynamo.reset()
    return relative_error(torch.compile(fn, backend="inductor")(*inputs), fn(*inputs))


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="upstream entry 1: stock inductor (torch 2.14.1, CPU) computes "
                          "softmax(scores, dim=-2) @ v wrong (relative error 0.42)")
def test_stock_inductor_softmax_over_queries():
    assert _stock_error(softmax_over_queries, _inputs()) < FORWARD[torch.float32]


def test_softmax_over_queries_is_reported_as_upstream():
    """flashfuse leaves the near miss alone; the compiled result is stock inductor's, wrong or right, and the
    verdict names whose it is."""
    inputs = _inputs()
    verdict = check_equivalence(softmax_over_queries, *inputs, expected_sites=0, grad=False, options=INDUCTOR)
    stock_wrong = _stock_error(softmax_over_queries, inputs) >= FORWARD[torch.float32]
    assert verdict.outcome == ("upstream" if stock_wrong else "equal"), str(verdict)
    if stock_wrong:
        assert "stock torch.compile" in verdict.evidence[0]


def softcap_manual_softmax_nan_when_compiled(q, k, v):
    """The issue's first program (bf16, softcap 20 * tanh(s / 20), a manual softmax through amax / exp / sum, one
    query over three keys: no softmax op, so not a site), whose reported NaN gradients from stock inductor no
    longer reproduce on torch 2.14.1 (docs/known-upstream-issues.md). The fault stands in here as a term that only
    compiled code adds: sqrt(q - q) is 0 forward and NaN backward, under flashfuse and stock torch.compile alike."""
    if torch.compiler.is_compiling():
        q = q + torch.sqrt(q - q)
    s = 20 * torch.tanh(q @ k.mT * 0.35 / 20)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)) @ v


def test_nan_gradients_that_stock_compile_shows_too_are_upstream():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen).bfloat16().requires_grad_() for n in (1, 3, 3))
    verdict = check_equivalence(softcap_manual_softmax_nan_when_compiled, q, k, v, expected_sites=0,
                                options=INDUCTOR)  # a near miss flashfuse leaves alone, as in the issue
    assert verdict.outcome == "upstream", str(verdict)
    assert "stock torch.compile" in verdict.evidence[0] and "inf" in verdict.evidence[0], str(verdict)


#: Drawn by attention_programs (a derandomized draw of 60): bf16, a learned scalar bias parameter (its exact
#: gradient is 0), the scale split over q and k, softcap 5, padding + causal masks, one query over 9 keys.
#: Its gradients miss eager's by more than bf16's tolerance, yet are as close to float64 as eager's.
LEARNED_BIAS = {
    "kind": "attention", "dtype": "bfloat16", "layout": "proj3d", "B": 2, "H": 3, "D": 8, "DV": 16, "NQ": 1,
    "cross": True, "NK": 9, "sizes": "constants", "linear_bias": True, "heads_split": "unflatten_transpose",
    "flatten_heads": "contiguous_view", "gqa": "none", "product": "matmul", "kT": "transpose_m1m2",
    "scale": "both_quarter", "bias": "param", "bias_shape": "1", "softcap": "method", "softcap_value": 5.0,
    "bias_add": "add_method", "masks": "padding+causal", "padding_source": "long_input",
    "causal_source": "inline_triu", "pad_side": "left", "pads": (6, 7), "combine": "combined",
    "fill_form0": "masked_fill_", "negation": "eq0", "fill": "-inf", "inf_spelling": "float",
    "order": "bias_first", "softmax": "torch", "dropout": "functional_training", "value_product": "matmul",
    "output": "merge", "o_proj": False, "seed": 165}


def test_closer_to_float64_than_eager_passes_with_the_evidence():
    from flashfuse.testing.programs import build_program
    program = build_program(LEARNED_BIAS)
    verdict = check_equivalence(program.module, *program.inputs, expected_sites=1, options=INDUCTOR,
                                source=program.source, seed=165)
    assert verdict.outcome == "float64", str(verdict)
    assert verdict.problems and "float64" in verdict.evidence[0]


def test_a_wrong_answer_fails_against_eager_and_float64(monkeypatch):
    """A kernel that is 10% off: neither stock torch.compile nor the float64 run excuses it."""
    from flashfuse.kernels import cpu, flash
    for module in (cpu, flash):
        real = module.forward
        monkeypatch.setattr(module, "forward",
                            lambda *args, real=real, **kw: (lambda o, s: (o * 1.1, s))(*real(*args, **kw)))
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v  # noqa: E731
    verdict = check_equivalence(fn, *_inputs(), expected_sites=1, grad=False, options={"compiler": "eager"})
    assert verdict.outcome == "failed" and "from float64" in verdict.evidence[0], str(verdict)


class _SoftmaxInFloat32(torch.nn.Module):
    """Finding #17 (docs/fuzzing.md): bf16, a learned scalar bias, a band mask filled with finfo.min that hides
    rows 7 and up whole, and a softmax in float32. In float64 the cast turns finfo.min into -inf: NaN rows."""
    def __init__(self):
        super().__init__()
        self.rel_bias = torch.nn.Parameter(torch.randn(1) * 0.5)

    def forward(self, q, k, v):
        scores = q @ k.transpose(2, 3) * 0.25
        near = (torch.arange(8)[:, None] - torch.arange(5)[None, :]).abs() <= 2
        scores = scores + self.rel_bias
        scores = torch.where(near, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype))
        return torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype) @ v


def test_a_program_whose_float64_run_breaks_is_judged_against_float32():
    from flashfuse.testing.equivalence import _leaves, _oracle, _run
    torch.manual_seed(0)
    fn = _SoftmaxInFloat32().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(s, generator=gen).to(torch.bfloat16).requires_grad_() for s in ((1, 3, 8, 16),
                                                                                     (1, 3, 5, 16), (1, 3, 5, 16))]
    eager = _run(fn, inputs, _leaves(fn, inputs), 0, True)
    run, name, why = _oracle(fn, inputs, 0, True, torch.bfloat16, eager)
    assert name == "float32" and why == ["the float64 run has NaN where eager has none"], why
    verdict = check_equivalence(fn, *inputs, expected_sites=1, options={"compiler": "eager"})
    assert verdict.outcome in ("equal", "float64"), str(verdict)
