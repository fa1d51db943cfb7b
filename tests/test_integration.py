"""flashfuse inside the ways users train, on the CPU path (scripts/integration.py does the work; on a GPU the
same script runs with --device cuda): a GPT-2 training loop with gradient accumulation, gradient checkpointing
and AdamW against eager; DDP and FSDP2 over gloo against stock inductor; the compile caches across processes.

Each runs in a fresh process with TRITON_INTERPRET=0, as a CPU user runs flashfuse (this suite's conftest sets
the interpreter for the kernel tests), and must print its "ok" line and exit 0.
"""
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "integration.py")


def _run(*args):
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
    assert done.returncode == 0 and lines and all(line.startswith("ok ") for line in lines), (
        f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return lines


def test_training_loop_follows_eager_loss_curve():
    """20 AdamW steps of GPT-2 with 2 micro-batches a step and gradient checkpointing: the loss curve under
    backend="flashfuse" equals eager's (relative 1e-4), and the op ran."""
    (line,) = _run("train-loop")
    assert "train-loop cpu" in line


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_distributed_training_equals_stock_inductor(strategy):
    """Two processes over gloo, the model wrapped in DDP or sharded with FSDP2 (fully_shard per block), compiled
    with backend="flashfuse": each rank's losses and gradient shards equal the same run under stock inductor."""
    (line,) = _run("distributed", "--strategy", strategy, "--world", "2")
    assert f"distributed {strategy} cpu x2" in line


def test_second_process_hits_the_compile_caches():
    """The rewrite is deterministic and the op cache-safe: a second process compiling the same model hits
    inductor's FX-graph cache and the AOTAutograd cache for every graph, with no misses."""
    (line,) = _run("caches")
    assert "caches cpu" in line


def test_another_op_build_misses_the_caches_an_older_one_filled(tmp_path, monkeypatch):
    """The caches key a graph by code that names the op but holds nothing of its schema or launchers: the backend
    adds backend.build_tag() (a hash of flashfuse/kernels) to the key, so an upgraded flashfuse does not reuse code
    compiled against the old op (an old backward's arguments, say)."""
    import torch
    from torch._dynamo.utils import counters

    from flashfuse import backend
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    fn = lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v  # noqa: E731

    def compile_once():
        torch._dynamo.reset()
        counters.clear()
        q, k, v = (torch.randn(2, 2, 8, 16, requires_grad=True) for _ in range(3))
        torch.compile(fn, backend="flashfuse")(q, k, v).sum().backward()
        return dict(counters["aot_autograd"])
    assert compile_once().get("autograd_cache_saved") == 1
    assert compile_once().get("autograd_cache_hit") == 1
    monkeypatch.setattr(backend, "build_tag", lambda: "flashfuse-another-build")
    assert compile_once().get("autograd_cache_miss") == 1

