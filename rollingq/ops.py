"""The fused kernels as `torch.library` custom ops with fake implementations and autograd.

Registering them as ops (rather than a bare autograd.Function) lets `torch.compile(fullgraph=True)`
trace models that use them: the compiler sees an opaque op with known output shapes.
"""
from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from .kernels.common import lse_shape, on_device_of  # host-side helpers only: no Triton import

_EMPTY = (0,)


def attention_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ids: torch.Tensor, num_modalities: int,
    rotation: Optional[torch.Tensor], rot_mask: Optional[torch.Tensor], causal: bool, scale: float,
    stats: bool, save_qrot: bool, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, lse, q_rot, attn_mass, key_sum); the last three are empty when not requested.
    `seed` (int64 [1]) draws the dropout masks when dropout_p > 0 (kernels/dropout.py); `attn_mask`
    (bool or float, broadcastable to [B, H, Lq, Lk]) is the user's mask (kernels/attn_mask.py)."""
    from .kernels.attention_fwd import rollingq_fwd  # Triton is imported when a kernel first runs

    with on_device_of(q):
        out, lse, q_rot, mass, key_sum = rollingq_fwd(
            q, k, v, ids, num_modalities, rotation, rot_mask, causal, scale, stats, save_qrot, dropout_p, seed,
            attn_mask)
    if q_rot is None:
        q_rot = q.new_empty(_EMPTY)
    elif q_rot.data_ptr() == q.data_ptr():
        q_rot = q_rot.clone(memory_format=torch.contiguous_format)  # an op output may not alias an input
    else:
        q_rot = q_rot.contiguous()  # the fake implementation promises contiguous outputs
    if mass is None:
        mass = q.new_empty(_EMPTY, dtype=torch.float32)
        key_sum = q.new_empty(_EMPTY, dtype=torch.float32)
    return out, lse, q_rot, mass, key_sum


# needs_exact_strides: Inductor hands the ops their inputs in the traced layouts, which the outputs
# follow (out and dq take q's, dk and dv k's and v's: kernels/common.new_buffer). The *_impl
# functions stay callable on their own: a TorchDispatchMode sees an op as one call, and the layout
# tests run the body under the mode to see the copies inside it (tests/test_layouts.py).
attention_fwd_op = torch.library.custom_op("rollingq::attention_fwd", mutates_args=(),
                                           tags=(torch.Tag.needs_exact_strides,))(attention_fwd_impl)


@attention_fwd_op.register_fake
def _(q, k, v, ids, num_modalities, rotation, rot_mask, causal, scale, stats, save_qrot, dropout_p=0.0, seed=None,
      attn_mask=None):
    B, H, Lq, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q, dtype=v.dtype)  # q's layout when q is dense (kernels/common.new_buffer)
    lse = q.new_empty(lse_shape(B, H, Lq), dtype=torch.float32)  # each row's (log2 l, m)
    q_rot = q.new_empty((B, H, Lq, D) if save_qrot else _EMPTY)
    mass = q.new_empty((B, H, Lq, num_modalities) if stats else _EMPTY, dtype=torch.float32)
    key_sum = q.new_empty((B, Hkv, num_modalities, D) if stats else _EMPTY, dtype=torch.float32)
    return out, lse, q_rot, mass, key_sum


