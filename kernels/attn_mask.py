"""The user's attention mask (SDPA's `attn_mask`) inside the kernels.

A mask broadcastable to [B, H, Lq, Lk] reaches the kernels as a stride-0 expanded view (no copy)
and one of two kinds, a constexpr of every kernel:
- KEEP (bool): True = the query may attend the key; a False element is hidden like a padding key.
- BIAS (float): added to the scaled scores before the softmax; -inf hides the key.
The forward, dK/dV (which walks the transposed tile) and dQ kernels each read the tile they need;
nothing is derived from it on the host (a mask is data, so no key block is skipped for it).

A bias that requires grad gets ds, the gradient of the scores, from the dQ kernel: added by
atomics into a buffer of the bias's own shape where that shape is shared over batch or heads, else
stored into a dense buffer that the launcher sums over the broadcast dims (`grad_plan`).
"""
import torch
import triton
import triton.language as tl

from . import common

NONE, KEEP, BIAS = 0, 1, 2
MAX_SLICE_OFFSET = 2 ** 31  # the dense gradient buffer's offsets within one (batch, head) slice stay below this


@triton.jit
def mask_tile(base, rows, cols, rows_ok, cols_ok, s_r, s_c, MASK: tl.constexpr):
    """The mask over rows x cols: KEEP -> bool (out of range: False), BIAS -> fp32 bias in base 2
    (out of range: 0, where the caller hides the element anyway). Offsets within a (batch, head)
    slice are 32-bit unless the slice spans 2^31 elements (offset_slices: the kernel's OFFS64 then
    widens s_r and s_c): 64-bit ones per element spill registers (sm_90 dK/dV D64 BM64 BN128,
    16-bit: 96 B; fp32 dK/dV: 8-48 B), a cost only such huge masks pay."""
    ptrs = base + rows[:, None] * s_r + cols[None, :] * s_c
    ok = rows_ok[:, None] & cols_ok[None, :]
    if MASK == 1:
        return tl.load(ptrs, mask=ok, other=0) != 0
    else:
        bias = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        # Finite stays finite (float32's min times log2(e) would overflow to -inf and hide the key).
        return tl.where(bias == float("-inf"), bias, tl.maximum(bias * 1.4426950408889634, -3.4028234663852886e38))


def kind_of(attn_mask) -> int:
    return NONE if attn_mask is None else (KEEP if attn_mask.dtype == torch.bool else BIAS)


def launch_args(attn_mask, B: int, H: int, Lq: int, Lk: int, stand_in: torch.Tensor):
    """(tensor, (s_b, s_h, s_q, s_k), kind) for a launcher: the mask expanded to [B, H, Lq, Lk]
    (broadcast dims get stride 0) and read as uint8 when bool; `stand_in` (any tensor the kernel
    never reads) when there is no mask."""
    kind = kind_of(attn_mask)
    if kind == NONE:
        return stand_in, (0, 0, 0, 0), NONE
    if attn_mask.dim() > 4 or not all(n == 1 or n == want for n, want in zip(attn_mask.shape[::-1], (Lk, Lq, H, B))):
        raise ValueError(f"attn_mask must broadcast to [B, H, Lq, Lk] = [{B}, {H}, {Lq}, {Lk}], got "
                         f"{tuple(attn_mask.shape)}")
    if attn_mask.dtype not in (torch.bool, torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"attn_mask must be bool, float16, bfloat16 or float32, got {attn_mask.dtype}")
    full = attn_mask.expand(B, H, Lq, Lk)
    return (full.view(torch.uint8) if kind == KEEP else full), full.stride(), kind


def offset_slices(amask: torch.Tensor, kind: int) -> tuple:
    """The launcher's mask argument as a tensor whose [Lq, Lk] slice decides OFFS64 with the others
    (offsets.int64_offsets): a dense [L, L] mask spans 2^31 elements from L = 46341 on. Empty
    without a mask (the stand-in is never read)."""
    return (amask,) if kind != NONE else ()


DENSE_GRAD, SHARED_GRAD = 1, 2  # the dQ kernel's MASK_GRAD


def _require_bias(attn_mask) -> None:
    if kind_of(attn_mask) != BIAS:
        raise ValueError(f"mask_grad needs a float attn_mask, got "
                         f"{'None' if attn_mask is None else attn_mask.dtype}")


def grad_plan(attn_mask, B: int, H: int, Lq: int, Lk: int, deterministic: bool = False) -> int:
    """How dQ forms a bias's gradient. SHARED_GRAD: the bias is contiguous, broadcasts over the batch
    and/or the heads only (its Lq and Lk dims are whole), so dQ adds each ds tile by atomics into a
    float32 buffer of the bias's own shape and strides: B*H/(its B*H) times less memory than the
    dense buffer and no sum afterwards, but the float32 additions land in run-dependent order.
    DENSE_GRAD otherwise: a bias shared along rows or keys (the atomics of one tile would hit one
    address), a full [B, H, Lq, Lk] one (nothing to sum), a strided one, or deterministic mode."""
    _require_bias(attn_mask)
    shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
    shared = shape[0] * shape[1] < B * H and shape[2] == Lq and shape[3] == Lk
    return SHARED_GRAD if shared and attn_mask.is_contiguous() and not deterministic else DENSE_GRAD


def grad_buffer(attn_mask, B: int, H: int, Lq: int, Lk: int, plan: int = DENSE_GRAD):
    """The buffer the dQ kernel writes a bias's gradient into (attention_bwd's mask_grad). SHARED_GRAD:
    zeros of the bias's shape in float32 (contiguous, as the bias: the kernel adds through the bias's
    strides). DENSE_GRAD: [B, H, Lq, Lk], float32 where the mask broadcasts (the broadcast dims are
    summed afterwards), else the mask's own dtype, addressed with 32-bit offsets per (batch, head)."""
    _require_bias(attn_mask)
    if plan == SHARED_GRAD:
        return torch.zeros(attn_mask.shape, device=attn_mask.device, dtype=torch.float32)
    if Lq * Lk >= MAX_SLICE_OFFSET:
        raise ValueError(f"attn_mask: its gradient is formed as a dense [B, H, Lq, Lk] buffer addressed with 32-bit "
                         f"offsets per (batch, head), and Lq * Lk = {Lq} * {Lk} is 2^31 or more; split Lq")
    full = tuple(attn_mask.shape) == (B, H, Lq, Lk)
    return common.new_buffer((B, H, Lq, Lk), attn_mask.device, attn_mask.dtype if full else torch.float32)
