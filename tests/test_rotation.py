"""Exact properties of rollingq.rotation (float64 math, method.md formulas)."""
import math

import pytest
import torch

from rollingq.rotation import (attention_imbalance, balanced_target, imbalance_sums, key_gap, plane_rotation,
                               svd_rotation)

ROTATIONS = [plane_rotation, svd_rotation]


def _unit(t):
    return t / t.norm(dim=-1, keepdim=True)


def _apply(R, x):
    return (R @ x[..., None])[..., 0]


def _check_rotation(R, x, y, tol=1e-12):
    D = R.shape[-1]
    eye = torch.eye(D, dtype=R.dtype)
    assert torch.isfinite(R).all()
    assert (R @ R.transpose(-1, -2) - eye).abs().max() < tol, "not orthogonal"
    assert (torch.linalg.det(R) - 1).abs().max() < tol, "det != +1"
    assert (_apply(R, _unit(x)) - _unit(y)).abs().max() < tol, "does not map x_hat to y_hat"


@pytest.mark.parametrize("make", ROTATIONS)
@pytest.mark.parametrize("D", [2, 3, 8, 64])
def test_rotation_maps_x_to_y_orthogonal_det1(make, D):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(5, D, dtype=torch.float64, generator=g)
    y = torch.randn(5, D, dtype=torch.float64, generator=g)
    R = make(x, y)
    assert R.shape == (5, D, D) and R.dtype == torch.float64
    _check_rotation(R, x, y)
    # Equal norms: R maps x itself onto y.
    y_eq = _unit(y) * x.norm(dim=-1, keepdim=True)
    assert (_apply(make(x, y_eq), x) - y_eq).abs().max() < 1e-11


@pytest.mark.parametrize("make", ROTATIONS)
def test_rotation_batched_heads_match_single(make):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=g)
    y = torch.randn(2, 3, 16, dtype=torch.float64, generator=g)
    R = make(x, y)
    assert R.shape == (2, 3, 16, 16)
    for i in range(2):
        for h in range(3):
            assert torch.allclose(R[i, h], make(x[i, h], y[i, h]), atol=1e-12)
    _check_rotation(R, x, y)


def test_plane_rotation_fixes_orthogonal_complement():
    g = torch.Generator().manual_seed(2)
    D = 12
    x = torch.randn(4, D, dtype=torch.float64, generator=g)
    y = torch.randn(4, D, dtype=torch.float64, generator=g)
    R = plane_rotation(x, y)
    # Random vectors with their span(x, y) components removed (Gram-Schmidt).
    u = _unit(x)
    v = _unit(y - (y * u).sum(-1, keepdim=True) * u)
    z = torch.randn(4, 7, D, dtype=torch.float64, generator=g)
    z = z - (z * u[:, None]).sum(-1, keepdim=True) * u[:, None]
    z = z - (z * v[:, None]).sum(-1, keepdim=True) * v[:, None]
    Rz = (R[:, None] @ z[..., None])[..., 0]
    assert (Rz - z).abs().max() < 1e-12
    # The plane itself really turns (not the identity) and by the angle between x and y.
    angle = torch.arccos((_unit(x) * _unit(y)).sum(-1))
    trace = torch.diagonal(R, dim1=-2, dim2=-1).sum(-1)
    assert torch.allclose(trace, (D - 2) + 2 * torch.cos(angle), atol=1e-12)


