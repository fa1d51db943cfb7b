# Triton reads TRITON_INTERPRET when it is imported: set it before any test module imports triton, so CPU
# tensors run the Triton kernels through the interpreter (op.py dispatches them to flash.py then).
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
