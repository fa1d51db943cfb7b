"""Stages of `ProgramWriter` (writer.py) that write the bias and the masks, and record what they hide."""
import torch

from flashfuse.testing.programs.scores import number


class MaskStages:
    """Writes the bias and mask lines; each one's hidden keys go to `self.hiding` as (hide (B, H, NQ, NK), is -inf).

    Mixed into ProgramWriter: uses its `c`, `src`, `kind`, `dtype`, the sizes and its data helpers (pad_keep4,
    reduce, expand4, ...).
    """

    # -- bias
    def bias_tensor(self):
        """The bias as an expression (adding its input or parameter); records what it hides."""
        c, s = self.c, self.src
        kind = c["bias"]
        if kind == "hf_long":
            mask = self.long_attention_mask()
            s.line(f"bias = (1.0 - {mask}[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min")
            self.hiding.append((~self.pad_keep4(), False))
            return "bias"
        shape = self.pattern_shape(c["bias_shape"])
        if kind == "input":
            s.arg("bias", self.randn(*shape))
            return "bias"
        if kind == "param":
            s.init.append(f"self.rel_bias = nn.Parameter(torch.randn{shape} * 0.5)")
            return "self.rel_bias"
        keep4 = self.pad_keep4()
        fill = torch.finfo(self.dtype).min if kind == "padding_min" else float("-inf")
        full = torch.zeros(self.B, self.H, self.NQ, self.NK).masked_fill(~keep4, fill)
        data = self.reduce(full, c["bias_shape"]).to(self.dtype)
        s.arg("bias", data)
        hidden = self.expand4(self.reduce(~keep4, c["bias_shape"]))
        self.hiding.append((hidden, kind == "padding_inf"))
        return "bias"

    def add_bias(self):
        c, s = self.c, self.src
        b = self.bias_tensor()
        if self.kind == "bias_minus_scores":
            s.line(f"scores = {b} - scores")
            return
        line = {"plus": f"scores = scores + {b}", "radd": f"scores = {b} + scores",
                "torch_add": f"scores = torch.add(scores, {b})", "add_method": f"scores = scores.add({b})",
                "iadd": f"scores += {b}", "sub": f"scores = scores - {b}"}[c["bias_add"]]
        s.line(line)

    # -- masks
    def fill_expr(self):
        c = self.c
        if self.kind == "small_fill":
            return number(c["small_fill"])
        fill = c["fill"]
        if fill == "-inf":
            return 'float("-inf")' if c["inf_spelling"] == "float" else "-math.inf"
        return {"finfo_min": "torch.finfo(scores.dtype).min", "-1e4": "-10000.0", "-1e9": "-1e9"}[fill]

    def negate(self, var):
        form = self.c.get("negation", "~")
        return {"~": f"~{var}", "logical_not": f"{var}.logical_not()", "torch_logical_not": f"torch.logical_not({var})",
                "eq0": f"({var} == 0)"}[form]

    def mask_vars(self):
        """Emit the mask tensors; return [(variable, polarity "keep" | "hide", hide (B, H, NQ, NK))]."""
        c, s = self.c, self.src
        parts = [] if c["masks"] == "none" else c["masks"].split("+")
        out = []
        if "padding" in parts:
            keep4 = self.pad_keep4()
            if c["padding_source"] == "bool_input":
                pattern, polarity = c["padding_shape"], c["padding_polarity"]
                reduced = self.reduce(keep4, pattern)
                name = "keep" if polarity == "keep" else "pad"
                s.arg(name, reduced if polarity == "keep" else ~reduced)
                out.append((name, polarity, ~self.expand4(reduced)))
            else:
                mask = self.long_attention_mask()
                if self.three_d:
                    s.line(f"keep = {mask}[:, None, None, :].expand(B, H, 1, NK).reshape(B * H, 1, NK).bool()")
                    out.append(("keep", "keep", ~keep4))
                elif c["long_spelling"] == "eq0":
                    s.line(f"pad = {mask}[:, None, None, :] == 0")
                    out.append(("pad", "hide", ~keep4))
                else:
                    s.line(f"keep = {mask}[:, None, None, :].bool()")
                    out.append(("keep", "keep", ~keep4))
        if "random" in parts:
            keep4 = self.random_keep4()
            pattern, polarity = c["random_shape"], c["random_polarity"]
            reduced = self.reduce(keep4, pattern)
            name = "allowed" if polarity == "keep" else "blocked"
            s.arg(name, reduced if polarity == "keep" else ~reduced)
            out.append((name, polarity, ~self.expand4(reduced)))
        if "causal" in parts:
            keep2, diagonal = self.causal_keep()
            hide4 = ~keep2.expand(self.B, self.H, self.NQ, self.NK)
            src = c["causal_source"]
            rows = f"{diagonal}:{diagonal + self.NQ}" if diagonal else ":NQ"
            lead = "" if self.three_d else ":, :, "
            if src in ("buffer_bool", "buffer_float"):
                m = max(self.NQ, self.NK) + 3
                view = "" if self.three_d else f".view(1, 1, {m}, {m})"
                dtype = "dtype=torch.bool" if src == "buffer_bool" else "dtype=torch.float32"
                s.init.append(f'self.register_buffer("tril", torch.tril(torch.ones({m}, {m}, {dtype})){view}, '
                              "persistent=False)")
                if src == "buffer_bool":
                    s.line(f"causal = self.tril[{lead}{rows}, :NK]")
                    out.append(("causal", "keep", hide4))
                else:
                    s.line(f"future = self.tril[{lead}{rows}, :NK] == 0")
                    out.append(("future", "hide", hide4))
            elif src == "inline_tril":
                s.line(f"causal = torch.ones(NQ, NK, dtype=torch.bool, device=q.device).tril({diagonal})")
                out.append(("causal", "keep", hide4))
            elif src == "positions":  # transformers' masking_utils: key positions compared with query positions
                s.line(f"i = torch.arange(NQ, device=q.device)[:, None] + {diagonal}")
                s.line("causal = torch.arange(NK, device=q.device)[None, :] <= i")
                out.append(("causal", "keep", hide4))
            elif src == "distance":  # instead of causal, a two-sided band |i - j| <= 2 (ModernBERT's local layers)
                i = torch.arange(self.NQ)[:, None] + diagonal
                band = (i - torch.arange(self.NK)[None, :]).abs() <= 2
                s.line(f"i = torch.arange(NQ, device=q.device)[:, None] + {diagonal}")
                s.line("near = (i - torch.arange(NK, device=q.device)[None, :]).abs() <= 2")
                out.append(("near", "keep", ~band.expand(self.B, self.H, self.NQ, self.NK)))
            else:
                s.line(f"future = torch.ones(NQ, NK, dtype=torch.bool, device=q.device).triu({diagonal + 1})")
                out.append(("future", "hide", hide4))
        return out

    def keep_expr(self, var, polarity):
        return var if polarity == "keep" else self.negate(var)

    def hide_expr(self, var, polarity):
        return var if polarity == "hide" else self.negate(var)

    def apply_masks(self, masks):
        c, s = self.c, self.src
        if len(masks) == 2 and c["combine"] == "combined":
            (a, pa, ha), (b, pb, hb) = masks
            if pa == pb == "hide":
                s.line(f"hidden = {a} | {b}")
                masks = [("hidden", "hide", ha | hb)]
            else:
                s.line(f"visible = {self.keep_expr(a, pa)} & {self.keep_expr(b, pb)}")
                masks = [("visible", "keep", ha | hb)]
        fill = self.fill_expr()
        inf = self.kind != "small_fill" and c["fill"] == "-inf"
        for i, (var, polarity, hide) in enumerate(masks):
            if self.kind != "small_fill":
                self.hiding.append((hide, inf))
            form = c[f"fill_form{i}"]
            if form == "masked_fill":
                s.line(f"scores = scores.masked_fill({self.hide_expr(var, polarity)}, {fill})")
            elif form == "torch_masked_fill":
                s.line(f"scores = torch.masked_fill(scores, {self.hide_expr(var, polarity)}, {fill})")
            elif form == "masked_fill_":
                s.line(f"scores.masked_fill_({self.hide_expr(var, polarity)}, {fill})")
            elif form == "where_keep":
                s.line(f"scores = torch.where({self.keep_expr(var, polarity)}, scores, {fill})")
            elif form == "where_hide":
                s.line(f"scores = torch.where({self.hide_expr(var, polarity)}, {fill}, scores)")
            elif form == "where_full":
                s.line(f"fill = torch.full([], {fill}, dtype=scores.dtype, device=scores.device)")
                s.line(f"scores = torch.where({self.keep_expr(var, polarity)}, scores, fill)")
            else:
                s.line(f"scores = torch.where({self.keep_expr(var, polarity)}, scores, "
                       f"torch.tensor({fill}, dtype=scores.dtype))")
