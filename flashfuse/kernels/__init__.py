"""The op (`torch.ops.flashfuse.*`), its spec, its Triton kernels and CPU path, and the float64 oracle."""
from flashfuse.kernels.api import attention

__all__ = ["attention"]
