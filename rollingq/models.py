"""Multimodal classifiers for the training program.

`MultimodalTransformer`: one encoder per modality (linear in-projection, learned positions, a few
`nn.TransformerEncoderLayer`), then a fusion step:
- "attention": `[fusion tokens | modality 0 tokens | modality 1 tokens | ...]` through one pre-norm
  Transformer block whose attention is `RollingQAttention`; the classifier reads the fusion
  token(s). The methods `vanilla` and `rollingq` share this model; `rollingq` attaches a controller.
- "concat": mean-pooled per-modality features concatenated -> linear classifier.
- "sum": mean-pooled per-modality features summed -> linear classifier.
Linear probes on the detached mean-pooled feature of each modality measure what each encoder
alone has learned (they train on their own loss and send no gradient into the encoders).
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .modules import RollingQAttention
from .stats import AttentionStats

FUSIONS = ("attention", "concat", "sum")


class ModelOutput(NamedTuple):
    """logits [B, K]; probe_logits: per modality [B, K]; stats: the fusion layer's AttentionStats
    (M + 1 classes, last = fusion tokens) when asked for, else None; q_fusion: [B, H, D] effective
    (rotated) fusion query, mean over the fusion tokens, when stats are returned, else None."""

    logits: torch.Tensor
    probe_logits: List[torch.Tensor]
    stats: Optional[AttentionStats]
    q_fusion: Optional[torch.Tensor]


class ModalityEncoder(nn.Module):
    """[B, L, F] -> [B, L, dim]: linear in-projection, learned positions, Transformer layers."""

    def __init__(self, in_features: int, tokens: int, dim: int, layers: int, heads: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(in_features, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout,
                                           batch_first=True, norm_first=True)
        # enable_nested_tensor only matters with padding masks (none here); off avoids its warning.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers else nn.Identity()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.encoder(self.proj(x) + self.pos))


class MultimodalTransformer(nn.Module):
    """Multimodal classifier.

    Args:
        in_features: F_m per modality; tokens: L_m per modality (M = len(in_features) >= 2).
        num_classes: K.
        fusion: "attention", "concat" or "sum".
        dim: token width E; enc_layers / enc_heads: per-modality encoder depth and heads.
        fusion_heads: heads of the RollingQAttention fusion layer (the paper uses one).
        num_fusion_tokens: learned fusion tokens in front of the modality tokens.
        rotate: "fusion" or "all", passed to RollingQAttention.
        dropout: dropout inside the encoders.
        attn_dropout: attention dropout of the RollingQAttention fusion layer.

    forward(xs, need_stats=False): xs is a sequence of M tensors [B, L_m, F_m]; returns
    `ModelOutput`.
    """

    def __init__(self, in_features: Sequence[int], tokens: Sequence[int], num_classes: int,
                 fusion: str = "attention", dim: int = 64, enc_layers: int = 2, enc_heads: int = 4,
                 fusion_heads: int = 1, num_fusion_tokens: int = 1, rotate: str = "fusion",
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if len(in_features) != len(tokens) or len(in_features) < 2:
            raise ValueError(f"in_features and tokens must list the same M >= 2 modalities, got "
                             f"{list(in_features)} and {list(tokens)}")
        self.fusion = fusion
        self.num_modalities = M = len(in_features)
        self.tokens = list(tokens)
        self.encoders = nn.ModuleList(ModalityEncoder(F, L, dim, enc_layers, enc_heads, dropout)
                                      for F, L in zip(in_features, tokens))
        self.probes = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(M))
        if fusion == "attention":
            self.fusion_tokens = nn.Parameter(torch.randn(1, num_fusion_tokens, dim) * 0.02)
            self.norm1 = nn.LayerNorm(dim)
            self.attn = RollingQAttention(dim, fusion_heads, M, num_fusion_tokens=num_fusion_tokens, rotate=rotate,
                                          dropout=attn_dropout)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
            ids = torch.cat([torch.full((L,), m, dtype=torch.long) for m, L in enumerate(tokens)])
            self.register_buffer("modality_ids", ids, persistent=False)
        elif fusion == "concat":
            self.head = nn.Linear(M * dim, num_classes)
        else:
            self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def attention_layers(self) -> List[RollingQAttention]:
        """The RollingQAttention layers (empty for the concat / sum baselines)."""
        return [m for m in self.modules() if isinstance(m, RollingQAttention)]

    def forward(self, xs: Sequence[torch.Tensor], need_stats: bool = False) -> ModelOutput:
        if len(xs) != self.num_modalities:
            raise ValueError(f"xs must hold {self.num_modalities} modality tensors, got {len(xs)}")
        feats = [enc(x) for enc, x in zip(self.encoders, xs)]  # [B, L_m, E]
        pooled = [f.mean(1) for f in feats]
        probe_logits = [p(f.detach()) for p, f in zip(self.probes, pooled)]
        if self.fusion == "concat":
            return ModelOutput(self.head(torch.cat(pooled, -1)), probe_logits, None, None)
        if self.fusion == "sum":
            return ModelOutput(self.head(torch.stack(pooled).sum(0)), probe_logits, None, None)
        B = feats[0].shape[0]
        nf = self.attn.num_fusion_tokens
        x = torch.cat([self.fusion_tokens.expand(B, -1, -1)] + feats, dim=1)
        h = self.norm1(x)
        a, stats = self.attn(h, self.modality_ids, need_stats=need_stats)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        logits = self.head(x[:, :nf].mean(1))
        q_fusion = None
        if need_stats:
            with torch.no_grad():
                # The effective fusion query as the layer uses it (rotated), mean over fusion tokens.
                H, D = self.attn.num_heads, self.attn.head_dim
                q = self.attn.q_proj(h[:, :nf]).view(B, nf, H, D).float().mean(1)
                q_fusion = torch.einsum("bhd,hed->bhe", q, self.attn.rotation.float())
        return ModelOutput(logits, probe_logits, stats, q_fusion)
