"""Rotating query rows outside the attention kernels: dense, or as the identity plus a low rank.

The launchers get the rotation in one of two float32 forms (rollingq.functional.kernel_arguments):
- dense [H, D, D]: x' = x @ R^T, 2 D^2 multiply-adds per row: a batched matmul when every row is
  rotated; with a row mask a kernel here that multiplies only in row blocks holding a selected row
  and copies the rest (RollingQAttention's default rotates one fusion row per sequence, so a
  matmul over all rows and a select would cost ~L times the work and two extra passes);
- packed [H, 2, D, r] = (left, right) with R = I + left @ right^T: x' = x + (x @ right) @ left^T,
  4 D r multiply-adds per row, done here by one memory-bound kernel that reads x, forms the r
  projections in float32 and writes x' once (RollingQ's plane rotations give r = 2 per rotation).
The backward needs x @ R (dq = dq' R): the transpose, which swaps left and right.
Kernels that rotate in-kernel (the single path) take the dense form, made by `dense_rotation`.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from . import common
from .common import next_pow2
from .grid import launch_grid, program_ids

BLOCK_L = 32  # rows per program
# Products of one D slice with the factors as [BLOCK_L, BLOCK_D, BLOCK_R] broadcasts: BLOCK_D shrinks
# as r grows so that temporary stays near this many elements (a memory-bound kernel wants few
# registers, i.e. many programs in flight); from r > 8 on the kernel uses tl.dot.
PRODUCT_ELEMS = 4096
MIN_BLOCK_D = 32  # 64-byte rows of bf16 per load at least
DOT_MIN_R = 16


def is_low_rank(rotation: torch.Tensor) -> bool:
    """True for the packed [H, 2, D, r] form, False for a dense [H, D, D] rotation."""
    return rotation.dim() == 4


def dense_rotation(rotation: torch.Tensor) -> torch.Tensor:
    """Either form -> contiguous float32 [H, D, D] (I + left @ right^T for the packed form)."""
    if not is_low_rank(rotation):
        return rotation.to(torch.float32).contiguous()
    left, right = rotation[:, 0].float(), rotation[:, 1].float()
    eye = torch.eye(left.shape[1], dtype=torch.float32, device=left.device).expand(left.shape[0], -1, -1)
    return torch.baddbmm(eye, left, right.transpose(1, 2))


@triton.jit
def _low_rank_rotate_kernel(
    x_ptr, a_ptr, b_ptr, mask_ptr, y_ptr,
    s_xb, s_xh, s_xl, s_xd,
    s_yb, s_yh, s_yl, s_yd,
    s_ah, s_ad,  # a and b: [H, D, r] with unit stride over r, the same strides
    s_mb, s_ml,
    H, L, D, R,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    USE_DOT: tl.constexpr,  # wide factors: tensor-core-shaped exact (ieee) dots instead of broadcasts
    EVERY_ROW: tl.constexpr,  # no row mask: every row is rotated
    IN_PLACE: tl.constexpr,  # y is x: unselected rows are neither read nor written
):
    blk, _, h, b = program_ids(1)
    offs_l = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    rows = offs_l < L  # the rows this program reads and writes
    if not EVERY_ROW:
        sel = tl.load(mask_ptr + b * s_mb + offs_l * s_ml, mask=rows, other=0) != 0
        if IN_PLACE:
            rows = rows & sel  # a block without a selected row then moves no data at all
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    x_rows = x_ptr + b * s_xb + h.to(tl.int64) * s_xh + offs_l[:, None].to(tl.int64) * s_xl
    y_rows = y_ptr + b * s_yb + h.to(tl.int64) * s_yh + offs_l[:, None].to(tl.int64) * s_yl
    f_base = h.to(tl.int64) * s_ah

    # t = x @ a over the whole row first: every output column needs all of it.
    t = tl.zeros([BLOCK_L, BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        x = tl.load(x_rows + offs_d[None, :] * s_xd, mask=rows[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(a_ptr + f_base + offs_d[:, None] * s_ad + offs_r[None, :], mask=d_ok[:, None] & r_ok[None, :],
                    other=0.0)
        if USE_DOT:
            t = tl.dot(x, a, t, input_precision="ieee")
        else:
            t += tl.sum(x[:, :, None] * a[None, :, :], axis=1)
    if not EVERY_ROW and not IN_PLACE:
        t = tl.where(sel[:, None], t, 0.0)  # unselected rows are copied unchanged

    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        ok = rows[:, None] & d_ok[None, :]
        x = tl.load(x_rows + offs_d[None, :] * s_xd, mask=ok, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + f_base + offs_d[:, None] * s_ad + offs_r[None, :], mask=d_ok[:, None] & r_ok[None, :],
                     other=0.0)
        if USE_DOT:
            y = tl.dot(t, tl.trans(bt), x, input_precision="ieee")
        else:
            y = x + tl.sum(t[:, None, :] * bt[None, :, :], axis=2)
        # Each program reads a slice of its own rows before writing it: in place is safe.
        tl.store(y_rows + offs_d[None, :] * s_yd, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dense_rows_rotate_kernel(
    x_ptr, r_ptr, mask_ptr, y_ptr,
    s_xb, s_xh, s_xl, s_xd,
    s_yb, s_yh, s_yl, s_yd,
    s_rh, s_ro, s_ri,  # y[., o] = sum_i x[., i] * r[h, o, i] (strides swapped for the transpose)
    s_mb, s_ml,
    L,
    HEAD_D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
    IEEE: tl.constexpr,  # float32 rows: exact products; 16-bit: R in x's dtype, as a matmul in it would be
):
    blk, oc, h, b = program_ids((HEAD_D + BLOCK_O - 1) // BLOCK_O)
    offs_l = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    rows = offs_l < L
    sel = tl.load(mask_ptr + b * s_mb + offs_l * s_ml, mask=rows, other=0) != 0
    offs_o = oc * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < HEAD_D
    x_rows = x_ptr + b * s_xb + h.to(tl.int64) * s_xh + offs_l[:, None].to(tl.int64) * s_xl
    r_base = r_ptr + h.to(tl.int64) * s_rh
    acc = tl.zeros([BLOCK_L, BLOCK_O], dtype=tl.float32)
    # A block without a selected row runs no step: it only copies its rows.
    hi = tl.where(tl.max(sel.to(tl.int32), 0) > 0, HEAD_D, 0)
    for i0 in range(0, hi, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < HEAD_D
        xi = tl.load(x_rows + offs_i[None, :] * s_xd, mask=sel[:, None] & i_ok[None, :], other=0.0)
        rt = tl.load(r_base + offs_i[:, None] * s_ri + offs_o[None, :] * s_ro, mask=i_ok[:, None] & o_ok[None, :],
                     other=0.0)
        if IEEE:
            acc = tl.dot(xi.to(tl.float32), rt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xi, rt.to(xi.dtype), acc)
    ok = rows[:, None] & o_ok[None, :]
    xo = tl.load(x_rows + offs_o[None, :] * s_xd, mask=ok, other=0.0)
    y = tl.where(sel[:, None], acc.to(xo.dtype), xo)
    tl.store(y_ptr + b * s_yb + h.to(tl.int64) * s_yh + offs_l[:, None].to(tl.int64) * s_yl + offs_o[None, :] * s_yd,
             y, mask=ok)


DENSE_BLOCK_O = 64  # output columns per program of the dense kernel
DENSE_BLOCK_I = 32  # input columns per step


def _rotate_dense_rows(x: torch.Tensor, rotation: torch.Tensor, rot_mask: torch.Tensor,
                       transpose: bool, keep_layout: bool) -> torch.Tensor:
    B, H, L, D = x.shape
    y = common.new_buffer((B, H, L, D), x.device, x.dtype, like=x if keep_layout else None)
    mask = rot_mask.view(torch.uint8)
    s_rh, s_ro, s_ri = rotation.stride()
    if transpose:  # x @ R: y[., o] = sum_i x[., i] * R[i, o]
        s_ro, s_ri = s_ri, s_ro
    with common.LAUNCH_LOCK:
        _dense_rows_rotate_kernel[launch_grid(triton.cdiv(L, BLOCK_L), triton.cdiv(D, DENSE_BLOCK_O), H, B)](
            x, rotation, mask, y, *x.stride(), *y.stride(), s_rh, s_ro, s_ri, *mask.stride(), L,
            HEAD_D=D, BLOCK_L=BLOCK_L, BLOCK_O=DENSE_BLOCK_O, BLOCK_I=DENSE_BLOCK_I, IEEE=x.dtype == torch.float32,
            num_warps=4)
    return y


def _block_d(d: int, block_r: int, use_dot: bool) -> int:
    if use_dot:
        return 32
    return max(MIN_BLOCK_D, min(next_pow2(d), PRODUCT_ELEMS // (BLOCK_L * block_r)))


def rotate(x: torch.Tensor, rotation: torch.Tensor, rot_mask: Optional[torch.Tensor],
           transpose: bool = False, in_place: bool = False, keep_layout: bool = False) -> torch.Tensor:
    """Rows of x [B, H, L, D] (any strides) times R^T (transpose=True: times R) where rot_mask
    (bool/uint8 [B, L], stride 0 allowed; None: every row) is set, unchanged elsewhere.

    rotation: float32 dense [H, D, D] or packed [H, 2, D, r]. Returns a new tensor in x's dtype,
    contiguous (the forward's rotated q, which the ops' fake implementation promises contiguous:
    Inductor checks it) or with keep_layout in x's layout as torch.empty_like gives it (the
    backward's dq, which follows q); with in_place (the packed form only, for a buffer the caller
    owns, e.g. dq) x itself, whose unselected rows are not touched.
    """
    if not is_low_rank(rotation):
        if rot_mask is not None:
            return _rotate_dense_rows(x, rotation, rot_mask, transpose, keep_layout)
        # A broadcast matmul: einsum may hand back a permuted layout (batch and heads swapped).
        r = rotation.to(x.dtype)
        y = torch.matmul(x, r if transpose else r.transpose(-1, -2))
        if keep_layout:
            return common.new_buffer(tuple(x.shape), x.device, x.dtype, like=x).copy_(y) \
                if y.stride() != torch.empty_like(x, device="meta").stride() else y
        return y.contiguous()
    B, H, L, D = x.shape
    r = rotation.shape[-1]
    # x @ R^T = x + (x @ right) @ left^T; x @ R = x + (x @ left) @ right^T.
    a, b = (rotation[:, 0], rotation[:, 1]) if transpose else (rotation[:, 1], rotation[:, 0])
    use_dot = r > 8
    block_r = max(DOT_MIN_R, next_pow2(r)) if use_dot else next_pow2(r)
    y = x if in_place else common.new_buffer((B, H, L, D), x.device, x.dtype, like=x if keep_layout else None)
    mask = x if rot_mask is None else rot_mask.view(torch.uint8)  # x: a stand-in never read
    s_mb, s_ml = (0, 0) if rot_mask is None else mask.stride()
    with common.LAUNCH_LOCK:
        _low_rank_rotate_kernel[launch_grid(triton.cdiv(L, BLOCK_L), 1, H, B)](
            x, a, b, mask, y, *x.stride(), *y.stride(), a.stride(0), a.stride(1), s_mb, s_ml, H, L, D, r,
            BLOCK_L=BLOCK_L, BLOCK_D=_block_d(D, block_r, use_dot), BLOCK_R=block_r, USE_DOT=use_dot,
            EVERY_ROW=rot_mask is None, IN_PLACE=in_place, num_warps=4)
    return y
