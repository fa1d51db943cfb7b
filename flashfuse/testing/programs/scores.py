"""Stages of `ProgramWriter` (writer.py) that write the score chain: scale, softcap, softmax, dropout."""


def number(x):
    """A float literal for the source text."""
    return repr(float(x))


class ScoreStages:
    """Writes the lines from `scores = q @ k^T` to `weights = softmax(...)` and dropout.

    Mixed into ProgramWriter: uses its `c` (the choices), `src` (the _Source written to), `kind`, `three_d`
    and the mask stages (masks.py).
    """

    # -- scale
    def scale_expr(self):
        value = self.c["scale_value"]
        op = self.c.get("scale_op", "mul")
        if value == "sqrt_d":
            return "math.sqrt(D)" if "div" in op else "D ** -0.5"
        return number(value)

    def scale_operator(self):
        return "/" if "div" in self.c.get("scale_op", "mul") else "*"

    def operand_scales(self):
        c, s = self.c, self.src
        scale = c["scale"]
        if scale == "on_q" and c.get("scale_site") != "projection":
            s.line(f"q = q {self.scale_operator()} {self.scale_expr()}")
        elif scale == "on_k":
            s.line(f"k = k {self.scale_operator()} {self.scale_expr()}")
        elif scale == "both_quarter":
            s.line("q = q * D ** -0.25")
            s.line("k = k * D ** -0.25")

    def k_transposed(self):
        c = self.c
        if self.kind == "k_untransposed":
            form = c["transpose"]
            if form == "plain":
                return "k"
            if form == "double_transpose":
                return "k.mT.mT"
            return f"{self.transposed('k', form[:-3])}.mT"
        expr = {"transpose_m1m2": "k.transpose(-1, -2)", "transpose_m2m1": "k.transpose(-2, -1)",
                "transpose_12": "k.transpose(1, 2)", "transpose_23": "k.transpose(2, 3)", "mT": "k.mT",
                "permute": "k.permute(0, 2, 1)" if self.three_d else "k.permute(0, 1, 3, 2)",
                "torch_transpose": "torch.transpose(k, -2, -1)", "swapaxes": "k.swapaxes(-1, -2)",
                "pre_permuted": "k"}[c["kT"]]
        if c["scale"] == "on_kT":
            expr = f"({expr} {self.scale_operator()} {self.scale_expr()})"
        return expr

    def transposed(self, var, form):
        """var with its last two dims swapped, spelled `form` (one of TRANSPOSES)."""
        sub = "b" if self.three_d else "bh"
        return {"mT": f"{var}.mT", "transpose": f"{var}.transpose(-1, -2)", "movedim": f"{var}.movedim(-1, -2)",
                "moveaxis": f"torch.moveaxis({var}, -1, -2)",
                "einsum": f'torch.einsum("{sub}nd->{sub}dn", {var})'}[form]

    def product(self):
        c, s = self.c, self.src
        p = c["product"]
        kt = self.k_transposed()
        if self.kind == "q_transposed":
            s.line(f"q = {self.transposed('q', c['transpose'])}")
        if p == "einsum":
            sub = "b" if self.three_d else "bh"
            if c["einsum_form"] == "kd":
                k = "k" if c["scale"] != "on_kT" else f"(k {self.scale_operator()} {self.scale_expr()})"
                s.line(f'scores = torch.einsum("{sub}qd,{sub}kd->{sub}qk", q, {k})')
            else:
                s.line(f'scores = torch.einsum("{sub}qd,{sub}dk->{sub}qk", q, {kt})')
        elif p == "at":
            s.line(f"scores = q @ {kt}")
        elif p == "matmul":
            s.line(f"scores = torch.matmul(q, {kt})")
        elif p == "matmul_method":
            s.line(f"scores = q.matmul({kt})")
        elif p == "bmm":
            s.line(f"scores = torch.bmm(q, {kt})")
        elif p == "bmm_method":
            s.line(f"scores = q.bmm({kt})")
        else:
            src = c["baddbmm_input"]
            if src == "bias":
                inp = self.bias_tensor()
            else:
                fn = "torch.empty" if src == "empty" else "torch.zeros"
                s.line(f"base = {fn}(B * H, NQ, NK, dtype=q.dtype, device=q.device)")
                inp = "base"
            alpha = self.scale_expr() if c["scale"] == "alpha" else "1.0"
            beta = number(c["beta"])
            if p == "baddbmm":
                s.line(f"scores = torch.baddbmm({inp}, q, {kt}, beta={beta}, alpha={alpha})")
            else:
                s.line(f"scores = {inp}.baddbmm(q, {kt}, beta={beta}, alpha={alpha})")

    def scale_after(self):
        c, s = self.c, self.src
        op, value = c["scale_op"], self.scale_expr()
        line = {"div": f"scores = scores / {value}", "mul": f"scores = scores * {value}",
                "rmul": f"scores = {value} * scores", "div_method": f"scores = scores.div({value})",
                "mul_method": f"scores = scores.mul({value})", "idiv": f"scores /= {value}",
                "imul": f"scores *= {value}", "div_": f"scores.div_({value})",
                "torch_mul": f"scores = torch.mul(scores, {value})",
                "torch_div": f"scores = torch.div(scores, {value})"}[op]
        s.line(line)

    def scale_tensor(self):
        c, s = self.c, self.src
        value = number(c["scale_value"])
        form = c["scale_tensor"]
        if form == "full":
            t = f"torch.full([], {value})"
        elif form == "tensor":
            t = f"torch.tensor({value})"
        elif form == "buffer":
            s.init.append(f'self.register_buffer("temperature", torch.tensor({value}))')
            t = "self.temperature"
        else:
            s.init.append(f"self.temperature = nn.Parameter(torch.tensor({value}))")
            t = "self.temperature"
        s.line(f"scores = scores {'*' if c['scale_op'] == 'mul' else '/'} {t}")

    def softcap(self):
        c, s = self.c, self.src
        form = c["softcap"]
        if form == "none":
            return
        cap = number(c["softcap_value"])
        if form == "mul_tanh":
            s.line(f"scores = {cap} * torch.tanh(scores / {cap})")
        elif form == "tanh_mul":
            s.line(f"scores = torch.tanh(scores / {cap}) * {cap}")
        elif form == "method":
            s.line(f"scores = scores.div({cap}).tanh().mul({cap})")
        else:
            s.line(f"scores = scores / {cap}")
            s.line("scores = torch.tanh(scores)")
            s.line(f"scores = scores * {cap}")

    def scores_chain(self):
        c, s = self.c, self.src
        scale = c["scale"]
        if self.kind == "per_key_scale":
            s.init.append("self.key_scale = nn.Parameter(torch.rand(NK) + 0.5)")
            s.line("scores = scores * self.key_scale")
        if scale == "after":
            self.scale_after()
        elif scale == "tensor":
            self.scale_tensor()
        self.softcap()
        if self.kind == "tanh_no_mul":
            s.line("scores = torch.tanh(scores)")
        has_bias = c["bias"] != "none" and c.get("baddbmm_input") != "bias"
        masks = self.mask_vars() if c["masks"] != "none" else []
        apply = bool(masks) and self.kind != "mask_after_softmax"
        self.after_masks = masks if not apply else []
        if c.get("order") == "mask_first":
            if apply:
                self.apply_masks(masks)
            if has_bias:
                self.add_bias()
        else:
            if has_bias:
                self.add_bias()
            if scale == "after_bias":
                self.scale_after()
            if apply:
                self.apply_masks(masks)
        if scale == "after_mask":
            self.scale_after()

    # -- softmax and after
    def softmax(self):
        c, s = self.c, self.src
        if self.kind == "scores_reused":
            s.line("peak = scores.amax()")
        if self.kind == "log_softmax":
            s.line("weights = F.log_softmax(scores, dim=-1)")
            return
        if self.kind == "manual_softmax":
            s.line("e = (scores - scores.amax(dim=-1, keepdim=True)).exp()")
            s.line("weights = e / e.sum(dim=-1, keepdim=True)")
            return
        dim = "-2" if self.kind == "softmax_dim" else "-1"
        rank = 3 if self.three_d else 4
        pos = str(int(dim) + rank)
        form = c["softmax"]
        if form == "module":
            s.init.append(f"self.softmax = nn.Softmax(dim={dim})")
        line = {"functional": f"F.softmax(scores, dim={dim})", "method": f"scores.softmax({dim})",
                "torch": f"torch.softmax(scores, dim={dim})", "module": "self.softmax(scores)",
                "positive_dim": f"torch.softmax(scores, dim={pos})",
                "dtype_to": f"F.softmax(scores, dim={dim}, dtype=torch.float32).to(q.dtype)",
                "float_type_as": f"scores.float().softmax(dim={dim}).type_as(scores)",
                "to_float_type": f"F.softmax(scores.to(torch.float32), dim={dim}).type(q.dtype)",
                "special": f"torch.special.softmax(scores, {dim})",
                "functional_positional": f"F.softmax(scores, {dim})"}[form]
        s.line(f"weights = {line}")

    def after_softmax(self):
        c, s = self.c, self.src
        form = c["dropout"]
        if form == "module":
            s.init.append("self.attn_dropout = nn.Dropout(0.1)")
            s.line("weights = self.attn_dropout(weights)")
        elif form == "functional_false":
            s.line("weights = F.dropout(weights, p=0.1, training=False)")
        elif form == "functional_training":
            s.line("weights = F.dropout(weights, p=0.2, training=self.training)")
        elif form == "torch_dropout":
            s.line("weights = torch.dropout(weights, 0.1, False)")
        if self.kind == "mask_after_softmax":
            var, polarity, _ = self.after_masks[0]
            s.line(f"weights = weights.masked_fill({self.hide_expr(var, polarity)}, 0.0)")
