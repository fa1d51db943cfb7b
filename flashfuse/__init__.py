"""flashfuse: find unfused attention in unmodified models and run it as one flash-attention kernel.

    model = torch.compile(model, backend="flashfuse")
    print(flashfuse.explain(model, *inputs))
    flashfuse.register_transformers()   # then from_pretrained(..., attn_implementation="fuse"), no compile
    program = flashfuse.export(model, kwargs=inputs)   # torch.export, attention rewritten (AOTInductor-ready)
"""
import sys

from flashfuse.backend import flashfuse_backend
from flashfuse.backend import register as _register
from flashfuse.explain import Report, explain
from flashfuse.export import export
from flashfuse.hf import register as register_transformers
from flashfuse.kernels import attention

__all__ = ["attention", "explain", "export", "flashfuse_backend", "register_transformers", "Report"]

_register()
if "transformers" in sys.modules:  # registering imports transformers: only when the user already did
    register_transformers()
