# Triton reads TRITON_INTERPRET when it is imported: set it before any test module imports triton, so CPU
# tensors run the Triton kernels through the interpreter (op.py dispatches them to flash.py then).
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles for the fuzz tests (ci, dev, fuzz; see flashfuse/testing/profiles.py), picked by
# FLASHFUSE_HYPOTHESIS_PROFILE (default ci).
from flashfuse.testing.profiles import load_profile  # noqa: E402

load_profile()
