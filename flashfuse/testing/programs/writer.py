"""The source text of a program, written from its choices: q/k/v production, GQA, the products, the output.

The stages that write the scores (scale, softcap, softmax) are in scores.py, those that write the bias and
masks in masks.py; `ProgramWriter` puts them together. `ProgramWriter(choices).build()` returns the source
of a `class Program(nn.Module)`; the writer's `src.inputs` are the tensors its forward takes.
"""
import torch

from flashfuse.testing.programs.choices import _PROJ, LAYOUTS_3D
from flashfuse.testing.programs.masks import MaskStages
from flashfuse.testing.programs.scores import ScoreStages


class _Source:
    """The program being written: __init__ lines, forward lines, forward's arguments and their tensors."""

    def __init__(self):
        self.init, self.body, self.args, self.inputs, self.helpers = [], [], [], [], []

    def arg(self, name, tensor):
        self.args.append(name)
        self.inputs.append(tensor)

    def line(self, text):
        self.body.append(text)


_REPEAT_KV = '''
def repeat_kv(x, n):
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)
'''


_ROPE = {  # x (..., N, D), angles (N, D // 2): each feature pair rotated by its position's angles
    "complex": '''
def rope(x, angles):
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    angles = angles.float()
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).type_as(x)
''',
    "pairs": '''
def rope(x, angles):
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = angles.float().cos(), angles.float().sin()
    rotated = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return rotated.flatten(-2).type_as(x)
''',
}


