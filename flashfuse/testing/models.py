"""Unmodified models from transformers and timm, built from configs (random weights, nothing downloaded), shared
by the tests, the examples, the demo and the benchmarks: one registry.

    model, inputs = build("llama")                         # tiny, eager attention, a left-padded attention_mask
    model, inputs = build("gpt2-124M", batch=8, seq=1024)  # a full-size benchmark model
    out = first_output(model(**inputs))

`FAMILIES` holds the tiny models, `CORE` the families every change is checked on with gradients through
inductor (tests/test_models.py), `BENCH` the full-size models of bench/models.py. Hugging Face models use
attn_implementation="eager" unless `attn` says otherwise (bench/models.py compares "sdpa"); timm models
turn their fused attention off.
"""
import torch

VOCAB = 101

# family -> (transformers class prefix, config kwargs, inputs kind); kinds: see _inputs
_SMALL = dict(hidden_size=64, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB)
_HF = {
    "gpt2": ("GPT2", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64), "padded"),
    "bert": ("Bert", dict(num_hidden_layers=2, max_position_embeddings=64, **_SMALL), "padded"),
    "distilbert": ("DistilBert", dict(n_layers=2, dim=64, n_heads=4, hidden_dim=64, vocab_size=VOCAB,
                                      max_position_embeddings=64), "padded"),
    "llama": ("Llama", dict(num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64, **_SMALL),
              "padded"),
    "mistral": ("Mistral", dict(num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64,
                                sliding_window=5, **_SMALL), "padded"),
    "t5": ("T5", dict(num_layers=2, num_decoder_layers=2, d_model=64, d_kv=16, num_heads=4, d_ff=64,
                      vocab_size=VOCAB), "seq2seq"),
    "vit": ("ViT", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=64,
                        image_size=32, patch_size=8), "pixels"),
    "bart": ("Bart", dict(encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                          max_position_embeddings=64), "seq2seq"),
    "whisper": ("Whisper", dict(encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=4,
                                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB,
                                num_mel_bins=16, max_source_positions=16, max_target_positions=32, pad_token_id=0,
                                bos_token_id=1, eos_token_id=2, decoder_start_token_id=1), "audio"),
    "opt": ("OPT", dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, ffn_dim=64, vocab_size=VOCAB,
                        word_embed_proj_dim=64), "padded"),
    "gpt_neox": ("GPTNeoX", dict(num_hidden_layers=1, **_SMALL), "padded"),
    "gemma2_softcap": ("Gemma2", dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, **_SMALL), "padded"),
    "qwen2": ("Qwen2", dict(num_hidden_layers=1, num_key_value_heads=2, **_SMALL), "ids"),
    "phi": ("Phi", dict(num_hidden_layers=1, **_SMALL), "ids"),
    "gpt_oss_sinks": ("GptOss", dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=5,
                                     layer_types=["sliding_attention", "full_attention"], **_SMALL), "padded"),
    "bloom_alibi": ("Bloom", dict(n_layer=1, hidden_size=64, n_head=4, vocab_size=VOCAB), "padded"),
    "mpt": ("Mpt", dict(n_layers=1, d_model=64, n_heads=4, vocab_size=VOCAB), "ids"),
    "falcon": ("Falcon", dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=VOCAB), "ids"),
    "gptj": ("GPTJ", dict(n_layer=1, n_embd=64, n_head=4, rotary_dim=8, vocab_size=VOCAB), "ids"),
    "gpt_bigcode_mqa": ("GPTBigCode", dict(n_layer=1, n_embd=64, n_head=4, vocab_size=VOCAB, multi_query=True),
                        "ids"),
    "roberta": ("Roberta", dict(num_hidden_layers=1, **_SMALL), "padded"),
    "deberta_v2": ("DebertaV2", dict(num_hidden_layers=1, max_position_embeddings=64, relative_attention=True,
                                     pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16,
                                     **_SMALL), "padded"),
    "clip_text": ("CLIPText", dict(num_hidden_layers=1, **_SMALL), "ids"),
    # rotary embeddings through complex numbers (view_as_complex, view_as_real), an L2 norm of q and k, chunked masks
    "llama4_complex_rope": ("Llama4Text", dict(num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                                               num_local_experts=2, intermediate_size_mlp=64, **_SMALL), "padded"),
    # a global layer, then a local one: a bidirectional sliding window spelled abs(q - kv) <= 2
    "modernbert_local": ("ModernBert", dict(num_hidden_layers=2, local_attention=4, global_attn_every_n_layers=2,
                                            pad_token_id=0, **_SMALL), "padded"),
    # causal and local-band masks read from module buffers (their values are not in the graph), then the
    # additive attention_mask after the fill: the op's bias_last
    "gpt_neo_buffers": ("GPTNeo", dict(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=4,
                                       num_heads=4, hidden_size=64, intermediate_size=64, vocab_size=VOCAB,
                                       max_position_embeddings=64), "padded"),
    "siglip_vision": ("SiglipVision", dict(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                           intermediate_size=64, image_size=32, patch_size=8), "pixels"),
}
# family -> (timm model name, image size, create_model kwargs)
_TIMM = {
    "timm_vit": ("vit_tiny_patch16_224", 32, dict(patch_size=8, depth=2, embed_dim=64, num_heads=4)),
    "timm_swin": ("swin_tiny_patch4_window7_224", 56, dict(embed_dim=32, depths=(1, 1), num_heads=(2, 2))),
    "timm_deit": ("deit_tiny_patch16_224", 32, dict(patch_size=8, depth=1)),
    "timm_beit_relpos": ("beit_base_patch16_224", 32, dict(patch_size=8, depth=1, embed_dim=64, num_heads=4)),
}
FAMILIES = sorted([*_HF, *_TIMM])
#: softmaxes per forward that are not attention (a mixture-of-experts router in each layer)
ROUTERS = {"gpt_oss_sinks": 2}
#: checked with gradients through inductor on every change (tests/test_models.py); the rest in test_more_models.py
CORE = ["bert", "distilbert", "gpt2", "llama", "mistral", "t5", "timm_vit", "vit"]
#: full-size models: (transformers class prefix, config kwargs, batch, seq)
BENCH = {
    "gpt2-124M": ("GPT2", {}, 8, 1024),
    "llama-gqa-0.5B": ("Llama", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                     num_attention_heads=16, num_key_value_heads=4, vocab_size=32000), 4, 2048),
    "bert-base": ("Bert", {}, 16, 512),
    "gpt2-4L-256": ("GPT2", dict(n_layer=4, n_embd=256, n_head=4), 2, 512),  # the demo's CPU size
}