def attention_bwd_impl(
    do: torch.Tensor, q_rot: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, ids: torch.Tensor, causal: bool, scale: float,
    rotation: Optional[torch.Tensor], rot_mask: Optional[torch.Tensor], dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None, mask_grad: bool = False,
    need_dq: bool = True, need_dkdv: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv, d_mask); d_mask (the gradient of a float attn_mask, in its shape and
    dtype) is empty unless `mask_grad`, dq unless `need_dq`, dk and dv unless `need_dkdv` (the
    kernel that forms them is skipped)."""
    from .kernels.attention_bwd import attention_bwd

    mask = None if rot_mask is None else rot_mask.view(torch.bool)
    with on_device_of(q_rot):
        grads = attention_bwd(do, q_rot, k, v, out, lse, ids, causal, scale, rotation, mask, dropout_p, seed,
                              attn_mask, mask_grad, need_dq, need_dkdv)
    return tuple(q_rot.new_empty(_EMPTY) if g is None else g for g in grads)


attention_bwd_op = torch.library.custom_op("rollingq::attention_bwd", mutates_args=(),
                                           tags=(torch.Tag.needs_exact_strides,))(attention_bwd_impl)


@attention_bwd_op.register_fake
def _(do, q_rot, k, v, out, lse, ids, causal, scale, rotation, rot_mask, dropout_p=0.0, seed=None, attn_mask=None,
      mask_grad=False, need_dq=True, need_dkdv=True):
    def maybe(make, needed):
        return make() if needed else q_rot.new_empty(_EMPTY)

    # dq, dk, dv in the layouts of out (the forward's q's) and of k and v (kernels/common.new_buffer)
    return (maybe(lambda: torch.empty_like(out, dtype=q_rot.dtype), need_dq),
            maybe(lambda: torch.empty_like(k), need_dkdv), maybe(lambda: torch.empty_like(v), need_dkdv),
            maybe(lambda: attn_mask.new_empty(attn_mask.shape), mask_grad))


def _no_double_backward(ctx, *grads):
    raise NotImplementedError(
        "rollingq_attention has no second derivative: its backward (q, k, v and attn_mask gradients) cannot be "
        "differentiated again, e.g. for a gradient penalty through torch.autograd.grad(..., "
        "create_graph=True); use rollingq.reference.rollingq_attention_reference for that")


# Registered so that a double backward fails with the message above instead of PyTorch's generic one.
attention_bwd_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _setup_context(ctx, inputs, output):
    q, k, v, ids, _, rotation, rot_mask, causal, scale, _, save_qrot, dropout_p, seed, attn_mask = inputs
    out, lse, q_rot, mass, key_sum = output
    ctx.mark_non_differentiable(lse, q_rot, mass, key_sum)
    # Their gradients stay None: materialised, autograd would fill a zero tensor for each, one of
    # q's size when q_rot is saved, alive through the backward (1 U on its peak memory).
    ctx.set_materialize_grads(False)
    # The rotation only turns dq back (dq = dq' R): kept only for q's gradient, so that a caller's
    # rotation written in place after the forward (it may be the very tensor passed) does not fail a
    # backward that never reads it.
    ctx.rotated = save_qrot and rotation is not None and ctx.needs_input_grad[0]  # rot_mask None: every row
    if not ctx.rotated:
        rotation = rot_mask = None
    # Without a saved rotated copy, the queries the forward used are q itself.
    ctx.save_for_backward(q_rot if save_qrot else q, k, v, out, lse, ids, rotation, rot_mask, seed, attn_mask)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p


def _backward(ctx, d_out, d_lse, d_qrot, d_mass, d_ksum):
    q_used, k, v, out, lse, ids, rotation, rot_mask, seed, attn_mask = ctx.saved_tensors
    if d_out is None:  # not materialised: no gradient reached the output, so none flows back
        return (None,) * len(ctx.needs_input_grad)
    # a float attn_mask that requires grad (a learned bias); a call may leave the mask out entirely
    mask_grad = len(ctx.needs_input_grad) > 13 and ctx.needs_input_grad[13]
    # Only the kernels whose gradients are wanted run (SDPA's grad_input_mask): frozen keys and
    # values skip dK/dV, a frozen query skips dQ unless a learned bias needs it.
    need_dq, need_dkdv = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dq, dk, dv, d_mask = attention_bwd_op(
        d_out, q_used, k, v, out, lse, ids, ctx.causal, ctx.scale,
        rotation if ctx.rotated else None, rot_mask if ctx.rotated else None, ctx.dropout_p, seed, attn_mask,
        mask_grad, need_dq, need_dkdv)
    return (dq if need_dq else None, dk if ctx.needs_input_grad[1] else None, dv if ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None, None, None, None, d_mask if mask_grad else None)


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# torch.utils.flop_counter.FlopCounterMode (MFU estimates) counts these ops as it counts SDPA: the
# two attention matmuls forward, five backward (the scores recomputed), causal or not; the rotation
# and the statistics are not counted. A backward that skips dQ (or dK/dV) counts what it runs.
@register_flop_formula(torch.ops.rollingq.attention_fwd)
def _fwd_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, Lq, D = q_shape
    return 4 * B * H * Lq * k_shape[2] * D


@register_flop_formula(torch.ops.rollingq.attention_bwd)
def _bwd_flops(do_shape, q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, Lq, D = q_shape
    # args: v .. attn_mask, mask_grad (index 11), need_dq, need_dkdv (positional as _backward passes them)
    mask_grad = args[11] if len(args) > 11 else kwargs.get("mask_grad", False)
    need_dq = args[12] if len(args) > 12 else kwargs.get("need_dq", True)
    need_dkdv = args[13] if len(args) > 13 else kwargs.get("need_dkdv", True)
    dq_kernel = bool(need_dq or mask_grad)  # it also forms a learned bias's gradient
    matmuls = 2 + dq_kernel + 2 * bool(need_dkdv)  # q.k and do.v, then ds.k; p.do and ds.q
    return 2 * matmuls * B * H * Lq * k_shape[2] * D
