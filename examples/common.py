"""What every example does: explain, check against eager, time eager vs flashfuse."""
import time

import torch

import flashfuse
from flashfuse.tolerances import FORWARD, relative_error


def _main_output(out):
    return out if isinstance(out, torch.Tensor) else out[0]


def _median_ms(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1000


@torch.no_grad()
def run(name, model, inputs):
    """Compile `model` with flashfuse, print the explain table, the check against eager and the timing."""
    model = model.eval()
    print(f"== {name}")
    print(flashfuse.explain(model, **inputs))
    compiled = torch.compile(model, backend="flashfuse")
    expected, actual = _main_output(model(**inputs)), _main_output(compiled(**inputs))
    err = relative_error(actual, expected)
    tol = FORWARD[expected.dtype]
    print(f"output vs eager: relative error {err:.2e} ({'OK' if err < tol else 'MISMATCH'}, tolerance {tol:.0e})")
    eager_ms, fused_ms = _median_ms(lambda: model(**inputs)), _median_ms(lambda: compiled(**inputs))
    print(f"eager {eager_ms:.2f} ms, flashfuse {fused_ms:.2f} ms ({eager_ms / fused_ms:.2f}x)\n")
    return err < tol


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"
