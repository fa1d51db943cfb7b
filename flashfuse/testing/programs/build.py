"""A program from its choices: write the source, exec it, instantiate the module, repair NaN programs."""
import copy
import linecache
from dataclasses import dataclass, field, replace

import torch

from flashfuse.testing.programs.writer import ProgramWriter


@dataclass
class Program:
    """One drawn program. `module(*inputs)` runs it; `source` is the code of `module`'s class."""
    source: str
    module: torch.nn.Module
    inputs: tuple
    is_attention: bool
    expected_sites: int
    choices: dict = field(default_factory=dict)
    #: some query row sees no key: every key is hidden by a finite fill (finfo.min, -1e9, a padding bias)
    fully_masked_rows: bool = False

    def to(self, device) -> "Program":
        """The same program with its module and inputs on `device` (leaves stay leaves)."""
        def move(x):
            if not isinstance(x, torch.Tensor):
                return x
            return x.detach().to(device).requires_grad_(x.requires_grad)
        module = copy.deepcopy(self.module).to(device)
        return replace(self, module=module, inputs=tuple(move(x) for x in self.inputs))

    def __repr__(self):
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in self.inputs)
        kind = "attention" if self.is_attention else f"near miss ({self.choices.get('kind')})"
        return (f"Program({kind}, expected_sites={self.expected_sites}, inputs: {shapes}"
                f"{', fully masked rows' if self.fully_masked_rows else ''})\n{self.source}")


def _rows_all(hide):
    return bool(hide.all(dim=-1).any()) if hide.numel() else False


def _fully_masked(builder):
    """Some query row sees no key: every key is hidden (by a mask, or a padding bias)."""
    every = torch.zeros(builder.B, builder.H, builder.NQ, builder.NK, dtype=torch.bool)
    for hide, _ in builder.hiding:
        every |= hide
    return _rows_all(every)


_COUNTER = [0]


class NaNProgram(ValueError):
    """The choices make a program whose eager output has NaN (a row with every key at -inf)."""


def _repairs(choices):
    """The choices, then the same with left padding made right padding, then with no padding."""
    yield choices
    if choices.get("pad_side") == "left":
        choices = dict(choices, pad_side="right")
        yield choices
    if any(choices.get("pads", ())):
        yield dict(choices, pads=(0,) * len(choices["pads"]))


def _has_nan(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    return any(torch.isnan(o).any() for o in outs if o.is_floating_point())


def _instantiate(choices):
    builder = ProgramWriter(choices)
    source = builder.build()
    _COUNTER[0] += 1
    filename = f"<flashfuse-program-{_COUNTER[0]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "flashfuse_program"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102  (the program is the source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(choices["seed"])
        module = namespace["Program"]().to(getattr(torch, choices["dtype"])).eval()
    return builder, source, module


def build_program(choices: dict) -> Program:
    """Write, exec and instantiate the program a dict of choices describes (as drawn by attention_programs).

    A row that every key hides with -inf gives NaN in eager code too (so does finfo.min scaled past the
    dtype's range), and a NaN output proves nothing. When eager gives NaN, left padding becomes right
    padding (which never hides key 0; causal and random masks keep it), then no padding; the program's
    `choices` are the repaired ones. Raises NaNProgram if none of them helps.
    """
    for repaired in _repairs(dict(choices)):
        builder, source, module = _instantiate(repaired)
        inputs = tuple(builder.src.inputs)
        if not _has_nan(module, inputs):
            break
    else:
        raise NaNProgram("eager gives NaN for these choices, with and without padding")
    choices = repaired
    kind = choices["kind"]
    sites = choices.get("calls", 1) if kind == "attention" else 0
    return Program(source, module, inputs, kind == "attention", sites, choices,
                   fully_masked_rows=_fully_masked(builder))
