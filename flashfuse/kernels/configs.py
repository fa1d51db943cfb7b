"""Launch configurations as data: one fixed config per kernel and head-dim class, and the candidates a tuning
run sweeps (bench/tune.py, which launches each through `override`).

The fixed configs are H200 tuning winners (bench/README.md; those for head dims over 128 from `bench/tune.py`,
bench/results/tune-d256-2026-12-03.json); a launch never autotunes, so no call stalls
on compilation of configs it will not use, and the launch path stays short. The interpreter always takes
small blocks, so short test sequences still cross block edges.
"""
import contextlib
import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

#: The largest head dim (of q, k or v) the kernels' tiles hold; larger ones take the blockwise CPU-path code
#: (op.path). At 512 every config needs more than Hopper's 227 KB of shared memory (scripts/compile_kernels.py).
MAX_HEAD_DIM = 256
#: Shared memory a block may use on Hopper (H100, H200), for scripts/compile_kernels.py's check.
SHARED_MEMORY = {90: 232448}

#: The interpreter's config: small blocks so short test sequences still cross block edges.
INTERPRETER = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}

# kind -> (config for head dims <= 128, config for larger head dims)
FIXED = {
    "fwd": ({"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
            {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}),
    # dK/dV programs own BLOCK_N keys and stream BLOCK_M queries; dQ programs own BLOCK_M queries and stream keys
    "dkdv": ({"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
             {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}),
    "dq": ({"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
           {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}),
    # FP8 forward (flash_fp8.py): for d <= 128 the H200 winner at d128 4k (bench/tune.py --kind fp8 --d 128,
    # 1.16x 128 x 128 tiles with 8 warps); larger head dims not yet tuned
    "fp8": ({"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
            {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}),
    "decode": ({"BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
               {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}),
}


def kernels_hold(q, v):
    """True when the Triton kernels can run this call: not float64 (they accumulate in fp32) and head dims of
    at most MAX_HEAD_DIM (their tiles)."""
    return q.dtype != torch.float64 and max(q.shape[-1], v.shape[-1]) <= MAX_HEAD_DIM


def cdiv(a, b):
    """ceil(a / b) in plain Python (triton.cdiv goes through Triton's constexpr machinery: microseconds a call)."""
    return -(-a // b)


def pow2(n):
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


#: kind -> the config that replaces FIXED's inside `override` (every head dim)
_OVERRIDE = {}


@contextlib.contextmanager
def override(kind, cfg):
    """Launch kernel `kind` ("fwd", "dq", "dkdv", "decode", "fp8") with `cfg` inside the block, e.g.
    `with configs.override("dkdv", {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2}): ...`"""
    if kind not in FIXED:
        raise ValueError(f"kind must be one of {sorted(FIXED)}, got {kind!r}")
    before = _OVERRIDE.get(kind)
    _OVERRIDE[kind] = dict(cfg)
    try:
        yield
    finally:
        if before is None:
            _OVERRIDE.pop(kind)
        else:
            _OVERRIDE[kind] = before


def default(kind, head_d):
    """The launch config (a fresh dict) of kernel `kind` for a padded head dim."""
    if kind in _OVERRIDE:
        return dict(_OVERRIDE[kind])
    if INTERPRET:
        cfg = dict(INTERPRETER)
        if kind == "decode":
            cfg.pop("BLOCK_M")
        return cfg
    return dict(FIXED[kind][head_d > 128])


def candidates(kind, head_d):
    """Configs a tuning run tries for `kind`: tile shapes x warps x pipeline depth, minus those that cannot
    fit shared memory or registers at large head dims."""
    block_m = (32, 64) if kind == "dkdv" else (64, 128)
    block_n = (32, 64, 128)  # dK/dV at 32: half the accumulator registers of 64 (large head dims spill)
    found = []
    for bm in block_m:
        for bn in block_n:
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    if head_d >= 256 and (bn > 64 or stages > 2):
                        continue
                    if head_d >= 192 and (bn > 64 or stages > 3):
                        continue
                    found.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages})
    return found
