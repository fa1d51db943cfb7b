"""GPT-2 (causal, left padding) from its config, compiled with flashfuse."""
import torch
from common import device, run
from transformers import GPT2Config, GPT2LMHeadModel

cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, attn_implementation="eager")
model = GPT2LMHeadModel(cfg).to(device())
ids = torch.randint(0, cfg.vocab_size, (2, 256), device=device())
mask = torch.ones_like(ids)
mask[0, :64] = 0  # left padding
run("GPT-2", model, {"input_ids": ids, "attention_mask": mask})
