"""`flashfuse.export`: torch.export with the attention rewritten. The ExportedProgram calls flashfuse::fwd at every
site, runs equal to eager (static and dynamic sequence length), and AOTInductor builds and runs it on the CPU
(scripts/integration.py export --device cuda does the same on a GPU)."""
import os

import pytest
import torch
from torch.export import Dim

import flashfuse
from flashfuse.kernels.op import CALLS
from flashfuse.testing import models
from flashfuse.tolerances import FORWARD, relative_error


def _model(family):
    model, inputs = models.build(family, seq=16)
    model.config.use_cache = False
    return model, inputs


def _op_nodes(program):
    return [n for n in program.graph.nodes if n.op == "call_function" and "flashfuse" in str(n.target)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exported_program_calls_the_op_and_equals_eager(family):
    model, inputs = _model(family)
    seq = Dim("seq", min=4, max=64)
    program = flashfuse.export(model, kwargs=inputs, dynamic_shapes={name: {1: seq} for name in inputs})
    assert len(program.flashfuse_sites) == 2 and all(s.rewritten for s in program.flashfuse_sites)
    assert len(_op_nodes(program)) == 2
    for n in (16, 29):  # the traced length and another
        ids = torch.randint(0, models.VOCAB, (2, n), generator=torch.Generator().manual_seed(n))
        batch = dict(input_ids=ids, attention_mask=models.padding_mask(2, n))
        got, want = (models.first_output(m(**batch)) for m in (program.module(), model))
        assert relative_error(got, want) < FORWARD[torch.float32]


def test_aot_inductor_package_runs_the_op(tmp_path):
    model, inputs = _model("gpt2")
    program = flashfuse.export(model, kwargs=inputs)
    path = torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(tmp_path / "gpt2.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    before = sum(CALLS.values())
    got = models.first_output(runner(**inputs))
    assert sum(CALLS.values()) - before == 2  # the package called the op at both sites (on the CPU, through Python)
    assert relative_error(got, models.first_output(model(**inputs))) < FORWARD[torch.float32]


def test_export_names_a_bad_argument():
    model, inputs = _model("gpt2")
    with pytest.raises(TypeError, match="args must be a tuple"):
        flashfuse.export(model, [inputs["input_ids"]])


def test_exported_bf16_program_keeps_no_residual():
    """An exported program serves: its bf16 sites keep no rounding residual for a backward (spec.fp32_delta), even
    though the model's parameters require grad when it is exported, as they do when torch.compile trains it."""
    model, inputs = _model("gpt2")
    model = model.bfloat16()
    program = flashfuse.export(model, kwargs=inputs)
    assert len(program.flashfuse_sites) == 2 and all(s.rewritten for s in program.flashfuse_sites)
    assert not any(s.spec.fp32_delta for s in program.flashfuse_sites)
    assert all(flashfuse.explain(model, **inputs).sites[i].spec.fp32_delta for i in range(2))  # compiled: trains

