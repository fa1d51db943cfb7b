"""flashfuse: find unfused attention in unmodified models and run it as one flash-attention kernel."""
from flashfuse.kernels import attention

__all__ = ["attention"]
