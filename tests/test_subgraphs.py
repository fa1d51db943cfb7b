"""Attention inside subgraphs that Dynamo hands the backend: activation checkpointing's body (non-reentrant
`torch.utils.checkpoint`, as transformers' `activation_checkpointing_enable` uses) is a GraphModule the pass
rewrites too. scripts/integration.py trains such a model for 20 steps (tests/test_integration.py)."""
import torch

import flashfuse
from flashfuse.kernels.op import CALLS
from flashfuse.testing import models
from flashfuse.tolerances import FORWARD, GRADIENT, gradients_error, relative_error


def _checkpointed(dropout=0.0):
    model = models.gpt2_lm(dropout=dropout)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    return model, dict(input_ids=ids, attention_mask=models.padding_mask(2, 16), labels=ids)


def test_attention_inside_activation_checkpointing_is_rewritten_and_equal():
    """The padded batch's mask is built outside the checkpointed blocks and passed in: the proofs read it in the
    calling graph, and the block takes the (B, 1, 1, N) key padding as a new input instead of the N x N mask."""
    model, inputs = _checkpointed()
    report = flashfuse.explain(model, **inputs)
    assert len(report.sites) == 2 and all(s.rewritten and s.node.startswith("wrap_body_") for s in report.sites)
    assert all(s.spec.causal and s.operands["mask_note"] == "key_padding" for s in report.sites)
    expected = model(**inputs).loss
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch._dynamo.reset()
    before = sum(CALLS.values())
    got = torch.compile(model, backend="flashfuse")(**inputs).loss
    grads = torch.autograd.grad(got, list(model.parameters()))
    assert sum(CALLS.values()) - before >= 4  # 2 layers, forward and the checkpoint's recomputation
    assert relative_error(got, expected) < FORWARD[torch.float32]
    assert gradients_error(grads, expected_grads) < GRADIENT[torch.float32]


def test_dropout_inside_activation_checkpointing_is_left_alone_with_the_reason():
    """A recomputed dropout must draw the mask the forward drew; not proven for the op's seed, so fail closed."""
    model, inputs = _checkpointed(dropout=0.1)
    report = flashfuse.explain(model, **inputs)
    assert report.sites and not any(s.rewritten for s in report.sites)
    assert all("dropout inside a subgraph" in s.reason for s in report.sites)
