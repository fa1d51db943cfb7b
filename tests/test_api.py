"""The public surface: flashfuse.attention's checks, the backend's options, explain, and failing closed."""
import logging

import pytest
import torch

import flashfuse
from flashfuse import backend, passes
from flashfuse.kernels.reference import oracle
from flashfuse.kernels.spec import AttentionSpec
from flashfuse.testing import assert_equivalent, compile_and_report
from flashfuse.tolerances import FORWARD, GRADIENT, relative_error


def qkv(b=2, h=4, hkv=4, nq=9, nk=11, d=16, dv=16, dtype=torch.float32):
    return (torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, hkv, nk, d, dtype=dtype),
            torch.randn(b, hkv, nk, dv, dtype=dtype))


def test_attention_matches_the_oracle_with_every_feature():
    q, k, v = (t.requires_grad_() for t in qkv(hkv=2, nq=7, dv=24))
    bias = torch.randn(1, 4, 1, 11, requires_grad=True)
    keep = torch.rand(2, 1, 7, 11) > 0.2
    keep[..., -1] = True  # every query sees at least its last key
    kwargs = dict(scale=0.3, causal=True, window=(6, -1), softcap=5.0)
    out = flashfuse.attention(q, k, v, bias=bias, mask=keep, **kwargs)
    ref, _ = oracle(q, k, v, AttentionSpec(scale=0.3, causal=True, window=(6, -1), softcap=5.0), bias, keep)
    assert relative_error(out, ref) < FORWARD[torch.float32]
    cot = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v, bias), cot), torch.autograd.grad(ref, (q, k, v, bias), cot)):
        assert relative_error(a, e) < GRADIENT[torch.float32]


@pytest.mark.parametrize("change, argument", [
    (lambda q, k, v: (q[0], k, v), "q must be 4-D"),
    (lambda q, k, v: (q, k.double(), v), "share one dtype"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), "multiple of k's head count"),
    (lambda q, k, v: (q, k[..., :8], v), "head dim"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "v must have shape"),
    (lambda q, k, v: (q, k[:1], v[:1]), "k has batch"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "floating"),
])
def test_inconsistent_tensors_are_refused(change, argument):
    with pytest.raises(ValueError, match=argument):
        flashfuse.attention(*change(*qkv()))


@pytest.mark.parametrize("kwargs, argument", [
    ({"bias": torch.randn(2, 4, 9, 5)}, "bias of shape"),
    ({"bias": torch.ones(9, 11, dtype=torch.bool)}, "bias must be a floating"),
    ({"mask": torch.ones(3, 1, 1, 11, dtype=torch.bool)}, "mask of shape"),
    ({"mask": torch.ones(1, 11)}, "mask must be a bool"),
    ({"window": (3,)}, "window"),
    ({"window": (-2, 0)}, "window"),
    ({"softcap": -1.0}, "softcap must be positive"),
    ({"dropout_p": 1.0}, "dropout_p"),
    ({"scale": float("nan")}, "scale"),
    ({"causal": 1}, "causal"),
])
def test_bad_arguments_name_themselves(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        flashfuse.attention(*qkv(), **kwargs)


@pytest.mark.parametrize("b,h,nq,nk", [(0, 2, 5, 7), (2, 0, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0), (2, 2, 1, 0)])
def test_nothing_to_compute_gives_eager_results(b, h, nq, nk):
    """No batch, no heads (q's and k's alike), no queries or no keys: the public op answers as eager does (its
    shapes, zeros, zero gradients) instead of raising."""
    q = torch.randn(b, h, nq, 16, requires_grad=True)
    k, v = torch.randn(b, h, nk, 16, requires_grad=True), torch.randn(b, h, nk, 8, requires_grad=True)
    out = flashfuse.attention(q, k, v, causal=nq == nk)
    eager = torch.softmax(q @ k.mT * 0.25, -1).nan_to_num() @ v  # eager's own answer where nk == 0 is 0
    assert out.shape == eager.shape and not out.any()
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, (q, k, v)))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="compiler"):
        backend.split_options({"compiler": "tvm"})
    ours, rest = backend.split_options({"compiler": "eager", "max_autotune": True})
    assert ours["compiler"] == "eager" and rest == {"max_autotune": True}


def test_rewrite_can_be_switched_off():
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v  # noqa: E731
    assert_equivalent(fn, *qkv(), expected_sites=0, options={"compiler": "eager", "rewrite": False})


def test_an_internal_error_leaves_the_site_and_warns(monkeypatch, caplog):
    def broken(graph, plan):
        raise RuntimeError("boom")
    monkeypatch.setattr(passes.rewrite, "apply", broken)
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v  # noqa: E731
    q, k, v = qkv()
    compiled, sites = compile_and_report(fn, {"compiler": "eager"})
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        assert relative_error(compiled(q, k, v), fn(q, k, v)) < FORWARD[torch.float32]
    assert not sites[0].rewritten and "boom" in sites[0].reason and "boom" in caplog.text
    with pytest.raises(AssertionError, match="internal error"):  # assert_equivalent calls it a flashfuse bug
        assert_equivalent(fn, q, k, v, expected_sites=0, options={"compiler": "eager"})


