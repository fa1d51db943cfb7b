"""BERT with a padding mask from its config, compiled with flashfuse."""
import torch
from common import device, run
from transformers import BertConfig, BertModel

cfg = BertConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=512,
                 attn_implementation="eager")
model = BertModel(cfg).to(device())
ids = torch.randint(0, cfg.vocab_size, (4, 256), device=device())
mask = torch.ones_like(ids)
mask[1:, 200:] = 0  # right padding
run("BERT", model, {"input_ids": ids, "attention_mask": mask})
