"""More model families, tried as a new user would: every softmax rewritten, the output unchanged.

Tiny configs with eager attention; compiled without inductor to keep the run short (the
inductor path is covered by test_models.py).
"""
import pytest
import torch

from flashfuse.testing import assert_equivalent
from models import DEVICE
from test_models import CountSoftmax

V = 101


def _ids(n=10):
    return torch.randint(0, V, (2, n), generator=torch.Generator().manual_seed(0))


def _hf(name, config, **inputs):
    def make():
        import transformers
        cfg = getattr(transformers, name + "Config")(**config, attn_implementation="eager")
        return getattr(transformers, name + "Model")(cfg), inputs
    return make


def _timm(name, size, **kwargs):
    def make():
        import timm
        model = timm.create_model(name, pretrained=False, num_classes=10, img_size=size, **kwargs)
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        return model, {"x": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))}
    return make


PAD = torch.ones(2, 10, dtype=torch.long)
PAD[1, :3] = 0
SMALL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=64, vocab_size=V)
FAMILIES = {
    "bart": _hf("Bart", dict(encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=4,
                             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V,
                             max_position_embeddings=64), input_ids=_ids(), attention_mask=PAD,
                decoder_input_ids=_ids(7)),
    "whisper": _hf("Whisper", dict(encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=4,
                                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=V,
                                   num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
                   input_features=torch.randn(2, 16, 32), decoder_input_ids=_ids(7)),
    "opt": _hf("OPT", dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, ffn_dim=64, vocab_size=V,
                           word_embed_proj_dim=64), input_ids=_ids(), attention_mask=PAD),
    "gpt_neox": _hf("GPTNeoX", dict(num_hidden_layers=1, **SMALL), input_ids=_ids(), attention_mask=PAD),
    "gemma2_softcap": _hf("Gemma2", dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, **SMALL),
                          input_ids=_ids(), attention_mask=PAD),
    "qwen2": _hf("Qwen2", dict(num_hidden_layers=1, num_key_value_heads=2, **SMALL), input_ids=_ids()),
    "phi": _hf("Phi", dict(num_hidden_layers=1, **SMALL), input_ids=_ids()),
    "bloom_alibi": _hf("Bloom", dict(n_layer=1, hidden_size=64, n_head=4, vocab_size=V), input_ids=_ids(),
                       attention_mask=PAD),
    "mpt": _hf("Mpt", dict(n_layers=1, d_model=64, n_heads=4, vocab_size=V), input_ids=_ids()),
    "falcon": _hf("Falcon", dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=V),
                  input_ids=_ids()),
    "gptj": _hf("GPTJ", dict(n_layer=1, n_embd=64, n_head=4, rotary_dim=8, vocab_size=V), input_ids=_ids()),
    "gpt_bigcode_mqa": _hf("GPTBigCode", dict(n_layer=1, n_embd=64, n_head=4, vocab_size=V, multi_query=True),
                           input_ids=_ids()),
    "roberta": _hf("Roberta", dict(num_hidden_layers=1, **SMALL), input_ids=_ids(), attention_mask=PAD),
    "deberta_v2": _hf("DebertaV2", dict(num_hidden_layers=1, max_position_embeddings=64, relative_attention=True,
                                        pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16,
                                        **SMALL), input_ids=_ids(), attention_mask=PAD),
    "clip_text": _hf("CLIPText", dict(num_hidden_layers=1, **SMALL), input_ids=_ids()),
    "siglip_vision": _hf("SiglipVision", dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                              intermediate_size=64, image_size=32, patch_size=8),
                         pixel_values=torch.randn(2, 3, 32, 32)),
    "timm_swin": _timm("swin_tiny_patch4_window7_224", 56, embed_dim=32, depths=(1, 1), num_heads=(2, 2)),
    "timm_deit": _timm("deit_tiny_patch16_224", 32, patch_size=8, depth=1),
    "timm_beit_relpos": _timm("beit_base_patch16_224", 32, patch_size=8, depth=1, embed_dim=64, num_heads=4),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_is_rewritten_and_equivalent(family):
    torch.manual_seed(0)
    model, inputs = FAMILIES[family]()
    model, inputs = model.eval().to(DEVICE), {k: v.to(DEVICE) for k, v in inputs.items()}
    names, values = list(inputs), list(inputs.values())

    def call(*args):
        out = model(**dict(zip(names, args)))
        return out if isinstance(out, torch.Tensor) else out[0]
    with CountSoftmax() as counter:
        call(*values)
    assert_equivalent(call, *values, expected_sites=counter.calls, grad=False, options={"compiler": "eager"})
