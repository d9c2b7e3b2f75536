"""Plain PyTorch reference of `rollingq_attention`: the oracle of every parity test.

Written for clarity: the attention matrix is materialised, softmax is explicit, and everything is
differentiable through PyTorch's autograd. Run it in float64 for an exact answer; run it in the
kernel's dtype to learn how much error that dtype alone costs (design.md, "Numerics").
"""
from typing import Optional, Tuple

import torch

from .rotation import LowRankRotation
from .stats import AttentionStats
from .validation import Rotation, RotateRows, check_inputs, plain_scalars, rotate_row_mask


def modality_one_hot(ids: torch.Tensor, num_modalities: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, Lk] ids (-1 = padding) -> [B, Lk, M] one-hot; padding rows are all zero."""
    classes = torch.arange(num_modalities, device=ids.device)
    return (ids.unsqueeze(-1) == classes).to(dtype)


def key_counts(ids: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """[B, Lk] ids -> live keys per modality, [B, M] int64 (a bool compare, no int64 one-hot)."""
    return (ids.unsqueeze(-1) == torch.arange(num_modalities, device=ids.device)).sum(-2)


def rotate_queries(q: torch.Tensor, rotation: Rotation, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """q' = q @ rotation[h]^T on the rows selected by `rows` ([B, Lq] bool), q elsewhere. A
    LowRankRotation is made dense in float64 first (then cast to q's dtype, like a dense one)."""
    if rotation is None or rows is None:
        return q
    if isinstance(rotation, LowRankRotation):
        rotation = rotation.dense(torch.float64)
    rotated = torch.einsum("bhld,hed->bhle", q, rotation.detach().to(q.dtype))
    return torch.where(rows[:, None, :, None], rotated, q)


COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_compute_dtype(compute_dtype: Optional[torch.dtype]) -> None:
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise TypeError(f"compute_dtype must be None or one of {COMPUTE_DTYPES}, got {compute_dtype!r}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax's and the statistics' dtype for matmuls in `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_probs(q: torch.Tensor, k: torch.Tensor, ids: torch.Tensor, rotation: Rotation = None,
                    rotate_rows: RotateRows = None, causal: bool = False, scale: Optional[float] = None,
                    attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The attention probabilities [B, H, Lq, Lk] of `rollingq_attention_reference` (before dropout),
    from checked arguments and [B, Lk] ids: float32 (float64 for float64 q), differentiable, exactly
    0 on hidden keys and on rows without a live key. Computed in q's dtype (the caller casts)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    acc_dtype = _acc_dtype(q.dtype)
    live = ids >= 0  # [B, Lk]
    q = rotate_queries(q, rotation, rotate_row_mask(rotate_rows, B, Lq, q.device))
    kh = k.repeat_interleave(H // k.shape[1], dim=1)
    scores = (q @ kh.transpose(-1, -2)).to(acc_dtype) * scale  # [B, H, Lq, Lk]
    visible = live[:, None, None, :]
    if causal:
        visible = visible & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.to(acc_dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    # No keys at all (Lk = 0): every row is a row without a live key.
    row_max = scores.amax(-1, keepdim=True) if Lk else scores.new_zeros(B, H, Lq, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)  # exactly 0 on hidden keys
    denom = weights.sum(-1, keepdim=True)
    # A row with no live key has denom 0: its weights stay 0, so its output and mass are 0.
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def rollingq_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modality_ids: torch.Tensor,
    num_modalities: int,
    rotation: Rotation = None,
    rotate_rows: RotateRows = None,
    causal: bool = False,
    scale: Optional[float] = None,
    stats: bool = True,
    dropout_p: float = 0.0,
    attn_mask: Optional[torch.Tensor] = None,
    *,
    dropout_mask: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """Same signature and semantics as `rollingq.rollingq_attention`, in plain PyTorch.

    By default (`compute_dtype=None`) the rotation, scores and the two matmuls run in the inputs'
    dtype, the softmax in float32 (float64 for float64 inputs): the "reference in the kernel's own
    dtype" of the parity tests. Statistics are float32, or float64 for float64 inputs.

    `compute_dtype`: run the rotation, both matmuls and the softmax in this dtype instead (float32
    or float64; a 16-bit one keeps the softmax in float32, as 16-bit inputs do). q, k, v are cast
    to it, `out` is cast back to v's dtype and gradients reach the inputs in their own dtypes. The
    statistics follow it: float64 when it is float64, else float32. `rollingq_attention`'s CPU
    backend passes float32 for 16-bit inputs.

    `dropout_mask`: bool [B, H, Lq, Lk], True = kept, the mask to apply when dropout_p > 0 (e.g.
    the kernels' own, `rollingq.kernels.dropout.keep_mask`); None draws one with torch.rand. Kept
    probabilities are scaled by 1 / (1 - dropout_p).
    `attn_mask`: as `rollingq_attention`'s (bool: True = attend; float: added to the scaled scores).
    """
    num_modalities, rotate_rows, causal, scale, stats = plain_scalars(
        num_modalities, rotate_rows, causal, scale, stats)
    check_inputs(q, k, v, modality_ids, num_modalities, rotation, rotate_rows, causal, scale, dropout_p=dropout_p,
                 attn_mask=attn_mask, stats=stats)
    check_compute_dtype(compute_dtype)
    B, H = q.shape[:2]
    Hkv, Lk = k.shape[1], k.shape[2]
    out_dtype = v.dtype
    if compute_dtype is not None:  # differentiable casts: the gradients reach the inputs in their own dtype
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    acc_dtype = _acc_dtype(q.dtype)
    ids = modality_ids.expand(B, Lk) if modality_ids.dim() == 1 else modality_ids
    probs = attention_probs(q, k, ids, rotation, rotate_rows, causal, scale, attn_mask)
    vh = v.repeat_interleave(H // Hkv, dim=1)
    if dropout_mask is not None and not (isinstance(dropout_mask, torch.Tensor) and dropout_mask.dtype == torch.bool
                                         and tuple(dropout_mask.shape) == tuple(probs.shape)):
        raise ValueError(f"dropout_mask must be a bool tensor [B, H, Lq, Lk] = {list(probs.shape)}, got "
                         f"{getattr(dropout_mask, 'dtype', type(dropout_mask).__name__)} "
                         f"{tuple(getattr(dropout_mask, 'shape', ()))}")
    dropped = probs
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(probs.shape, device=q.device) >= dropout_p
        dropped = probs * dropout_mask.to(device=q.device) / (1 - dropout_p)
    out = (dropped.to(v.dtype) @ vh).to(out_dtype)

    if not stats:
        return out, None
    with torch.no_grad():
        onehot = modality_one_hot(ids, num_modalities, acc_dtype)  # [B, Lk, M]
        attn_mass = probs.detach() @ onehot[:, None]
        key_sum = onehot.transpose(1, 2)[:, None] @ k.detach().to(acc_dtype)  # [B, Hkv, M, D]
        key_count = key_counts(ids, num_modalities)
    return out, AttentionStats(attn_mass, key_sum, key_count)
