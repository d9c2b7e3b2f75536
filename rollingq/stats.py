"""The statistics record returned next to the attention output."""
from typing import NamedTuple

import torch


class AttentionStats(NamedTuple):
    """Per-modality statistics of one attention call (never differentiable).

    attn_mass: [B, H, Lq, M] float32. Share of each query row's softmax attention that lands on
        the keys of each modality; sums to 1 over a row's live keys, all zeros for a row with none.
    key_sum:   [B, Hkv, M, D] float32. Sum of the (unrotated) keys of each modality over live keys,
        independent of `causal` and of which query rows exist.
    key_count: [B, M] int64. Number of live keys of each modality.
    """

    attn_mass: torch.Tensor
    key_sum: torch.Tensor
    key_count: torch.Tensor
