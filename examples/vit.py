"""Vision Transformers: Hugging Face ViT and timm's ViT (fused_attn off), compiled with flashfuse."""
import timm
import torch
from common import device, run
from transformers import ViTConfig, ViTModel

pixels = torch.randn(4, 3, 224, 224, device=device())
cfg = ViTConfig(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=512,
                attn_implementation="eager")
run("ViT (transformers)", ViTModel(cfg).to(device()), {"pixel_values": pixels})

model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=4).to(device())
for module in model.modules():
    if hasattr(module, "fused_attn"):
        module.fused_attn = False  # timm's eager path: q * scale, q @ k.transpose(-2, -1), softmax, @ v
run("ViT (timm)", model, {"x": pixels})
