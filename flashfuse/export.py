"""`flashfuse.export`: torch.export of a model with its attention rewritten to flashfuse's op.

torch.export traces to aten IR (`aten.softmax.int`, `aten.matmul`), which the matcher does not read. So Dynamo
first captures the model's torch-level graph, as torch.compile does; the pass rewrites it (`rewrite_graph`);
torch.export then exports that graph. The ExportedProgram calls `flashfuse::fwd` wherever a site was rewritten,
and goes on to torch.export's tools and to AOTInductor (`torch._inductor.aoti_compile_and_package`), which
compiles the op's Triton kernels into the package on CUDA and calls the op through its runtime on the CPU.
"""
import logging

import torch

from flashfuse.passes import rewrite_graph

log = logging.getLogger("flashfuse")


def export(model, args=(), kwargs=None, *, dynamic_shapes=None):
    """`torch.export.export(model, args, kwargs)` with every provable attention site running flashfuse's op.

    Args:
        model: an nn.Module (or function) whose outputs are tensors or pytree containers of them (for transformers
            models: `model.config.use_cache = False`, as for torch.export itself).
        args, kwargs: example inputs, as for torch.export.export.
        dynamic_shapes: as for torch.export.export (given to the capture and to the export alike).

    Returns:
        a torch.export.ExportedProgram; its `flashfuse_sites` attribute lists a `Site` per softmax (and SDPA call),
        rewritten or not, with the reason (as `flashfuse.explain` reports them).

    Example::

        >>> ep = flashfuse.export(model, kwargs=inputs)
        >>> path = torch._inductor.aoti_compile_and_package(ep)
        >>> outputs = torch._inductor.aoti_load_package(path)(**inputs)
    """
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a function, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    kwargs = dict(kwargs or {})
    graph = torch._dynamo.export(model, dynamic_shapes=dynamic_shapes)(*args, **kwargs)[0]
    sites = rewrite_graph(graph, training=False)  # an exported program serves: no residual for a backward
    log.info("flashfuse.export: %d of %d sites rewritten", sum(s.rewritten for s in sites), len(sites))
    program = torch.export.export(graph, args, kwargs, dynamic_shapes=dynamic_shapes)
    program.flashfuse_sites = sites
    return program