class ProgramWriter(ScoreStages, MaskStages):  # noqa: PLR0904  (one method per stage)
    """Writes the program a dict of choices describes; `build()` returns its source."""

    def __init__(self, c):
        self.c = c
        self.get = c.get
        self.kind = c["kind"]
        self.dtype = getattr(torch, c["dtype"])
        self.layout = c["layout"]
        self.three_d = self.layout in LAYOUTS_3D
        self.B, self.H, self.NQ, self.NK, self.D = c["B"], c["H"], c["NQ"], c["NK"], c["D"]
        self.HKV = c.get("HKV", self.H)
        self.DV = c.get("DV", self.D)
        self.src = _Source()
        self.gen = torch.Generator().manual_seed(c["seed"])
        self.hiding = []  # (hide bool (B, H, NQ, NK), fills with -inf)
        self.long_mask = None

    # -- data
    def randn(self, *shape, grad=True):
        t = torch.randn(*shape, generator=self.gen).to(self.dtype)
        return t.requires_grad_(grad)

    def full_shape(self):
        return (self.B * self.H, self.NQ, self.NK) if self.three_d else (self.B, self.H, self.NQ, self.NK)

    def pattern_shape(self, pattern):
        sizes = {"B": self.B, "H": self.H, "Q": self.NQ, "K": self.NK, "X": self.B * self.H, "1": 1}
        return tuple(sizes[ch] for ch in pattern)

    def reduce(self, full4, pattern):
        """A (B, H, NQ, NK) tensor cut down to a broadcast pattern (index 0 along the '1' dims)."""
        t = full4.reshape(self.full_shape())
        index = [0] * (t.dim() - len(pattern)) + [slice(0, 1) if ch == "1" else slice(None) for ch in pattern]
        return t[tuple(index)].contiguous()

    def expand4(self, t):
        return t.expand(self.full_shape()).reshape(self.B, self.H, self.NQ, self.NK)

    def pad_keep(self):
        """(B, NK) bool: the keys each batch's padding keeps."""
        keep = torch.ones(self.B, self.NK, dtype=torch.bool)
        for b, pad in enumerate(self.c["pads"]):
            if pad:
                if self.c["pad_side"] == "left":
                    keep[b, :pad] = False
                else:
                    keep[b, self.NK - pad:] = False
        return keep

    def pad_keep4(self):
        return self.pad_keep()[:, None, None, :].expand(self.B, self.H, self.NQ, self.NK)

    def causal_keep(self):
        diagonal = self.NK - self.NQ if self.NQ <= self.NK else 0
        return torch.ones(self.NQ, self.NK, dtype=torch.bool).tril(diagonal), diagonal

    def random_keep4(self):
        g = torch.Generator().manual_seed(self.c["seed"] + 1)
        keep = torch.rand(self.B, self.H, self.NQ, self.NK, generator=g) > 0.3
        keep[..., 0] = True
        return keep

    def long_attention_mask(self):
        if self.long_mask is None:
            self.long_mask = "attention_mask"
            self.src.arg("attention_mask", self.pad_keep().long())
        return self.long_mask

    # -- the pieces
    def build(self):
        self.sizes()
        self.qkv()
        self.rope()
        self.gqa()
        self.operand_scales()
        self.product()
        self.scores_chain()
        self.softmax()
        self.after_softmax()
        self.value_product()
        self.output()
        return self.render()

    def sizes(self):
        c = self.c
        self.bq, self.nq_name, self.nk_name = "B", "NQ", "NK"
        if c.get("sizes") == "shape":
            self.bq, self.nq_name = "bsz", "q_len"
            self.nk_name = "kv_len" if self.get("cross") else "q_len"

    def heads(self, expr, n_name, heads, d, pre_permuted=False):
        """Split (B, N, heads * d) into heads: (B, heads, N, d), or (B, heads, d, N) when pre_permuted."""
        form = self.c.get("heads_split", "view_transpose")
        n = "-1" if self.c.get("sizes") == "minus_one" else n_name
        b = self.bq
        if pre_permuted:
            verb = "view" if form.startswith("view") else "reshape"
            return f"{expr}.{verb}({b}, {n}, {heads}, {d}).permute(0, 2, 3, 1)"
        if form == "view_transpose":
            return f"{expr}.view({b}, {n}, {heads}, {d}).transpose(1, 2)"
        if form == "reshape_permute":
            return f"{expr}.reshape({b}, {n}, {heads}, {d}).permute(0, 2, 1, 3)"
        if form == "view_permute":
            return f"{expr}.view({b}, {n}, {heads}, {d}).permute(0, 2, 1, 3)"
        return f"{expr}.unflatten(-1, ({heads}, {d})).transpose(1, 2)"

    def qkv(self):  # noqa: C901
        c, s, L = self.c, self.src, self.layout
        B, H, HKV, NQ, NK, D, DV = self.B, self.H, self.HKV, self.NQ, self.NK, self.D, self.DV
        pre = c.get("kT") == "pre_permuted"
        q_scale = ""
        if c["scale"] == "on_q" and c.get("scale_site") == "projection":
            q_scale = f" {self.scale_operator()} {self.scale_expr()}"
        if L == "inputs":
            s.arg("q", self.randn(B, H, NQ, D))
            s.arg("k", self.randn(B, HKV, NK, D))
            s.arg("v", self.randn(B, HKV, NK, DV))
        elif L == "inputs3d":
            s.arg("q", self.randn(B * H, NQ, D))
            s.arg("k", self.randn(B * H, NK, D))
            s.arg("v", self.randn(B * H, NK, DV))
        elif L == "inputs_bnhd":
            s.arg("q", self.randn(B, NQ, H, D))
            s.arg("k", self.randn(B, NK, HKV, D))
            s.arg("v", self.randn(B, NK, HKV, DV))
            if c["heads_split"] == "transpose":
                s.line("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
            else:
                for name in "qkv":
                    s.line(f"{name} = {name}.permute(0, 2, 1, 3)")
        else:
            E = H * D
            self.E = E
            s.arg("x", self.randn(B, NQ, E))
            mem = "x"
            if c.get("cross"):
                mem = "memory"
                s.arg("memory", self.randn(B, NK, E))
            bias = c["linear_bias"]
            if c["sizes"] == "shape":
                s.line("bsz, q_len, _ = x.shape")
                if c.get("cross"):
                    s.line("kv_len = memory.shape[1]")
            if L == "fused_qkv":
                s.init.append(f"self.qkv = nn.Linear(E, (H + 2 * HKV) * D, bias={bias})")
                n = "-1" if c["sizes"] == "minus_one" else self.nq_name
                if c["fused"] == "unbind":
                    s.line(f"q, k, v = self.qkv(x).reshape({self.bq}, {n}, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)")
                elif c["fused"] == "index":
                    s.line(f"qkv = self.qkv(x).reshape({self.bq}, {n}, 3, H, D).permute(2, 0, 3, 1, 4)")
                    s.line("q, k, v = qkv[0], qkv[1], qkv[2]")
                elif c["fused"] == "chunk":
                    s.line(f"q, k, v = self.qkv(x).reshape({self.bq}, {n}, 3 * H, D).transpose(1, 2).chunk(3, dim=1)")
                else:
                    s.line("q, k, v = self.qkv(x).split([H * D, HKV * D, HKV * D], dim=-1)")
                    s.line(f"q = {self.heads('q', self.nq_name, 'H', 'D')}{q_scale}")
                    s.line(f"k = {self.heads('k', self.nk_name, 'HKV', 'D', pre)}")
                    s.line(f"v = {self.heads('v', self.nk_name, 'HKV', 'D')}")
                return
            s.init.append(f"self.q_proj = nn.Linear(E, H * D, bias={bias})")
            s.init.append(f"self.k_proj = nn.Linear(E, HKV * D, bias={bias})")
            s.init.append(f"self.v_proj = nn.Linear(E, HKV * DV, bias={bias})")
            qp = f"(self.q_proj(x){q_scale})" if q_scale else "self.q_proj(x)"
            if L == "proj":
                s.line(f"q = {self.heads(qp, self.nq_name, 'H', 'D')}")
                s.line(f"k = {self.heads(f'self.k_proj({mem})', self.nk_name, 'HKV', 'D', pre)}")
                s.line(f"v = {self.heads(f'self.v_proj({mem})', self.nk_name, 'HKV', 'DV')}")
            else:  # proj3d: BART's (B * H, N, D)
                b = self.bq
                for name, expr, n, d in (("q", qp, self.nq_name, "D"), ("k", f"self.k_proj({mem})", self.nk_name, "D"),
                                         ("v", f"self.v_proj({mem})", self.nk_name, "DV")):
                    split = self.heads(expr, n, "H", d)
                    if c["flatten_heads"] == "reshape":
                        s.line(f"{name} = {split}.reshape({b} * H, -1, {d})")
                    else:
                        s.line(f"{name} = {split}.contiguous().view({b} * H, -1, {d})")

    def rope(self):
        """Rotary embeddings on q and k, (B, H, N, D), as the angles (N, D // 2) of each one's positions say."""
        form = self.c.get("rope", "none")
        if form == "none":
            return
        s = self.src
        s.helpers.append(_ROPE[form])
        frequencies = torch.rand(self.D // 2, generator=self.gen)
        for name, n in (("q", self.NQ), ("k", self.NK)):
            s.arg(f"angles_{name}", (torch.arange(n)[:, None] * frequencies).to(self.dtype))
            s.line(f"{name} = rope({name}, angles_{name})")

    def gqa(self):
        c, s = self.c, self.src
        g = c["gqa"]
        if g in ("none", "broadcast"):
            return
        pre = c.get("kT") == "pre_permuted"
        for name in "kv":
            last2 = ("D", "NK") if (name == "k" and pre) else ("NK", "D" if name == "k" else "DV")
            if g == "repeat_kv":
                if _REPEAT_KV not in s.helpers:
                    s.helpers.append(_REPEAT_KV)
                s.line(f"{name} = repeat_kv({name}, H // HKV)")
            elif g == "repeat_interleave":
                s.line(f"{name} = {name}.repeat_interleave(H // HKV, dim=1)")
            elif g == "repeat_kv_inline":
                s.line(f"{name} = {name}[:, :, None, :, :].expand(B, HKV, H // HKV, {last2[0]}, {last2[1]})"
                       f".reshape(B, H, {last2[0]}, {last2[1]})")
            else:
                s.line(f"{name} = {name}.unsqueeze(2).expand(B, HKV, H // HKV, {last2[0]}, {last2[1]})"
                       f".reshape(B, H, {last2[0]}, {last2[1]})")

    def value_product(self):
        c, s = self.c, self.src
        v = self.transposed("v", c["transpose"]) if self.kind == "v_transposed" else "v"
        form = c["value_product"]
        sub = "b" if self.three_d else "bh"
        line = {"at": f"weights @ {v}", "matmul": f"torch.matmul(weights, {v})", "bmm": f"torch.bmm(weights, {v})",
                "einsum": f'torch.einsum("{sub}qk,{sub}kd->{sub}qd", weights, {v})'}[form]
        s.line(f"out = {line}")
        if self.kind == "weights_reused":
            s.line(f"out = out + weights.{c['weights_use']}(dim=-1, keepdim=True)")

    def output(self):
        c, s = self.c, self.src
        dv = "NK" if self.kind == "v_transposed" else "DV"
        form = c["output"]
        b, nq = self.bq, self.nq_name
        if form == "merge_reshape":
            s.line(f"out = out.transpose(1, 2).reshape({b}, {nq}, H * {dv})")
        elif form == "merge_contiguous_view":
            s.line(f"out = out.transpose(1, 2).contiguous().view({b}, {nq}, -1)")
        elif form == "permute_flatten":
            s.line("out = out.permute(0, 2, 1, 3).flatten(2)")
        elif form == "merge":
            s.line(f"out = out.view({b}, H, {nq}, {dv}).transpose(1, 2).reshape({b}, {nq}, H * {dv})")
        if c.get("o_proj"):
            s.init.append(f"self.o_proj = nn.Linear(H * {dv}, E)")
            s.line("out = self.o_proj(out)")

    # -- the whole source
    def render(self):
        c, s = self.c, self.src
        consts = ["B", "H", "HKV", "NQ", "NK", "D", "DV"]
        values = [self.B, self.H, self.HKV, self.NQ, self.NK, self.D, self.DV]
        header = ["import math", "", "import torch", "import torch.nn as nn", "import torch.nn.functional as F", "",
                  f"{', '.join(consts)} = {', '.join(map(str, values))}"]
        if self.layout in _PROJ:
            header.append("E = H * D")
        lines = header + ["", ""]
        for helper in s.helpers:
            lines += [helper.strip("\n"), "", ""]
        lines.append("class Program(nn.Module):")
        if s.init:
            lines += ["    def __init__(self):", "        super().__init__()"]
            lines += [f"        {x}" for x in s.init]
            lines.append("")
        returns = "out"
        if self.kind == "weights_returned":
            returns = "out, weights"
        elif self.kind == "scores_reused":
            returns = "out, peak"
        calls = c.get("calls", 1)
        first, rest = s.args[0], s.args[1:]
        if calls == 2:
            lines.append(f"    def forward(self, {', '.join(s.args)}):")
            extra = "".join(f", {a}" for a in rest)
            lines.append(f"        return self.attend(self.attend({first}{extra}){extra})")
            lines.append("")
            lines.append(f"    def attend(self, {', '.join(s.args)}):")
        else:
            lines.append(f"    def forward(self, {', '.join(s.args)}):")
        lines += [f"        {x}" for x in s.body]
        lines.append(f"        return {returns}")
        return "\n".join(lines) + "\n"
