"""Rotation math of RollingQ (method.md): rotations that map a query onto a target, the balanced
target, and the attention-imbalance statistics.

Everything is computed in float64 and returned in the inputs' floating dtype. Every function is
batched over leading dimensions (typically heads).
"""
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = [
    "LowRankRotation",
    "low_rank_rotation",
    "plane_rotation",
    "svd_rotation",
    "balanced_target",
    "attention_imbalance",
    "air_from_cos",
    "imbalance_sums",
    "sample_mean_keys",
    "key_gap",
]

# Below this sine the two directions are treated as (anti)parallel: the plane they span is then
# numerically undefined, so a deterministic one is chosen instead.
_DEGENERATE_SIN = 1e-12


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have shape [..., D], got a scalar")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape [..., D], got x {tuple(x.shape)}, y {tuple(y.shape)}")
    if x.shape[-1] < 2:
        raise ValueError(f"x and y need a dimension D >= 2 to define a rotation, got D = {x.shape[-1]}")
    if x.device != y.device:
        raise ValueError(f"x and y must be on one device, got x {x.device}, y {y.device}")
    for name, t in (("x", x), ("y", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} must be finite (it holds NaN or inf)")
        if bool((t.detach().abs().amax(-1) == 0).any()):
            raise ValueError(f"{name} must be nonzero: a zero vector has no direction to rotate")


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / torch.linalg.vector_norm(t, dim=-1, keepdim=True)


def _orthogonal_direction(u: torch.Tensor) -> torch.Tensor:
    """A deterministic unit vector orthogonal to each unit vector u [..., D]: the standard basis
    vector on which u is smallest (first such index), with its u component removed."""
    j = u.abs().argmin(-1, keepdim=True)
    e = torch.zeros_like(u).scatter_(-1, j, 1.0)
    # |e - u_j u|^2 = 1 - u_j^2 >= 1 - 1/D > 0, so this never vanishes.
    return _unit(e - u.gather(-1, j) * u)


def plane_rotation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The minimal rotation taking the direction of x to the direction of y.

    Args:
        x, y: [..., D] nonzero vectors, D >= 2 (batched over the leading dims, e.g. heads).

    Returns:
        R: [..., D, D] in the inputs' dtype, orthogonal with det +1, with R @ x/|x| = y/|y| (so
        R @ x = y when |x| == |y|), and the identity on the orthogonal complement of span(x, y).
        Parallel inputs give the identity; antiparallel inputs give the rotation by pi in the plane
        of x and a deterministic direction orthogonal to it.

    Closed form: with u = x/|x| and v the unit part of y/|y| orthogonal to u,
    R = I + sin(theta) (v u^T - u v^T) + (cos(theta) - 1) (u u^T + v v^T).
    """
    _check_pair(x, y)
    dtype = _out_dtype(x, y)
    u = _unit(x.detach().double())
    yh = _unit(y.detach().double())
    cos = (u * yh).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    w = yh - cos * u
    sin = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    degenerate = sin <= _DEGENERATE_SIN
    v = w / torch.where(degenerate, torch.ones_like(sin), sin)
    v = _unit(torch.where(degenerate, _orthogonal_direction(u), v - (u * v).sum(-1, keepdim=True) * u))
    # Degenerate cases: parallel -> theta = 0 (identity), antiparallel -> theta = pi.
    sin = torch.where(degenerate, torch.zeros_like(sin), sin)
    cos = torch.where(degenerate, torch.sign(cos), cos)
    angle = torch.atan2(sin, cos)[..., None]  # [..., 1, 1]
    uu = u[..., :, None] * u[..., None, :]
    vv = v[..., :, None] * v[..., None, :]
    vu = v[..., :, None] * u[..., None, :]
    eye = torch.eye(u.shape[-1], dtype=torch.float64, device=u.device)
    R = eye + torch.sin(angle) * (vu - vu.transpose(-1, -2)) + (torch.cos(angle) - 1.0) * (uu + vv)
    return R.to(dtype)


def svd_rotation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The official code's rotation: SVD of the outer product y x^T = U S V^T, R = U V^T, with U's
    last column flipped when det(R) < 0.

    Args:
        x, y: [..., D] nonzero vectors, D >= 2.

    Returns:
        R: [..., D, D] in the inputs' dtype, orthogonal with det +1, R @ x/|x| = y/|y|. Unlike
        `plane_rotation` it moves the rest of the space in an arbitrary (LAPACK-dependent) way, which
        need not be continuous: inputs that differ by rounding (sums taken in another order, as over
        another number of processes) can give rotations far apart that both map x to y.
    """
    _check_pair(x, y)
    dtype = _out_dtype(x, y)
    xd, yd = x.detach().double(), y.detach().double()
    D = xd.shape[-1]
    M = (yd[..., :, None] * xd[..., None, :]).reshape(-1, D, D)
    # One SVD per matrix: a batched call may pick another basis of the (D-1)-dim null space than
    # the official per-head call, and the rest of the space would turn differently.
    Rs = []
    for Mi in M:
        U, _, Vh = torch.linalg.svd(Mi)
        R = U @ Vh
        if torch.linalg.det(R) < 0:
            # The last singular value of a rank-1 matrix is 0 (D >= 2): flipping its column leaves
            # x -> y untouched and fixes the determinant.
            U = U.clone()
            U[:, -1] = -U[:, -1]
            R = U @ Vh
        Rs.append(R)
    R = torch.stack(Rs).reshape(xd.shape + (D,))
    return R.to(dtype)


