"""flashfuse as transformers' attention implementation (`attn_implementation="fuse"`), without torch.compile:
greedy generation with a left-padded batch and a training step's gradients equal eager attention's."""
import pytest
import torch

import flashfuse
from flashfuse.kernels.op import CALLS
from flashfuse.tolerances import GRADIENT, gradients_error

transformers = pytest.importorskip("transformers")
flashfuse.register_transformers()


def _pair(family):
    """The same tiny model twice: eager attention, and flashfuse's."""
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=101)
    torch.manual_seed(0)
    build = transformers.AutoModelForCausalLM.from_config
    eager = build(cfg, attn_implementation="eager").eval()
    fused = build(cfg, attn_implementation="fuse").eval()
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _batch():
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as batched generation does
    return ids, mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_with_left_padding_matches_eager(family):
    eager, fused = _pair(family)
    ids, mask = _batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = sum(CALLS.values())
    assert torch.equal(fused.generate(**kwargs), eager.generate(**kwargs))
    assert sum(CALLS.values()) > before  # the layers ran flashfuse's op


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_step_gradients_match_eager(family):
    """Loss over the real (unpadded) positions: padded queries see no key, where eager averages every value and
    flashfuse gives 0 (as SDPA does); neither reaches a real position."""
    eager, fused = _pair(family)
    ids, mask = _batch()
    grads = []
    for model in (eager, fused):
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = (logits.float().logsumexp(-1) * mask).sum()
        grads.append(torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True))
    assert gradients_error(grads[1], grads[0]) < GRADIENT[torch.float32]
