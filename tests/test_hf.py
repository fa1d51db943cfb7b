"""flashfuse as transformers' attention implementation (`attn_implementation="fuse"`), without torch.compile:
greedy generation with a left-padded batch and a training step's gradients equal eager attention's.
FLASHFUSE_TEST_DEVICE=cuda runs them on a GPU (bench/gpu_tests.sh)."""
import os

import pytest
import torch

import flashfuse
from flashfuse.kernels.op import CALLS
from flashfuse.tolerances import GRADIENT, gradients_error

transformers = pytest.importorskip("transformers")
DEVICE = os.environ.get("FLASHFUSE_TEST_DEVICE", "cpu")
flashfuse.register_transformers()


def _pair(family):
    """The same tiny model twice: eager attention, and flashfuse's."""
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101)
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=101, sliding_window=5)
    else:
        cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=101)
    torch.manual_seed(0)
    build = transformers.AutoModelForCausalLM.from_config
    eager = build(cfg, attn_implementation="eager").to(DEVICE).eval()
    fused = build(cfg, attn_implementation="fuse").to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _attention_calls(monkeypatch):
    """The (causal, window, mask shape) of every call the "fuse" attention makes from now on."""
    from flashfuse import hf
    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs["causal"], kwargs["window"], tuple(kwargs["mask"].shape)))
        return flashfuse.attention(*args, **kwargs)
    monkeypatch.setattr(hf, "attention", spy)
    return calls


def _batch():
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as batched generation does
    return ids.to(DEVICE), mask.to(DEVICE)


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


@pytest.mark.parametrize("family, window", [("gpt2", None), ("llama", None), ("mistral", (4, -1))])
def test_padded_batch_runs_as_structure_plus_key_padding(family, window, monkeypatch):
    """The mask transformers builds for a padded batch reaches the kernels as causal (and window) flags and a
    (B, 1, 1, N) key mask; the outputs at real positions equal eager's."""
    eager, fused = _pair(family)
    ids, mask = _batch()
    calls = _attention_calls(monkeypatch)
    got = fused(input_ids=ids, attention_mask=mask).logits
    assert calls == [(True, window, (2, 1, 1, ids.shape[1]))] * 2
    want = eager(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


def test_a_mask_with_another_term_stays_whole():
    """A mask function beyond causal and padding: the whole mask is used, nothing is noted."""
    from transformers.masking_utils import and_masks, causal_mask_function

    from flashfuse import hf
    _, pad = _batch()
    full = hf.mask_interface(batch_size=2, q_length=7, kv_length=7, attention_mask=pad.cpu().bool(),
                             mask_function=and_masks(causal_mask_function, lambda b, h, q, kv: kv != 5))
    assert full.shape == (2, 1, 7, 7) and id(full) not in hf._STRUCTURE


def test_bidirectional_sliding_window_runs_as_a_two_sided_window(monkeypatch):
    """ModernBERT's local layers keep |q - kv| <= local_size: the window (w, w) and the key mask, not the N x N
    mask; its global layer is the key mask alone. The outputs at real positions equal eager's."""
    cfg = transformers.ModernBertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=101, local_attention=4,
                                        global_attn_every_n_layers=2, pad_token_id=0)
    torch.manual_seed(0)
    eager = transformers.ModernBertModel._from_config(cfg, attn_implementation="eager").to(DEVICE).eval()
    fused = transformers.ModernBertModel._from_config(cfg, attn_implementation="fuse").to(DEVICE).eval()
    fused.load_state_dict(eager.state_dict())
    ids, mask = _batch()
    calls = _attention_calls(monkeypatch)
    got = fused(input_ids=ids, attention_mask=mask).last_hidden_state
    keys = (2, 1, 1, ids.shape[1])
    assert calls == [(False, None, keys), (False, (2, 2), keys)]
    want = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)
