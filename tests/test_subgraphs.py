"""Attention inside subgraphs that Dynamo hands the backend: activation checkpointing's body (non-reentrant
`torch.utils.checkpoint`, as transformers' `activation_checkpointing_enable` uses) is a GraphModule the pass
rewrites too. scripts/integration.py trains such a model for 20 steps (tests/test_integration.py)."""
import pytest
import torch

import flashfuse
from flashfuse.kernels.op import CALLS
from flashfuse.testing import models
from flashfuse.tolerances import FORWARD, GRADIENT, gradients_error, relative_error


def _checkpoint(model, dropout=False):
    """Activation checkpointing on, train mode; dropout off unless asked (so the compiled run compares with eager)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and not dropout:
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):  # functional dropout rates
            if isinstance(getattr(module, name, None), float) and not dropout:
                setattr(module, name, 0.0)
    return models.checkpointed(model)


# transformers 5.25 wraps Llama's and Mistral's attention forward in the `kernels` package's `use_kernelized_func`,
# which sets a global on every call. Dynamo runs a checkpointed block with such a side effect eagerly, unless told not
# to replay it in the recomputation: this is the setting a user turns on (docs/known-upstream-issues.md, entry U1).
NO_REPLAY = ({"skip_fwd_side_effects_in_bwd_under_checkpoint": True}
             if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint") else {})


def _hub_kernel_wrapped(model):
    """Whether the model's attention modules carry the `kernels` wrapper (its forward is `new_forward`)."""
    return any(type(m).__name__.endswith("Attention") and type(m).forward.__code__.co_name == "new_forward"
               for m in model.modules())


def _assert_equal_to_eager(model, inputs):
    """The compiled model's output and parameter gradients against eager's; returns how often the op ran."""
    params = [p for p in model.parameters() if p.requires_grad]
    expected = models.first_output(model(**inputs))
    cotangent = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    expected_grads = torch.autograd.grad(expected, params, cotangent, allow_unused=True)
    torch._dynamo.reset()
    before = sum(CALLS.values())
    got = models.first_output(torch.compile(model, backend="flashfuse")(**inputs))
    grads = torch.autograd.grad(got, params, cotangent, allow_unused=True)
    assert relative_error(got, expected) < FORWARD[torch.float32]
    assert gradients_error(grads, expected_grads) < GRADIENT[torch.float32]
    return sum(CALLS.values()) - before


@pytest.mark.parametrize("family, window", [("gpt2", (-1, -1)), ("llama", (-1, -1)), ("mistral", (4, -1))])
def test_attention_inside_activation_checkpointing_is_rewritten_and_equal(family, window):
    """The padded batch's mask is built outside the checkpointed blocks and passed in: the proofs read it in the
    calling graph, and the block takes the (B, 1, 1, N) key padding as a new input instead of the N x N mask."""
    model, inputs = models.build(family, seq=16)
    model = _checkpoint(model)
    with torch._dynamo.config.patch(**NO_REPLAY):
        report = flashfuse.explain(model, **inputs)
        assert len(report.sites) == 2 and all(s.rewritten and s.node.startswith("wrap_body_") for s in report.sites)
        assert all(s.spec.causal and s.spec.window == window and s.operands["mask_note"] == "key_padding"
                   for s in report.sites)
        assert _assert_equal_to_eager(model, inputs) >= 4  # 2 layers, forward and the checkpoint's recomputation


def test_explain_names_the_graph_break_that_hides_checkpointed_attention():
    """Without the setting, a wrapped model's checkpointed blocks run eagerly: no site, and the report says why."""
    model, inputs = models.build("llama", seq=16)
    model = _checkpoint(model)
    if not _hub_kernel_wrapped(model):
        pytest.skip("this transformers does not wrap attention in the kernels package's use_kernelized_func")
    report = flashfuse.explain(model, **inputs)
    assert not report.sites and "HOP: Unsafe side effect" in str(report)
    assert "skip_fwd_side_effects_in_bwd_under_checkpoint" in str(report)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="upstream entry U1: Dynamo runs a checkpointed block eagerly when its "
                          "forward sets a global (transformers 5.25's hub-kernel wrapper)")
def test_stock_dynamo_traces_checkpointed_blocks_of_a_wrapped_model():
    model, inputs = models.build("llama", seq=16)
    model = _checkpoint(model)
    if not _hub_kernel_wrapped(model):
        pytest.xfail("nothing to test: this transformers does not wrap attention")
    torch._dynamo.reset()
    bodies = []

    def backend(gm, example_inputs):
        bodies.extend(n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith("wrap_body"))
        return gm.forward
    torch.compile(model, backend=backend)(**inputs)
    assert len(bodies) == 2


