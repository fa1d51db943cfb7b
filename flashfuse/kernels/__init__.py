"""The op (`torch.ops.flashfuse.*`), its Triton kernels and the reference implementation."""
from flashfuse.kernels.api import attention

__all__ = ["attention"]
