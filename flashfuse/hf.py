"""flashfuse as a Hugging Face transformers attention implementation: `attn_implementation="fuse"`.

    import flashfuse
    flashfuse.register_transformers()          # done by `import flashfuse` when transformers is already imported
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fuse")

The name is not "flashfuse" because transformers (5.x) takes every attn_implementation whose name contains
"flash" for a FlashAttention build (`utils.generic.is_flash_attention_requested`) and loads it as one.

No torch.compile needed: every attention layer calls `flashfuse.attention` with what transformers passes
(scaling, dropout, softcap, GQA heads, causal flag, padding mask). transformers builds the mask as for SDPA
(a bool mask, or none when causal alone says it); a query that sees no key (a left-padded position) gives 0,
as SDPA does, so nothing undefined reaches the next layer.
"""
import torch

from flashfuse.kernels.api import attention

NAME = "fuse"


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      softcap=None, position_bias=None, **kwargs):
    """transformers' attention interface. query (B, Hq, Nq, D), key / value (B, Hkv, Nk, D); returns the output
    as (B, Nq, Hq, Dv) and no attention weights."""
    nq, nk = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as SDPA: causal only without a mask and beyond one query; a causal prefill into a longer (empty) static
    # cache sees only its own keys
    causal = nq > 1 and attention_mask is None and bool(is_causal)
    if causal and nk > nq:
        key, value = key[:, :, :nq], value[:, :, :nq]
        position_bias = None if position_bias is None else position_bias[..., :nq]
    bias = mask = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask
    if position_bias is not None:
        bias = position_bias if bias is None else position_bias + bias
    out = attention(query, key, value, scale=scaling, bias=bias, mask=mask, causal=causal, softcap=softcap,
                    dropout_p=float(dropout), empty_rows="zero")
    return out.transpose(1, 2).contiguous(), None


def register():
    """Register "fuse" with transformers' AttentionInterface (and its mask interface, as SDPA's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
