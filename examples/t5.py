"""T5 (no scaling, learned relative position bias, encoder and decoder) from its config, compiled with flashfuse."""
import torch
from common import device, run
from transformers import T5Config, T5Model

cfg = T5Config(num_layers=3, num_decoder_layers=3, d_model=256, d_kv=64, num_heads=4, d_ff=512,
               attn_implementation="eager")
model = T5Model(cfg).to(device())
ids = torch.randint(0, cfg.vocab_size, (2, 128), device=device())
mask = torch.ones_like(ids)
mask[0, 100:] = 0
run("T5", model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :64]})
