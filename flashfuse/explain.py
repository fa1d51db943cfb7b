"""`flashfuse.explain`: which attention sites a model has, which were rewritten, and why not."""
import collections
import functools
from dataclasses import dataclass, field

import torch
from torch._dynamo.utils import counters

from flashfuse import backend


@dataclass
class Report:
    """The sites found while compiling a model: `sites`, one per softmax (and SDPA call); `graph_breaks`, Dynamo's
    reasons for breaking the graph in that run, with counts. Code that Dynamo leaves to eager (a checkpointed block
    whose body broke, a frame it skipped) reaches no backend, so its attention is in no site."""
    sites: list = field(default_factory=list)
    graph_breaks: collections.Counter = field(default_factory=collections.Counter)

    @property
    def rewritten(self):
        return sum(s.rewritten for s in self.sites)

    def __str__(self):
        rows = [("site", "kind", "rewritten", "scores shape", "spec or reason")]
        attention = [s for s in self.sites if s.attention]
        others = [s for s in self.sites if not s.attention]
        for s in attention + others:
            detail = s.describe() if s.rewritten else (s.reason or "")
            kind = s.kind if s.attention else "not attention"
            rows.append((s.node, kind, "yes" if s.rewritten else "no", str(s.shape or ""), detail))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(f"{self.rewritten} of {len(attention)} attention sites rewritten")
        if others:
            lines.append(f"{len(others)} other softmaxes (no q.kT product before, no p.v product after) are not "
                         "attention and not counted")
        paths = {}
        for s in self.sites:
            if s.rewritten and s.path[0] != "triton":
                paths.setdefault(s.path, []).append(s.node)
        for (name, why), nodes in paths.items():
            lines.append(f"{len(nodes)} of them run the {name} path, not the Triton kernels: {why}")
        if self.graph_breaks:
            lines.append(f"graph breaks in this run: {sum(self.graph_breaks.values())} (what Dynamo leaves to "
                         "eager reaches no backend, so attention there is not rewritten):")
            lines += [f"  {n} x {_summary(reason)}" for reason, n in self.graph_breaks.items()]
        return "\n".join(lines)


def _summary(reason):
    """Dynamo's reason, first line, and the hint that names a torch._dynamo.config setting if there is one."""
    first, *rest = [line.strip() for line in reason.splitlines() if line.strip()]
    hint = next((line for line in rest if "torch._dynamo.config." in line), None)
    return first if hint is None else f"{first} ({hint})"


def explain(model, *args, options=None, **kwargs) -> Report:
    """Compile `model` with flashfuse, run it once on the given inputs, and report every site. `options` are the
    backend's (`{"fp8": True}`, say); the report's run always uses `compiler="eager"`.

    It resets Dynamo's caches first (torch._dynamo.reset()), so that every graph is traced and reported: functions
    compiled before recompile on their next call.

    Example::

        >>> report = flashfuse.explain(model, input_ids)
        >>> print(report)
        >>> assert all(site.rewritten for site in report.sites)
    """
    if not callable(model):
        raise ValueError(f"model must be an nn.Module or a callable, got {type(model).__name__}")
    report = Report()
    listener = report.sites.extend
    backend._LISTENERS.append(listener)
    try:
        torch._dynamo.reset()  # graphs cached for an earlier model of the same code would be reused, unreported
        before = collections.Counter(counters["graph_break"])
        compiled = torch.compile(model, backend=functools.partial(_explain_backend, options=options))
        compiled(*args, **kwargs)
        report.graph_breaks = collections.Counter(counters["graph_break"]) - before
    finally:
        backend._LISTENERS.remove(listener)
    return report


def _explain_backend(gm, example_inputs, options=None):
    return backend.flashfuse_backend(gm, example_inputs, options={**(options or {}), "compiler": "eager"})