def test_an_error_outside_any_site_restores_the_graph(monkeypatch, caplog):
    def broken(graph):
        raise RuntimeError("bad graph")
    monkeypatch.setattr(passes, "functionalize_inplace", broken)
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v  # noqa: E731
    q, k, v = qkv()
    compiled, sites = compile_and_report(fn, {"compiler": "eager"})
    with caplog.at_level(logging.WARNING, logger="flashfuse"):
        assert relative_error(compiled(q, k, v), fn(q, k, v)) < FORWARD[torch.float32]
    assert "bad graph" in caplog.text and not any(s.rewritten for s in sites)


def test_explain_reports_every_site_with_reasons():
    def two_sites(q, k, v):
        w = torch.softmax(q @ k.mT * 0.25, -1)
        return torch.softmax(q @ k.mT, -1) @ v, w
    report = flashfuse.explain(two_sites, *qkv())
    assert [s.rewritten for s in report.sites] == [False, True]
    assert "returned" in report.sites[0].reason
    assert report.sites[1].spec == AttentionSpec(scale=1.0) and report.sites[1].describe() == "scale=1.0"
    text = str(report)
    assert "1 of 2 attention sites rewritten" in text and "returned" in text


def test_explain_names_a_path_that_is_not_the_kernels():
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.05, -1) @ v  # noqa: E731
    q = torch.randn(1, 2, 9, 512)
    report = flashfuse.explain(fn, q, q, q)
    assert report.sites[0].rewritten and report.sites[0].path[0] == "cpu"
    assert "head dim 512" in str(report)


def test_half_precision_training_keeps_the_rounding_residual(monkeypatch):
    """spec.fp32_delta is on exactly where a backward will read it: a bf16 site whose output needs a gradient, in a
    compiled graph and through `flashfuse.attention`; not under no_grad, not in fp32."""
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v  # noqa: E731
    q, k, v = qkv()
    bf16 = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    assert flashfuse.explain(fn, *bf16).sites[0].spec.fp32_delta
    with torch.no_grad():
        assert not flashfuse.explain(fn, *bf16).sites[0].spec.fp32_delta
    assert not flashfuse.explain(fn, *(t.requires_grad_() for t in (q, k, v))).sites[0].spec.fp32_delta
    from flashfuse.kernels import op
    seen, original = [], op.run_forward
    monkeypatch.setattr(op, "run_forward", lambda *args: seen.append(args[-1].fp32_delta) or original(*args))
    flashfuse.attention(*bf16).float().sum().backward()
    with torch.no_grad():
        flashfuse.attention(*bf16)
    assert seen == [True, False] and all(t.grad is not None for t in bf16)


def test_explain_lists_the_graph_breaks_of_its_run():
    def broken(q, k, v):
        s = q @ k.mT * 0.25
        torch._dynamo.graph_break()
        return torch.softmax(s, -1) @ v
    report = flashfuse.explain(broken, *qkv())
    assert sum(report.graph_breaks.values()) == 1 and "graph breaks in this run: 1" in str(report)
    assert not flashfuse.explain(lambda q, k, v: torch.softmax(q @ k.mT, -1) @ v, *qkv()).graph_breaks


def test_backend_is_registered_by_name():
    from torch._dynamo import list_backends
    assert "flashfuse" in list_backends(exclude_tags=())


def test_dynamic_shapes():
    fn = lambda q, k, v, b: torch.softmax(q @ k.mT * 0.25 + b, -1) @ v  # noqa: E731
    compiled = torch.compile(fn, backend="flashfuse", dynamic=True, options={"compiler": "eager"})
    from flashfuse.kernels.op import CALLS
    for n in (9, 14):
        q, k, v = qkv(nq=n, nk=n)
        b = torch.randn(2, 1, 1, n)
        before = sum(CALLS.values())
        assert relative_error(compiled(q, k, v, b), fn(q, k, v, b)) < FORWARD[torch.float32]
        assert sum(CALLS.values()) == before + 1


def test_mode_and_inductor_options_are_forwarded(monkeypatch):
    seen = []
    import torch._inductor.compile_fx as compile_fx_module
    real = compile_fx_module.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        seen.append(config_patches)
        return real(gm, example_inputs, config_patches=config_patches, **kwargs)
    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v  # noqa: E731
    q, k, v = qkv()
    torch._dynamo.reset()
    out = torch.compile(fn, backend="flashfuse", mode="max-autotune-no-cudagraphs")(q, k, v)
    torch._dynamo.reset()
    torch.compile(fn, backend="flashfuse", options={"epilogue_fusion": False})(q, k, v)
    patches = [p for p in seen if p]  # compile_fx calls itself again once the patches are applied
    assert patches[0]["max_autotune"] is True and patches[1] == {"epilogue_fusion": False}
    assert relative_error(out, fn(q, k, v)) < FORWARD[torch.float32]
