"""Benchmark shapes, their modality layouts, FLOP counts and random inputs.

Shape names read `B{batch}_H{heads}_L{length}_D{head dim}[_causal]`; query and key lengths are equal.

Modality layouts (key i belongs to the segment it falls in; segment s is modality class s):
- The paper's layer (and its 12-head twin) holds the tokens [CLS | 513 audio | 393 visual]. The CLS
  token gets its own class (M = 3: CLS = 0, audio = 1, visual = 2) so that attention to the fusion
  token is not credited to either modality; the controller reads only classes 1 and 2.
- The long shapes have two modalities, split half / half.
No shape has padding keys (-1): every peer then computes the same attention.

FLOPs follow docs/gpu.md: forward = 4 * B * H * Lq * Lk * D (half of that when causal), forward +
backward = 3.5x the forward. Every implementation of a shape is credited the same FLOPs, so TFLOP/s
compare time to solution, whatever extra work (rotation, statistics, a second pass) a path does.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from rollingq.rotation import LowRankRotation, low_rank_rotation, plane_rotation

DIRECTIONS = ("fwd", "fwdbwd")
FWDBWD_FACTOR = 3.5


def attention_flops(batch: int, heads: int, lq: int, lk: int, head_dim: int, causal: bool,
                    direction: str) -> float:
    """FLOPs credited to one attention call: 4*B*H*Lq*Lk*D forward, halved when causal, x3.5 for fwd+bwd."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    for name, value in (("batch", batch), ("heads", heads), ("lq", lq), ("lk", lk), ("head_dim", head_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    flops = 4.0 * batch * heads * lq * lk * head_dim
    if causal:
        flops *= 0.5
    if direction == "fwdbwd":
        flops *= FWDBWD_FACTOR
    return flops


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: q [B, H, L, D], k/v [B, Hkv, L, D], keys split into modality segments."""

    name: str
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    segments: Tuple[int, ...]  # consecutive key counts; segment s has modality id s
    causal: bool = False
    kv_heads: Optional[int] = None  # None: same as heads

    def __post_init__(self) -> None:
        if sum(self.segments) != self.seq_len:
            raise ValueError(f"{self.name}: segments {self.segments} must sum to seq_len {self.seq_len}")
        if self.heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: heads {self.heads} must be a multiple of kv_heads {self.num_kv_heads}")

    @property
    def num_kv_heads(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def num_modalities(self) -> int:
        return len(self.segments)

    def modality_ids(self, device) -> torch.Tensor:
        """int64 [L]: the modality class of each key (no padding)."""
        parts = [torch.full((n,), s, dtype=torch.int64) for s, n in enumerate(self.segments)]
        return torch.cat(parts).to(device)

    def flops(self, direction: str) -> float:
        return attention_flops(self.batch, self.heads, self.seq_len, self.seq_len, self.head_dim,
                               self.causal, direction)


def _halves(length: int) -> Tuple[int, int]:
    return (length // 2, length - length // 2)


# CLS | 513 audio | 393 visual (the paper's fusion layer).
PAPER_SEGMENTS = (1, 513, 393)
PAPER_LAYER = "B64_H1_L907_D768"

GPU_SHAPES: Tuple[Shape, ...] = (
    Shape(PAPER_LAYER, 64, 1, 907, 768, PAPER_SEGMENTS),
    Shape("B64_H12_L907_D64", 64, 12, 907, 64, PAPER_SEGMENTS),
    Shape("B4_H16_L4096_D128", 4, 16, 4096, 128, _halves(4096)),
    Shape("B4_H16_L8192_D64", 4, 16, 8192, 64, _halves(8192)),
    Shape("B2_H32_L8192_D128_causal", 2, 32, 8192, 128, _halves(8192), causal=True),
)
# Peak memory of fwd+bwd, rollingq against SDPA flash (design.md: within 1.1x at L = 16384).
MEMORY_SHAPE = Shape("B1_H16_L16384_D128", 1, 16, 16384, 128, _halves(16384))
# The tiny case that runs everywhere (CPU included) so `pytest bench/` always exercises the API.
CPU_SMOKE_SHAPE = Shape("B2_H2_L64_D32", 2, 2, 64, 32, _halves(64))

BY_NAME: Dict[str, Shape] = {s.name: s for s in GPU_SHAPES + (MEMORY_SHAPE, CPU_SMOKE_SHAPE)}


def random_rotation(heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """float32 [H, D, D]: a random rotation per head (orthogonal, det +1), made on the CPU in float64."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(heads, head_dim, head_dim, generator=gen, dtype=torch.float64)
    qmat, r = torch.linalg.qr(a)
    # Sign fix makes the factor unique (Haar-distributed); a column flip then gives det +1.
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    flip = torch.linalg.det(qmat) < 0
    qmat[flip, :, 0] = -qmat[flip, :, 0]
    return qmat.to(torch.float32)


def plane_rotation_factors(heads: int, head_dim: int, seed: int = 0) -> LowRankRotation:
    """A random plane rotation per head in the form `RollingQAttention` hands the kernel after
    RollingQ's default rotation (one minimal rotation): `LowRankRotation` of rank 2."""
    gen = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(2, heads, head_dim, generator=gen, dtype=torch.float64)
    return low_rank_rotation(plane_rotation(x, y).to(torch.float32))


@dataclass
class Inputs:
    """Random inputs of one shape. grad_out is the fixed upstream gradient of fwd+bwd runs.
    `rotation` is the product's rotation (RollingQ's plane rotation, factored as the module passes
    it); `dense_rotation` a general one (the paper's SVD construction turns the whole space), which
    the kernel must apply as a D x D matmul."""

    shape: Shape
    q: torch.Tensor  # [B, H, L, D]
    k: torch.Tensor  # [B, Hkv, L, D]
    v: torch.Tensor  # [B, Hkv, L, D]
    grad_out: torch.Tensor  # [B, H, L, D]
    modality_ids: torch.Tensor  # int64 [L]
    rotation: LowRankRotation  # float32 [H, D, 2] factors
    dense_rotation: torch.Tensor  # float32 [H, D, D]

    @property
    def leaves(self) -> Sequence[torch.Tensor]:
        return (self.q, self.k, self.v)


def make_inputs(shape: Shape, device, dtype: torch.dtype = torch.bfloat16, requires_grad: bool = False,
                seed: int = 0) -> Inputs:
    """Standard-normal q, k, v and grad_out (never zeros), the shape's modality ids, random rotations."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    b, h, hkv, n, d = shape.batch, shape.heads, shape.num_kv_heads, shape.seq_len, shape.head_dim

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v = randn(b, h, n, d), randn(b, hkv, n, d), randn(b, hkv, n, d)
    grad_out = randn(b, h, n, d)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    factors = plane_rotation_factors(h, d, seed)
    rotation = LowRankRotation(factors.left.to(device), factors.right.to(device))
    dense = random_rotation(h, d, seed).to(device)
    return Inputs(shape, q, k, v, grad_out, shape.modality_ids(device), rotation, dense)
