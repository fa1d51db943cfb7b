"""Generation with a KV cache: prefill and every decode step (Nq = 1, growing Nk) go through the op."""
import pytest
import torch

from flashfuse.kernels.op import CALLS


def _model(family, attn):
    import transformers as T
    if family == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, attn_implementation=attn)
        return T.GPT2LMHeadModel(cfg)
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=101, attn_implementation=attn)
    return T.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_generation_matches_eager(family, attn):
    """The attention as written (attn "eager") or as SDPA calls (transformers' default), left-padded."""
    torch.manual_seed(0)
    model = _model(family, attn).eval()
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as batched generation does
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(**kwargs)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="flashfuse", options={"compiler": "eager"})
    before = sum(CALLS.values())
    assert torch.equal(model.generate(**kwargs), expected)
    assert sum(CALLS.values()) - before == 2 * 8  # two layers, one prefill and seven decode steps
