"""The `flashfuse` torch.compile backend: rewrite attention, then hand the graph to inductor.

    model = torch.compile(model, backend="flashfuse")
    model = torch.compile(model, backend="flashfuse", options={"compiler": "eager"})

Options (all optional; keys that are not flashfuse's go to inductor as config patches):
    compiler: "inductor" (default) compiles the rewritten graph with inductor; "eager" runs it
        through AOTAutograd without inductor (training still works).
    rewrite: True (default); False compiles the graph untouched, for A/B comparisons.
    sdpa: True (default) also routes existing F.scaled_dot_product_attention calls to the op.
    fp8: False (default); True runs the sites of graphs that need no gradient in FP8 (flashfuse.attention's
        fp8=True: q, k, v quantized to e4m3 after a random Hadamard rotation of q and k). A graph that needs
        gradients, and a site with a bias, keep their dtype; `explain` says so per site.
`mode` ("default", "reduce-overhead", "max-autotune", ...) is forwarded to inductor.
"""
import contextlib
import functools
import hashlib
import logging
import os

import torch

from flashfuse.passes import rewrite_graph

log = logging.getLogger("flashfuse")

DEFAULTS = {"compiler": "inductor", "rewrite": True, "sdpa": True, "fp8": False}
COMPILERS = ("inductor", "eager")


def split_options(options):
    """(flashfuse options with defaults, the remaining inductor config patches)."""
    options = dict(options or {})
    ours = {key: options.pop(key, default) for key, default in DEFAULTS.items()}
    if ours["compiler"] not in COMPILERS:
        raise ValueError(f"options['compiler'] must be one of {COMPILERS}, got {ours['compiler']!r}")
    for key in ("rewrite", "sdpa", "fp8"):
        if not isinstance(ours[key], bool):
            raise ValueError(f"options[{key!r}] must be a bool, got {ours[key]!r}")
    return ours, options


def flashfuse_backend(gm: torch.fx.GraphModule, example_inputs, mode=None, options=None):
    """A torch.compile backend: rewrites every provable attention site, then compiles the graph."""
    ours, inductor_options = split_options(options)
    if ours["rewrite"]:
        fp8 = ours["fp8"] and ("the graph needs gradients" if _needs_grad(example_inputs) else True)
        sites = rewrite_graph(gm, sdpa=ours["sdpa"], fp8=fp8)
        for listener in list(_LISTENERS):
            listener(sites)
    if ours["compiler"] == "eager":
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        with _tagged_caches():
            return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop)(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx
    patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
    patches.update(inductor_options)
    with _tagged_caches():
        return compile_fx(gm, example_inputs, config_patches=patches or None)


@functools.lru_cache(maxsize=1)
def build_tag():
    """"flashfuse-" and a hash of the op and kernel sources (flashfuse/kernels/*.py).

    Inductor's FX-graph cache and AOTAutograd's cache key a graph by its code, which names the op
    (`flashfuse.fwd`) but holds nothing of its schema or of the Python that launches its kernels: after an
    upgrade that changes either, a warm cache would hand back code compiled against the old op (the old
    backward's arguments, say). The tag joins the cache key, so it changes with them."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as source:
            digest.update(name.encode() + b"\0" + source.read())
    return "flashfuse-" + digest.hexdigest()[:16]


def _tagged_caches():
    """torch.compiler.config.cache_key_tag with build_tag() added for this compilation (the user's tag kept)."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return contextlib.nullcontext()
    return config.patch(cache_key_tag="+".join(filter(None, (config.cache_key_tag, build_tag()))))


def _needs_grad(example_inputs):
    """Will this graph run a backward? Grad mode on and an input (a parameter, say) that requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


# explain() listens here for the sites each compiled graph produced
_LISTENERS = []


def register():
    """Register the backend under the name "flashfuse" (also done by the package's entry point)."""
    from torch._dynamo import list_backends, register_backend
    if "flashfuse" not in list_backends(exclude_tags=()):
        register_backend(flashfuse_backend, name="flashfuse")
