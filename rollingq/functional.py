"""Public functional API: argument checks and dispatch to the fused kernel or the reference."""
import os
from typing import Optional, Tuple

import torch

from .reference import rollingq_attention_reference
from .stats import AttentionStats
from .validation import SUPPORTED_DTYPES, RotateRows, check_inputs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_kernel(device: torch.device) -> bool:
    """True where `rollingq_attention` runs the Triton kernels: CUDA, or CPU under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())


def rollingq_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modality_ids: torch.Tensor,
    num_modalities: int,
    rotation: Optional[torch.Tensor] = None,
    rotate_rows: RotateRows = None,
    causal: bool = False,
    scale: Optional[float] = None,
    stats: bool = True,
) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """Multimodal attention with RollingQ query rotation and per-modality statistics.

    Args:
        q: [B, H, Lq, D] queries; k, v: [B, Hkv, Lk, D] with H % Hkv == 0 (GQA). One dtype among
            float16, bfloat16, float32. Strided views are accepted as they are.
        modality_ids: int [Lk] (shared by the batch) or [B, Lk]: the modality 0..M-1 of each key,
            or -1 for padding (the key is ignored).
        num_modalities: M, 1..16.
        rotation: [H, D, D] per-head rotation, or None. Selected rows use q' = q @ rotation[h]^T.
            Treated as a constant (no gradient).
        rotate_rows: which query rows are rotated: None (none), an int n (rows 0..n-1), or a bool
            mask [Lq] or [B, Lq].
        causal: query i sees keys 0..i; requires Lq == Lk.
        scale: softmax scale, default 1/sqrt(D).
        stats: False skips the statistics (plain fused attention) and returns None for them.

    Returns:
        out: [B, H, Lq, D] in v's dtype, differentiable in q, k, v.
        stats: `AttentionStats(attn_mass [B, H, Lq, M] float32, key_sum [B, Hkv, M, D] float32,
            key_count [B, M] int64)`, or None when stats=False. A row with no live key gets a zero
            output row and a zero mass row.
    """
    check_inputs(q, k, v, modality_ids, num_modalities, rotation, rotate_rows, causal, scale,
                 allowed_dtypes=SUPPORTED_DTYPES)
    return rollingq_attention_reference(
        q, k, v, modality_ids, num_modalities, rotation, rotate_rows, causal, scale, stats)