class LowRankRotation(NamedTuple):
    """A per-head rotation stored as the identity plus a low-rank term: R = I + left @ right^T.

    RollingQ's minimal rotation (`plane_rotation`) differs from the identity in a 2-D plane, so
    after k of them R - I has rank at most 2k. Rotating a query row then costs 4 D r multiply-adds,
    q' = q + (q @ right) @ left^T, instead of 2 D^2 (at the paper's D = 768 and r = 2, 1/192).
    `rollingq_attention` accepts it wherever it accepts a dense [H, D, D] rotation.

    Fields:
        left, right: [H, D, r] floating point, one shape, 0 <= r <= D (r = 0: the identity).
    """
    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    def dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """[H, D, D] = I + left @ right^T, computed in float64, returned in `dtype` (default left's)."""
        lo, ro = self.left.detach().double(), self.right.detach().double()
        eye = torch.eye(lo.shape[-2], dtype=torch.float64, device=lo.device)
        return (eye + lo @ ro.transpose(-1, -2)).to(dtype or self.left.dtype)


def low_rank_rotation(rotation: torch.Tensor, max_rank: Optional[int] = None,
                      rtol: Optional[float] = None) -> Optional[LowRankRotation]:
    """Factor rotations [H, D, D] as `LowRankRotation` (I + left @ right^T), or None.

    R - I is factored by an SVD in float64 on the CPU (deterministic, so data-parallel ranks holding
    the same R get the same factors); singular values at or below `rtol` (default: the rounding
    noise of R's dtype, eps * sqrt(D)) are dropped, which changes q' = q @ R^T by at most that
    fraction of |q|. The rank r is the largest over heads (other heads' extra columns are zero).

    Returns:
        None when r > max_rank (a dense rotation is then cheaper); LowRankRotation with float32
        [H, D, r] factors on R's device otherwise, r = 0 (no column) when R is the identity.
    """
    if not isinstance(rotation, torch.Tensor) or rotation.dim() != 3 or rotation.shape[-1] != rotation.shape[-2] \
            or not rotation.dtype.is_floating_point:
        shape = tuple(rotation.shape) if isinstance(rotation, torch.Tensor) else type(rotation).__name__
        raise ValueError(f"rotation must be a floating point [H, D, D] tensor, got {shape}")
    H, D, _ = rotation.shape
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0):
        raise ValueError(f"max_rank must be None or an int >= 0, got {max_rank!r}")
    if rtol is None:
        rtol = torch.finfo(rotation.dtype).eps * D ** 0.5
    r64 = rotation.detach().to("cpu", torch.float64)
    # An inf makes the SVD's singular values NaN, which no `s > rtol` counts: rank 0, the identity.
    if not bool(torch.isfinite(r64.to(torch.float32)).all()):
        raise ValueError("rotation must be finite in float32 (it holds NaN or inf, or values past float32's range)")
    delta = r64 - torch.eye(D, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta)
    rank = int((s > rtol).sum(-1).max().item()) if H else 0
    if max_rank is not None and rank > max_rank:
        return None
    keep = (s[:, :rank] > rtol).to(torch.float64)  # a head's columns below its own rank: zero
    left = u[:, :, :rank] * (s[:, :rank] * keep)[:, None, :]
    right = vh[:, :rank, :].transpose(-1, -2)
    dev = rotation.device
    return LowRankRotation(left.to(dev, torch.float32), right.to(dev, torch.float32))


