"""Attention dropout: which attention probabilities the kernels keep.

Every element (b, h, i, j) of the attention matrix gets its own 16-bit number: an eighth of the
Philox draw with counters (j // 8, i, b * H + h) under a 64-bit seed read from device memory. The
forward and both backward kernels walk the matrix in different orders and tiles; counters make
them draw the same mask without storing it. Eight elements per Philox call (10 rounds of 32-bit
multiplies) keep the integer work per element near FlashAttention's. The seed is drawn from
PyTorch's generator on the tensors' device (`rollingq.functional.dropout_seed`), so
`torch.manual_seed` repeats a run, activation checkpointing (which restores the generator) reruns
the same mask, and a captured CUDA graph draws a new seed at each replay.

A probability is kept when its number is >= round(p_drop * 2**16): an integer compare, no float
conversion. Kept probabilities are scaled by 1 / (1 - p_drop), as torch.nn.functional.dropout
does. So p_drop acts as rounded to a multiple of 2**-16 (below 2**-17 nothing is dropped) while
the scale is the one asked for: the expected output is off by at most 2**-17 / (1 - p_drop), under
1e-4 for p_drop up to 0.9, 0.8% at 0.999, 7% at 0.9999; from 1 - 2**-17 on nothing would be kept,
and such a p_drop is refused (rollingq.validation.MAX_DROPOUT).
"""
import torch
import triton
import triton.language as tl

from . import common
from .grid import launch_grid

KEEP_BITS = 16


def threshold(dropout_p: float) -> int:
    """The kernels' integer threshold for a drop probability in [0, 1)."""
    return int(round(dropout_p * (1 << KEEP_BITS)))


def launch_args(dropout_p: float, seed, device) -> tuple:
    """(threshold, 1 / (1 - dropout_p)): the kernels' dropout arguments, after checking that a
    dropout has its seed, an int64 [1] tensor on the tensors' device."""
    if not 0.0 <= dropout_p < 1.0 or threshold(dropout_p) >= 1 << KEEP_BITS:
        raise ValueError(f"dropout_p must be in [0, 1 - 2^-17) (16-bit draws would keep nothing), got {dropout_p!r}")
    if dropout_p > 0 and not (isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1
                              and seed.device == torch.device(device)):
        raise ValueError(f"seed must be an int64 tensor of one element on {device} when dropout_p > 0, got "
                         f"{getattr(seed, 'dtype', type(seed).__name__)} {tuple(getattr(seed, 'shape', ()))} on "
                         f"{getattr(seed, 'device', '-')}")
    return threshold(dropout_p), 1.0 / (1.0 - dropout_p)


@triton.jit
def _halves_kept(d, thresh):
    """Both 16-bit halves of a 32-bit draw against the threshold: [..., 2] bool (low, high)."""
    return tl.join((d & 0xFFFF).to(tl.int32) >= thresh, (d >> 16).to(tl.int32) >= thresh)


@triton.jit
def kept(seed, bh, rows, col0, thresh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: which elements (rows[i], col0 + j) of the attention matrix of
    (batch, head) `bh` (b * H + h, uint32) are kept; `rows` is [BLOCK_M, 1], col0 a multiple of 8.

    One Philox call gives four 32-bit numbers, i.e. eight 16-bit ones: it serves the 8 columns
    8c .. 8c + 7 of a row, counters (c, row, bh, 0). Joined in a fixed order and reshaped, the
    draws land on their columns whatever the tile, so every kernel (and the transposed walk of dK/dV)
    sees the same element get the same number."""
    cols8 = col0 // 8 + tl.arange(0, BLOCK_N // 8)[None, :]
    r = rows + cols8 * 0
    c = cols8 + rows * 0
    z = c * 0
    d0, d1, d2, d3 = tl.philox(seed, c, r, bh + z.to(tl.uint32), z)
    # New dims are minor: column 8c + 4 * half + 2 * (k % 2) + k // 2 holds half `half` of draw d_k.
    eight = tl.join(tl.join(_halves_kept(d0, thresh), _halves_kept(d1, thresh)),
                    tl.join(_halves_kept(d2, thresh), _halves_kept(d3, thresh)))
    return tl.reshape(eight, [BLOCK_M, BLOCK_N])


@triton.jit(do_not_specialize=["thresh"])
def _keep_mask_kernel(SEED, OUT, H, Lq, Lk, thresh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Tiles on grid dim 0 (up to 2^31 - 1), heads and batch on dims 1 and 2 (up to 65535 each).
    pid, n_blocks = tl.program_id(0), tl.cdiv(Lk, BLOCK_N)
    pid_m, pid_n = pid // n_blocks, pid % n_blocks
    bh = tl.program_id(2).to(tl.int64) * H + tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = kept(tl.load(SEED), bh.to(tl.uint32), offs_m[:, None], pid_n * BLOCK_N, thresh, BLOCK_M, BLOCK_N)
    tl.store(OUT + (bh * Lq + offs_m[:, None]) * Lk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


def keep_mask(seed: torch.Tensor, B: int, H: int, Lq: int, Lk: int, dropout_p: float) -> torch.Tensor:
    """The mask the kernels apply for `seed` (int64 [1]): bool [B, H, Lq, Lk], True = kept. For
    tests and debugging (the reference takes it as `dropout_mask`); the kernels never store it. A
    call's seed is the next `rollingq.functional.dropout_seed(device)` draw, so after
    `torch.manual_seed(s)` a call and `keep_mask(dropout_seed(device), ...)` see the same mask.
    Runs the kernels: CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    if not isinstance(seed, torch.Tensor):
        raise TypeError(f"seed must be an int64 tensor of one element, got {type(seed).__name__}")
    thresh, _ = launch_args(dropout_p, seed, seed.device)
    out = torch.empty((B, H, Lq, Lk), device=seed.device, dtype=torch.int8)
    if out.numel():
        grid = launch_grid(triton.cdiv(Lq, 32) * triton.cdiv(Lk, 32), 1, H, B)
        with common.on_device_of(seed), common.LAUNCH_LOCK:
            _keep_mask_kernel[grid](seed, out, H, Lq, Lk, thresh, BLOCK_M=32, BLOCK_N=32)
    return out.view(torch.bool)
