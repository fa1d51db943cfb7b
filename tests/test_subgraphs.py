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
    report = flashfuse.explain(model, **inputs)
    assert len(report.sites) == 2 and all(s.rewritten and s.node.startswith("wrap_body_") for s in report.sites)
    assert all(s.spec.causal and s.spec.window == window and s.operands["mask_note"] == "key_padding"
               for s in report.sites)
    assert _assert_equal_to_eager(model, inputs) >= 4  # 2 layers, forward and the checkpoint's recomputation


def test_checkpointed_decoder_without_a_mask_is_causal():
    """Whisper's decoder under checkpointing (use_cache off): its mask comes from position ids repeated per row,
    proven causal; the encoder and cross attention have no mask. All equal to eager."""
    model, inputs = models.build("whisper", seq=16)
    model = _checkpoint(model)
    sites = flashfuse.explain(model, **inputs).sites
    assert len(sites) == 3 and all(s.rewritten and not s.operands.get("mask") for s in sites)
    assert sum(s.spec.causal for s in sites) == 1
    _assert_equal_to_eager(model, inputs)


def test_dropout_inside_activation_checkpointing_is_left_alone_with_the_reason():
    """A recomputed dropout must draw the mask the forward drew; not proven for the op's seed, so fail closed."""
    model = _checkpoint(models.gpt2_lm(dropout=0.1), dropout=True)
    ids = torch.randint(0, models.VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    report = flashfuse.explain(model, input_ids=ids, attention_mask=models.padding_mask(2, 16))
    assert report.sites and not any(s.rewritten for s in report.sites)
    assert all("dropout inside a subgraph" in s.reason for s in report.sites)