def padding_mask(batch, seq, row=0, pads=None, side="left"):
    """An attention_mask (batch, seq) of ones with `pads` (default seq // 3) positions of `row` zero: the first
    ones (side="left", as batched generation pads), or the last ones (side="right", as training batches pad)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    pads = seq // 3 if pads is None else pads
    if side == "left":
        mask[row, :pads] = 0
    else:
        mask[row, seq - pads:] = 0
    return mask


def _hf_model(prefix, config, attn, head=False):
    import transformers
    cfg = getattr(transformers, prefix + "Config")(**config, attn_implementation=attn)
    return getattr(transformers, prefix + ("LMHeadModel" if head and prefix == "GPT2" else "Model"))(cfg)


def _inputs(kind, cfg, batch, seq, generator, side="left"):
    ids = lambda n: torch.randint(0, cfg.vocab_size, (batch, n), generator=generator)  # noqa: E731
    if kind == "ids":
        return {"input_ids": ids(seq)}
    if kind == "padded":
        return {"input_ids": ids(seq), "attention_mask": padding_mask(batch, seq, side=side)}
    if kind == "seq2seq":
        return {"input_ids": ids(seq), "attention_mask": padding_mask(batch, seq), "decoder_input_ids": ids(seq - 3)}
    if kind == "audio":
        return {"input_features": torch.randn(batch, cfg.num_mel_bins, 2 * cfg.max_source_positions,
                                              generator=generator), "decoder_input_ids": ids(seq - 3)}
    size = cfg.image_size
    return {"pixel_values": torch.randn(batch, 3, size, size, generator=generator)}


def build(name, batch=None, seq=None, seed=0, device="cpu", dtype=None, attn="eager", padding=None):
    """(model in eval mode, inputs dict) of a tiny family (FAMILIES) or a benchmark model (BENCH), reproducibly.

    batch, seq: input sizes (default: 2 x 12 for tiny models, the BENCH sizes otherwise). padding: for text
    models, True or "left" adds a left-padded attention_mask, "right" a right-padded one, False drops it, None
    keeps the family's default.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if name in _TIMM:
        import timm
        timm_name, size, kwargs = _TIMM[name]
        model = timm.create_model(timm_name, pretrained=False, num_classes=10, img_size=size, **kwargs)
        for module in model.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False  # timm's eager path: q * scale, q @ k.transpose(-2, -1), softmax, @ v
        inputs = {"x": torch.randn(batch or 2, 3, size, size, generator=generator)}
    else:
        if name in BENCH:
            prefix, config, default_batch, default_seq = BENCH[name]
            kind = "padded" if padding else "ids"
        elif name in _HF:
            prefix, config, kind = _HF[name]
            default_batch, default_seq = 2, 12
        else:
            raise ValueError(f"unknown model {name!r}; the registry has {FAMILIES + sorted(BENCH)}")
        model = _hf_model(prefix, config, attn)
        if padding is not None and kind in ("ids", "padded"):
            kind = "padded" if padding else "ids"
        side = padding if padding in ("left", "right") else "left"
        inputs = _inputs(kind, model.config, batch or default_batch, seq or default_seq, generator, side)
    model = model.eval().to(device=device, dtype=dtype)
    return model, {k: v.to(device) for k, v in inputs.items()}


def gpt2_lm(seed=0, device="cpu", dropout=0.0, attn="eager", **sizes):
    """The tiny GPT-2 family with its language-model head (loss from `labels`), in train mode, for training loops.
    dropout sets every dropout probability (0: runs are comparable step by step)."""
    torch.manual_seed(seed)
    config = dict(_HF["gpt2"][1], resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return _hf_model("GPT2", {**config, **sizes}, attn, head=True).to(device).train()


def checkpointed(model):
    """Turn on transformers' activation checkpointing (non-reentrant torch.utils.checkpoint); returns the model in
    train mode. transformers 5.2x names it `activation_checkpointing_enable` (the old name warns there)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def first_output(out):
    """The main tensor of a model's output (last_hidden_state, logits or a plain tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0]


class Positional(torch.nn.Module):
    """model(**inputs) as a module that takes the inputs' values positionally and returns `first_output`: its
    parameters are the model's, so `assert_equivalent(Positional(model, inputs), *inputs.values())` compares the
    parameters' gradients too."""

    def __init__(self, model, inputs):
        super().__init__()
        self.model, self.names = model, list(inputs)

    def forward(self, *values):
        return first_output(self.model(**dict(zip(self.names, values))))