def test_checkpointed_decoder_without_a_mask_is_causal():
    """Whisper's decoder under checkpointing (use_cache off): its mask comes from position ids repeated per row,
    proven causal; the encoder and cross attention have no mask. All equal to eager."""
    model, inputs = models.build("whisper", seq=16)
    model = _checkpoint(model)
    sites = flashfuse.explain(model, **inputs).sites
    assert len(sites) == 3 and all(s.rewritten and not s.operands.get("mask") for s in sites)
    assert sum(s.spec.causal for s in sites) == 1
    _assert_equal_to_eager(model, inputs)


def _rewritten_graphs(model, **inputs):
    """The top-level graphs Dynamo hands the backend, after the pass (each with its subgraphs)."""
    graphs = []

    def backend(gm, example_inputs):
        flashfuse.passes.rewrite_graph(gm)
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(**inputs)
    return graphs


def test_dropout_inside_activation_checkpointing_takes_its_seed_from_the_caller():
    """A checkpointed block runs again for the backward, and the rerun must drop what the forward dropped: the
    block's op reads its dropout seed from a new input, drawn once in the calling graph."""
    model = _checkpoint(models.gpt2_lm(attn_pdrop=0.1), dropout=True)
    ids = torch.randint(0, models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    report = flashfuse.explain(model, input_ids=ids, attention_mask=models.padding_mask(2, 16))
    assert len(report.sites) == 2 and all(s.rewritten and s.spec.dropout_p == 0.1 for s in report.sites)
    (top,) = [g for g in _rewritten_graphs(model, input_ids=ids) if flashfuse.passes._subgraphs(g)]
    drawn = [n for n in top.graph.nodes if n.target is flashfuse.kernels.op.new_seed]
    assert len(drawn) == 2 and all(len(n.users) == 1 and next(iter(n.users)).args[0].op == "get_attr"
                                   for n in drawn)  # each passed to a checkpoint call
    for name, sub, _ in flashfuse.passes._subgraphs(top):
        fused = [n for n in sub.graph.nodes if n.target is torch.ops.flashfuse.fwd.default]
        assert len(fused) == 1 and fused[0].args[5].op == "placeholder", name  # the seed: an input of the block
        assert not any(n.target is flashfuse.kernels.op.new_seed for n in sub.graph.nodes)


def test_dropout_inside_activation_checkpointing_trains_one_function():
    """float64, dropout 0.5 on the attention weights only, under a fixed torch seed: the checkpointed model's
    gradients are the derivative of the loss its forward computes (a central difference along a random direction
    agrees to 1e-6), and equal the same model's without checkpointing (the seeds are drawn in the same order).
    Without a padding mask: a fully padded row's finite fill swallows its scores in the forward but not in autograd,
    so a central difference would not see their gradient."""
    ids = torch.randint(0, models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    cotangent = torch.randn(2, 16, models.VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def loss_and_grads(checkpoint):
        model = models.gpt2_lm(attn_pdrop=0.5).double()
        model = models.checkpointed(model) if checkpoint else model
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="flashfuse")
        params = [p for p in model.parameters() if p.requires_grad]

        def loss(seed=0):
            torch.manual_seed(seed)  # the same dropout seeds on every call
            return (compiled(input_ids=ids).logits * cotangent).sum()
        value = loss()
        return loss, params, value, torch.autograd.grad(value, params)

    loss, params, value, grads = loss_and_grads(checkpoint=True)
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
                 for i, p in enumerate(params)]
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d, alpha=eps)
        plus = loss()
        for p, d in zip(params, direction):
            p.add_(d, alpha=-2 * eps)
        minus = loss()
        for p, d in zip(params, direction):
            p.add_(d, alpha=eps)
    slope = sum((g * d).sum() for g, d in zip(grads, direction))
    assert abs((plus - minus) / (2 * eps) - slope) < 1e-6 * abs(slope)
    _, _, plain_value, plain_grads = loss_and_grads(checkpoint=False)
    assert relative_error(value, plain_value) < 1e-12 and gradients_error(grads, plain_grads) < 1e-10
    assert relative_error(loss(seed=1), value) > 1e-3  # dropout is on: other seeds, other masks