def balanced_target(kbar: torch.Tensor, qbar: torch.Tensor, c: torch.Tensor,
                    sigma: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The direction RollingQ rotates the mean fusion query to.

    Args:
        kbar: [..., M, D] dataset-mean keys of each modality.
        qbar: [..., D] mean (effective) fusion query.
        c: [..., M] mean cosine between the fusion query and each modality's keys.
        sigma: sharpness; 0 weights every modality equally.

    Returns:
        t: [..., D] = sum_m w_m kbar_m/|kbar_m|, rescaled so |t| = |qbar|. It is all zeros where
            the weighted sum vanishes (no direction to rotate to); callers must skip those.
        w: [..., M] = softmax(-2 sigma c) over M. For M = 2, w[0] = (1 + tanh(-sigma AIR)) / 2
            with AIR = c[0] - c[1], the official alpha.
    """
    for name, t in (("kbar", kbar), ("qbar", qbar), ("c", c)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating point torch.Tensor")
    if kbar.dim() < 2:
        raise ValueError(f"kbar must have shape [..., M, D], got {tuple(kbar.shape)}")
    M, D = kbar.shape[-2:]
    if qbar.shape != kbar.shape[:-2] + (D,):
        raise ValueError(f"qbar must have shape {tuple(kbar.shape[:-2]) + (D,)} to match kbar, got {tuple(qbar.shape)}")
    if c.shape != kbar.shape[:-1]:
        raise ValueError(f"c must have shape {tuple(kbar.shape[:-1])} to match kbar, got {tuple(c.shape)}")
    sigma = float(sigma)
    if sigma != sigma or abs(sigma) == float("inf"):
        raise ValueError(f"sigma must be a finite number, got {sigma!r}")
    dtype = _out_dtype(kbar, qbar, c)
    w = torch.softmax(-2.0 * sigma * c.detach().double(), dim=-1)
    kd = kbar.detach().double()
    # A zero mean key has no direction: it contributes nothing rather than NaN.
    kn = torch.linalg.vector_norm(kd, dim=-1, keepdim=True)
    kunit = kd / torch.where(kn > 0, kn, torch.ones_like(kn))
    t = (w[..., None] * kunit).sum(-2)
    tn = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    qn = torch.linalg.vector_norm(qbar.detach().double(), dim=-1, keepdim=True)
    t = torch.where(tn > 1e-12 * torch.clamp(qn, min=1.0), t * (qn / tn), torch.zeros_like(t))
    return t.to(dtype), w.to(dtype)


def sample_mean_keys(key_sum: torch.Tensor, key_count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean key of each modality.

    Args:
        key_sum: [B, Hkv, M, D] sum of each modality's keys; key_count: [B, M] live keys.

    Returns:
        kbar: [B, Hkv, M, D] float64 (zeros where a modality has no key), present: [B, M] bool.
    """
    if key_sum.dim() != 4:
        raise ValueError(f"key_sum must have shape [B, Hkv, M, D], got {tuple(key_sum.shape)}")
    B, _, M, _ = key_sum.shape
    if tuple(key_count.shape) != (B, M):
        raise ValueError(f"key_count must have shape [B, M] = [{B}, {M}], got {tuple(key_count.shape)}")
    count = key_count.detach().to(torch.float64)
    present = count > 0
    kbar = key_sum.detach().double() / torch.where(present, count, torch.ones_like(count))[:, None, :, None]
    return kbar, present


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine along the last dim, 0 where either vector is zero."""
    na = torch.linalg.vector_norm(a, dim=-1)
    nb = torch.linalg.vector_norm(b, dim=-1)
    den = na * nb
    return (a * b).sum(-1) / torch.where(den > 0, den, torch.ones_like(den))


def imbalance_sums(q: torch.Tensor, key_sum: torch.Tensor,
                   key_count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sums behind `attention_imbalance`, additive over batches, steps and ranks.

    Args:
        q: [B, H, D] effective (rotated) fusion query of each sample.
        key_sum: [B, Hkv, M, D]; key_count: [B, M]; H % Hkv == 0 (head h reads kv head h // (H/Hkv)).

    Returns:
        cos_sum: [H, M] float64, sum over samples of cos(q[b, h], kbar[b, h // g, m]), counting only
            samples where modality m has a key; n: [M] float64, the number of such samples.
    """
    if q.dim() != 3:
        raise ValueError(f"q must have shape [B, H, D], got {tuple(q.shape)}")
    kbar, present = sample_mean_keys(key_sum, key_count)
    B, H, D = q.shape
    Hkv = kbar.shape[1]
    if kbar.shape[0] != B or kbar.shape[3] != D:
        raise ValueError(f"key_sum must have shape [B, Hkv, M, D] = [{B}, Hkv, M, {D}] to match q, got {tuple(key_sum.shape)}")
    if H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of key_sum heads ({Hkv})")
    kh = kbar.repeat_interleave(H // Hkv, dim=1)  # [B, H, M, D]
    cos = _cosine(q.detach().double()[:, :, None, :], kh)  # [B, H, M]
    cos = cos * present[:, None, :]
    return cos.sum(0), present.sum(0).to(torch.float64)


def attention_imbalance(q: torch.Tensor, key_sum: torch.Tensor,
                        key_count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean cosine between the fusion query and each modality's mean key, and the AIR.

    Args:
        q: [B, H, D] effective (rotated) fusion query of each sample.
        key_sum: [B, Hkv, M, D] and key_count: [B, M], as in `AttentionStats` (for the module's
            stats, drop the last class, the fusion tokens, first).

    Returns:
        c: [H, M] in q's dtype, the mean over samples of cos(q[b, h], kbar[b, h // (H/Hkv), m]);
            samples without a key of modality m are left out of c[:, m] (NaN if no sample has one).
        air: [H], c[:, 0] - c[:, 1] for M == 2, max(c) - min(c) over modalities otherwise.
    """
    cos_sum, n = imbalance_sums(q, key_sum, key_count)
    c = cos_sum / n
    return c.to(q.dtype), air_from_cos(c).to(q.dtype)


def air_from_cos(c: torch.Tensor) -> torch.Tensor:
    """[..., M] mean cosines -> [...] AIR: c0 - c1 for M == 2, max - min otherwise."""
    if c.shape[-1] == 2:
        return c[..., 0] - c[..., 1]
    return c.amax(-1) - c.amin(-1)


def key_gap(kbar: torch.Tensor) -> torch.Tensor:
    """Key distribution gap of dataset-mean keys kbar [..., M, D], M >= 2: 1 - cos(kbar0, kbar1)
    for M == 2, the mean of 1 - cos over all pairs otherwise. Returns [...] in kbar's dtype."""
    if kbar.dim() < 2 or kbar.shape[-2] < 2:
        raise ValueError(f"kbar must have shape [..., M, D] with M >= 2, got {tuple(kbar.shape)}")
    M = kbar.shape[-2]
    kd = kbar.detach().double()
    i, j = torch.triu_indices(M, M, offset=1, device=kbar.device)
    gap = 1.0 - _cosine(kd[..., i, :], kd[..., j, :])
    return gap.mean(-1).to(kbar.dtype)
