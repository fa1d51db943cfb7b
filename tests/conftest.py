# Triton reads TRITON_INTERPRET when it is imported: set it before any test module imports triton, so CPU
# tensors run the Triton kernels through the interpreter (op.py dispatches them to flash.py then).
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles for the fuzz tests (ci, dev, fuzz; see flashfuse/testing/profiles.py), picked by
# FLASHFUSE_HYPOTHESIS_PROFILE (default ci). Without hypothesis installed, tests/test_fuzz.py cannot run anyway.
try:
    from flashfuse.testing.profiles import load_profile
except ImportError:
    pass
else:
    load_profile()

# the flashfuse_fuzz fixture (tests/test_fuzz.py), as a user's conftest would load it
pytest_plugins = ("flashfuse.testing.pytest_plugin",)
