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

Padded batches at causal speed: when the mask transformers built is exactly causal (or a sliding window, one- or
two-sided, or nothing) and-ed with the padding, aligned as the op aligns causal masks, `mask_interface` notes
that, and each layer runs with the op's causal / window flags and the (B, 1, 1, Nk) padding alone; blocks past
the diagonal are skipped and no N x N mask is read. Any other mask (or a view of it) is used as it is.
"""
import weakref

import torch

from flashfuse.kernels.api import attention
from flashfuse.kernels.reference import visible
from flashfuse.kernels.spec import AttentionSpec

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
    window = None
    structure = _STRUCTURE.get(id(attention_mask))
    if structure is not None and structure[0]() is attention_mask and structure[3].shape[-1] == nk:
        _, causal, window, mask = structure
    elif attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            mask = attention_mask
        else:
            bias = attention_mask
    if position_bias is not None:
        bias = position_bias if bias is None else position_bias + bias
    out = attention(query, key, value, scale=scaling, bias=bias, mask=mask, causal=causal, window=window,
                    softcap=softcap, dropout_p=float(dropout), empty_rows="zero")
    return out.transpose(1, 2).contiguous(), None


#: id(mask) -> (weakref to the mask, causal, window, (B, 1, 1, Nk) padding) for masks `mask` proved structured
_STRUCTURE = {}


def mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, local_size=None,
                   **kwargs):
    """transformers' mask interface for "fuse": SDPA's bool mask (or None), and when it is structure and padding,
    that structure noted for `attention_forward` (checked element by element; any doubt keeps the mask)."""
    from transformers.masking_utils import prepare_padding_mask, sdpa_mask
    full = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size, **kwargs)
    if full is None or attention_mask is None or torch.compiler.is_compiling() or full.dim() != 4:
        return full
    offset = int(q_offset) - int(kv_offset)  # HF's query i sits at key position i + offset
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if offset != kv_length - q_length or padding is None or padding.dim() != 2:
        return full  # not aligned at the bottom right (a static cache's empty tail): not the op's causal
    keys = padding[:, kv_offset:kv_offset + kv_length].bool()[:, None, None, :]  # (B, 1, 1, Nk)
    candidates = [(False, None), (True, None)]
    if local_size is not None:  # HF's window keeps kv > q - local_size: local_size - 1 keys left of the diagonal;
        # its bidirectional one (ModernBERT) keeps |q - kv| <= local_size
        candidates += [(True, (int(local_size) - 1, -1)), (False, (int(local_size), int(local_size)))]
    for causal, window in candidates:
        spec = AttentionSpec(causal=causal, window=window or (-1, -1))
        structure = visible(q_length, kv_length, spec, full.device)  # the op's rule; None: every key
        expected = keys if structure is None else structure & keys
        if torch.equal(full, expected.expand_as(full)):
            _note(full, causal, window, keys)
            break
    return full


def _note(full, causal, window, keys):
    key = id(full)
    _STRUCTURE[key] = (weakref.ref(full, lambda _: _STRUCTURE.pop(key, None)), causal, window, keys)


def register():
    """Register "fuse" with transformers' AttentionInterface and its mask interface (`mask_interface`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_interface)
