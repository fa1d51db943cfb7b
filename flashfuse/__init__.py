"""flashfuse: find unfused attention in unmodified models and run it as one flash-attention kernel.

    model = torch.compile(model, backend="flashfuse")
    print(flashfuse.explain(model, *inputs))
"""
from flashfuse.backend import flashfuse_backend
from flashfuse.backend import register as _register
from flashfuse.explain import Report, explain
from flashfuse.kernels import attention

__all__ = ["attention", "explain", "flashfuse_backend", "Report"]

_register()
