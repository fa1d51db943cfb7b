"""Llama with grouped-query attention (8 query heads, 2 KV heads) from its config, compiled with flashfuse."""
import torch
from common import device, run
from transformers import LlamaConfig, LlamaForCausalLM

cfg = LlamaConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=512, vocab_size=1000, attn_implementation="eager")
model = LlamaForCausalLM(cfg).to(device())
ids = torch.randint(0, cfg.vocab_size, (2, 256), device=device())
run("Llama (GQA)", model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