def test_svd_rotation_is_not_minimal_but_plane_is():
    """The two constructions agree on x -> y; only the plane one is the identity off the plane
    (guards against plane_rotation silently delegating to the SVD)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, dtype=torch.float64, generator=g)
    y = torch.randn(16, dtype=torch.float64, generator=g)
    Rp, Rs = plane_rotation(x, y), svd_rotation(x, y)
    assert (_apply(Rp, _unit(x)) - _apply(Rs, _unit(x))).abs().max() < 1e-12
    assert torch.linalg.matrix_rank(Rp - torch.eye(16, dtype=torch.float64)) == 2


@pytest.mark.parametrize("make", ROTATIONS)
def test_parallel_and_antiparallel(make):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 10, dtype=torch.float64, generator=g)
    # Parallel (different norms): maps and, for the plane rotation, is the identity.
    R = make(x, 2.5 * x)
    _check_rotation(R, x, 2.5 * x)
    if make is plane_rotation:
        assert (R - torch.eye(10, dtype=torch.float64)).abs().max() < 1e-12
    # Antiparallel: a rotation by pi in a plane containing x; no NaN.
    R = make(x, -0.5 * x)
    _check_rotation(R, x, -x)
    if make is plane_rotation:
        assert (torch.linalg.matrix_rank(R - torch.eye(10, dtype=torch.float64)) == 2).all()
        assert torch.equal(R, plane_rotation(x, -0.5 * x)), "antiparallel plane must be deterministic"
    # Antiparallel along a basis vector (ties in the choice of the orthogonal direction).
    e = torch.zeros(4, dtype=torch.float64)
    e[0] = 1.0
    _check_rotation(make(e, -e), e, -e)


def test_plane_rotation_nearly_antiparallel():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, dtype=torch.float64, generator=g)
    y = -x + 1e-9 * torch.randn(8, dtype=torch.float64, generator=g)
    _check_rotation(plane_rotation(x, y), x, y, tol=1e-9)


@pytest.mark.parametrize("make", ROTATIONS)
def test_rotation_dtype_and_errors(make):
    x = torch.randn(2, 8)
    y = torch.randn(2, 8)
    R = make(x, y)
    assert R.dtype == torch.float32
    _check_rotation(R.double(), x.double(), y.double(), tol=1e-6)
    with pytest.raises(ValueError, match="x must be nonzero"):
        make(torch.zeros(2, 8), y)
    with pytest.raises(ValueError, match="y must be nonzero"):
        make(x, torch.cat([y[:1], torch.zeros(1, 8)]))
    with pytest.raises(ValueError, match="same shape"):
        make(x, y[:, :4])
    with pytest.raises(TypeError, match="x must be floating"):
        make(torch.ones(8, dtype=torch.int64), y[0])


def _official_svd_rotation(qbar, t):
    """A literal transcription of the official steps, one head at a time."""
    M = torch.outer(t, qbar)
    U, S, Vh = torch.linalg.svd(M)
    R = U @ Vh
    if torch.linalg.det(R) < 0:
        U = U.clone()
        U[:, -1] = -U[:, -1]
        R = U @ Vh
    return R


def _svd_no_flip(qbar, t):
    U, _, Vh = torch.linalg.svd(torch.outer(t, qbar))
    return U @ Vh


def test_svd_rotation_matches_official_transcription():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(6, 9, dtype=torch.float64, generator=g)
    y = torch.randn(6, 9, dtype=torch.float64, generator=g)
    R = svd_rotation(x, y)
    dets = [float(torch.linalg.det(_svd_no_flip(x[h], y[h]))) for h in range(6)]
    assert min(dets) < 0 < max(dets), "the data must exercise both the flip and the no-flip branch"
    for h in range(6):
        assert torch.allclose(R[h], _official_svd_rotation(x[h], y[h]), atol=1e-10)
        assert torch.allclose(svd_rotation(x[h], y[h]), R[h], atol=1e-12)


@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.0, 4.0, -2.0])
def test_balanced_target_alpha_identity(sigma):
    g = torch.Generator().manual_seed(7)
    H, D = 3, 10
    kbar = torch.randn(H, 2, D, dtype=torch.float64, generator=g) * 3
    qbar = torch.randn(H, D, dtype=torch.float64, generator=g)
    c = torch.rand(H, 2, dtype=torch.float64, generator=g) * 2 - 1
    t, w = balanced_target(kbar, qbar, c, sigma)
    air = c[:, 0] - c[:, 1]
    alpha = (1 + torch.tanh(-sigma * air)) / 2
    assert torch.allclose(w[:, 0], alpha, atol=1e-14, rtol=0)
    assert torch.allclose(w.sum(-1), torch.ones(H, dtype=torch.float64))
    expected = alpha[:, None] * _unit(kbar[:, 0]) + (1 - alpha[:, None]) * _unit(kbar[:, 1])
    expected = expected / expected.norm(dim=-1, keepdim=True) * qbar.norm(dim=-1, keepdim=True)
    assert torch.allclose(t, expected, atol=1e-12)


def test_balanced_target_many_modalities():
    g = torch.Generator().manual_seed(8)
    kbar = torch.randn(4, 5, dtype=torch.float64, generator=g)
    qbar = torch.randn(5, dtype=torch.float64, generator=g)
    c = torch.tensor([0.5, -0.1, 0.2, 0.9], dtype=torch.float64)
    sigma = 1.5
    t, w = balanced_target(kbar, qbar, c, sigma)
    e = [math.exp(-2 * sigma * float(ci)) for ci in c]
    w_ref = torch.tensor([ei / sum(e) for ei in e], dtype=torch.float64)
    assert torch.allclose(w, w_ref, atol=1e-14)
    s = sum(float(w_ref[m]) * _unit(kbar[m]) for m in range(4))
    assert torch.allclose(t, s / s.norm() * qbar.norm(), atol=1e-12)
    # The favoured modality (largest c) gets the smallest weight when sigma > 0.
    assert int(w.argmin()) == int(c.argmax())


def _imbalance_loop(q, key_sum, key_count):
    B, H, D = q.shape
    Hkv, M = key_sum.shape[1], key_sum.shape[2]
    g = H // Hkv
    c = torch.zeros(H, M, dtype=torch.float64)
    for h in range(H):
        for m in range(M):
            vals = []
            for b in range(B):
                n = int(key_count[b, m])
                if n == 0:
                    continue
                kb = key_sum[b, h // g, m].double() / n
                qb = q[b, h].double()
                vals.append(float(qb @ kb) / (float(qb.norm()) * float(kb.norm())))
            c[h, m] = sum(vals) / len(vals)
    return c


@pytest.mark.parametrize("H,Hkv,M", [(2, 2, 2), (4, 2, 2), (3, 1, 3)])
def test_attention_imbalance_matches_loop(H, Hkv, M):
    g = torch.Generator().manual_seed(H * 10 + M)
    B, D = 5, 6
    q = torch.randn(B, H, D, generator=g)
    key_count = torch.randint(1, 5, (B, M), generator=g)
    key_count[1, 0] = 0  # sample 1 has no modality-0 key: left out of that modality's mean
    key_sum = torch.randn(B, Hkv, M, D, generator=g) * key_count[:, None, :, None]
    key_sum[1, :, 0] = 0
    c, air = attention_imbalance(q, key_sum, key_count)
    c_ref = _imbalance_loop(q, key_sum, key_count)
    assert c.shape == (H, M) and air.shape == (H,)
    assert torch.allclose(c.double(), c_ref, atol=1e-6)
    air_ref = c_ref[:, 0] - c_ref[:, 1] if M == 2 else c_ref.amax(-1) - c_ref.amin(-1)
    assert torch.allclose(air.double(), air_ref, atol=1e-6)
    # The sums helper is additive over batches.
    s1, n1 = imbalance_sums(q[:2], key_sum[:2], key_count[:2])
    s2, n2 = imbalance_sums(q[2:], key_sum[2:], key_count[2:])
    assert torch.allclose((s1 + s2) / (n1 + n2), c_ref, atol=1e-6)
    assert n1[0] + n2[0] == B - 1


def test_key_gap():
    g = torch.Generator().manual_seed(9)
    k = torch.randn(3, 2, 7, dtype=torch.float64, generator=g)
    cos = (k[:, 0] * k[:, 1]).sum(-1) / (k[:, 0].norm(dim=-1) * k[:, 1].norm(dim=-1))
    assert torch.allclose(key_gap(k), 1 - cos, atol=1e-14)
    k3 = torch.randn(3, 7, dtype=torch.float64, generator=g)
    pairs = [(0, 1), (0, 2), (1, 2)]
    ref = sum(1 - float(k3[i] @ k3[j]) / float(k3[i].norm() * k3[j].norm()) for i, j in pairs) / 3
    assert abs(float(key_gap(k3)) - ref) < 1e-14
    with pytest.raises(ValueError, match="kbar"):
        key_gap(torch.randn(1, 7))
