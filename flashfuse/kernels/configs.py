"""Launch configurations as data: a comprehension per kernel, a keep() filter, a pruner by head dim.

By default every kernel runs the fixed per-head-dim config of `default` (picked from autotuning on an
H200): no tuning stalls, and a lighter launch path. FLASHFUSE_AUTOTUNE=1 autotunes instead, keyed by
padded head dims, the masking case (full / causal / window), a bucket of the sequence length and the dtypes
(Triton's autotuner adds those itself). The interpreter and pytest always take the fixed configs.
"""
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FIXED = INTERPRET or "PYTEST_VERSION" in os.environ or os.environ.get("FLASHFUSE_AUTOTUNE", "0") != "1"

#: The interpreter's single config: small blocks so short test sequences still cross block edges.
INTERPRETER = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}


def _config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _keep_fwd(c):
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    # Hopper: 128-row tiles want two warpgroups (8 warps), 64-row tiles one; deep pipelines only for small tiles
    return (c.num_warps == 8) == (bm == 128) and (c.num_stages == 2 or bn <= 64)


FWD = [c for c in (_config(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)
                   for s in (2, 3)) if _keep_fwd(c) and c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"] >= 64 * 64]


def _keep_bwd(c):
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    return (c.num_warps == 8) == (bm * bn >= 64 * 128) and (c.num_stages == 2 or bm * bn <= 64 * 64)


# dK/dV programs own BLOCK_N keys and stream BLOCK_M queries; dQ programs own BLOCK_M queries and stream keys
BWD_DKDV = [c for c in (_config(bm, bn, w, s) for bm in (32, 64) for bn in (64, 128) for w in (4, 8)
                        for s in (2, 3)) if _keep_bwd(c)]
BWD_DQ = [c for c in (_config(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64) for w in (4, 8)
                      for s in (2, 3)) if _keep_bwd(c)]


def _fits(c, head_d):
    """Drop tiles that cannot fit shared memory or registers at large head dims."""
    bm, bn = c.kwargs.get("BLOCK_M", 64), c.kwargs["BLOCK_N"]
    if head_d >= 256:
        return bn <= 64 and c.num_stages <= 2 and bm <= 128
    if head_d >= 192:
        return bn <= 64 and c.num_stages <= 3
    return True


def prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    head_d = max(args.get("HEAD_D", 64), args.get("HEAD_DV", 64))
    kept = [c for c in configs if _fits(c, head_d)]
    return kept or configs[:1]


def default(kind, head_d, case=0):
    """The fixed config per kernel and head dim: H200 autotuning winners at d64 / d128 (bench/README.md)."""
    if INTERPRET:
        if kind == "decode":
            return {"BLOCK_N": INTERPRETER["BLOCK_N"], "num_warps": 4, "num_stages": 1}
        return dict(INTERPRETER)
    big = head_d > 128
    if kind == "fwd":
        if big:
            return {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if kind == "dkdv":
        return {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8 if big else 4, "num_stages": 2 if big else 3}
    if kind == "dq":
        return {"BLOCK_M": 64, "BLOCK_N": 32 if big else 64, "num_warps": 8 if big else 4, "num_stages": 2}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


def length_bucket(n):
    """Sequence lengths bucketed to powers of two, so autotuning runs once per bucket, not per length."""
    return 1 << max(n - 1, 1).bit_length()
