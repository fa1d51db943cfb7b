"""Tiny unmodified models from public libraries, with inputs, shared by tests, examples and the demo.

Each builder returns (model, inputs: dict) with random weights and no downloads; Hugging Face
models use attn_implementation="eager" and a padding mask where the model takes one.
"""
import os

import torch

VOCAB = 101
#: where the model tests run: "cpu" (CI) or "cuda" (bench/gpu_tests.sh)
DEVICE = os.environ.get("FLASHFUSE_TEST_DEVICE", "cpu")


def _ids(batch, seq, generator):
    return torch.randint(0, VOCAB, (batch, seq), generator=generator)


def _padding(batch, seq):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 3] = 0  # left padding on the first sequence
    return mask


def gpt2(batch=2, seq=12, generator=None):
    from transformers import GPT2Config, GPT2Model
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, attn_implementation="eager")
    return GPT2Model(cfg), {"input_ids": _ids(batch, seq, generator), "attention_mask": _padding(batch, seq)}


def bert(batch=2, seq=12, generator=None):
    from transformers import BertConfig, BertModel
    cfg = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager")
    return BertModel(cfg), {"input_ids": _ids(batch, seq, generator), "attention_mask": _padding(batch, seq)}


def distilbert(batch=2, seq=12, generator=None):
    from transformers import DistilBertConfig, DistilBertModel
    cfg = DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                           max_position_embeddings=64, attn_implementation="eager")
    return DistilBertModel(cfg), {"input_ids": _ids(batch, seq, generator), "attention_mask": _padding(batch, seq)}


def llama(batch=2, seq=12, generator=None):
    from transformers import LlamaConfig, LlamaModel
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                      attn_implementation="eager")
    return LlamaModel(cfg), {"input_ids": _ids(batch, seq, generator), "attention_mask": _padding(batch, seq)}


def mistral(batch=2, seq=12, generator=None):
    from transformers import MistralConfig, MistralModel
    cfg = MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, sliding_window=5,
                        attn_implementation="eager")
    return MistralModel(cfg), {"input_ids": _ids(batch, seq, generator), "attention_mask": _padding(batch, seq)}


def t5(batch=2, seq=12, generator=None):
    from transformers import T5Config, T5Model
    cfg = T5Config(num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=64,
                   vocab_size=VOCAB, attn_implementation="eager")
    inputs = {"input_ids": _ids(batch, seq, generator), "attention_mask": _padding(batch, seq),
              "decoder_input_ids": _ids(batch, seq - 3, generator)}
    return T5Model(cfg), inputs


def vit(batch=2, generator=None, **_):
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=64,
                    image_size=32, patch_size=8, attn_implementation="eager")
    return ViTModel(cfg), {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}


def timm_vit(batch=2, generator=None, **_):
    import timm
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10, embed_dim=64, num_heads=4)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model, {"x": torch.randn(batch, 3, 32, 32, generator=generator)}


FAMILIES = {"gpt2": gpt2, "bert": bert, "distilbert": distilbert, "llama": llama, "mistral": mistral, "t5": t5,
            "vit": vit, "timm_vit": timm_vit}


def build(name, seed=0, **kwargs):
    """(model in eval mode, inputs) for a family, reproducibly."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model, inputs = FAMILIES[name](generator=generator, **kwargs)
    return model.eval().to(DEVICE), {k: v.to(DEVICE) for k, v in inputs.items()}


def first_output(out):
    """The main tensor of a model's output (last_hidden_state, logits or a plain tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]
