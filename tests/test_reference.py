"""The reference against an independent explicit-loop computation in float64, and gradcheck."""
import math

import pytest
import torch

from rollingq.reference import rollingq_attention_reference


def loop_attention(q, k, v, ids, M, rot, rows, causal, scale):
    """One query row at a time, straight from the definitions in design.md."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = H // Hkv
    ids = ids.expand(B, Lk) if ids.dim() == 1 else ids
    out = torch.zeros(B, H, Lq, D, dtype=torch.float64)
    mass = torch.zeros(B, H, Lq, M, dtype=torch.float64)
    ksum = torch.zeros(B, Hkv, M, D, dtype=torch.float64)
    count = torch.zeros(B, M, dtype=torch.int64)
    for b in range(B):
        for j in range(Lk):
            m = int(ids[b, j])
            if m >= 0:
                count[b, m] += 1
                for hk in range(Hkv):
                    ksum[b, hk, m] += k[b, hk, j]
        for h in range(H):
            for i in range(Lq):
                qi = q[b, h, i]
                if rot is not None and rows is not None and bool(rows[b, i]):
                    qi = rot[h] @ qi
                keys = [j for j in range(Lk) if ids[b, j] >= 0 and (not causal or j <= i)]
                if not keys:
                    continue
                logits = torch.stack([scale * (qi @ k[b, h // g, j]) for j in keys])
                w = torch.softmax(logits, 0)
                for wj, j in zip(w, keys):
                    out[b, h, i] += wj * v[b, h // g, j]
                    mass[b, h, i, int(ids[b, j])] += wj
    return out, mass, ksum, count


def rand_rotation(h, d, gen):
    return torch.linalg.qr(torch.randn(h, d, d, generator=gen, dtype=torch.float64))[0]


@pytest.mark.parametrize("case", [
    # B, H, Hkv, Lq, Lk, D, M, causal, per_batch_ids
    (2, 2, 2, 5, 7, 4, 2, False, False),
    (2, 4, 2, 6, 6, 8, 3, True, True),
    (1, 3, 1, 9, 4, 4, 1, False, True),
    (3, 2, 1, 7, 7, 4, 4, True, False),
])
def test_reference_matches_loop(case):
    B, H, Hkv, Lq, Lk, D, M, causal, per_batch = case
    gen = torch.Generator().manual_seed(sum(case[:7]))
    q = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, D, generator=gen, dtype=torch.float64)
    ids = torch.randint(-1, M, (B, Lk) if per_batch else (Lk,), generator=gen)
    if per_batch:
        ids[0] = -1  # a batch with no live key at all
    rows = torch.rand(B, Lq, generator=gen) < 0.5
    rot = rand_rotation(H, D, gen)
    scale = 0.7
    out, st = rollingq_attention_reference(q, k, v, ids, M, rot, rows, causal, scale)
    lo, lm, lk, lc = loop_attention(q, k, v, ids, M, rot, rows, causal, scale)
    torch.testing.assert_close(out, lo, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st.attn_mass, lm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st.key_sum, lk, rtol=1e-10, atol=1e-12)
    assert torch.equal(st.key_count, lc)
    assert torch.isfinite(out).all() and torch.isfinite(st.attn_mass).all()


def test_rotate_rows_forms_agree():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64)
    k = torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 1, 1, 0])
    rot = rand_rotation(2, 4, gen)
    as_int, _ = rollingq_attention_reference(q, k, k, ids, 2, rot, 2)
    as_1d, _ = rollingq_attention_reference(q, k, k, ids, 2, rot, torch.arange(6) < 2)
    as_2d, _ = rollingq_attention_reference(q, k, k, ids, 2, rot, (torch.arange(6) < 2).expand(2, 6))
    none, _ = rollingq_attention_reference(q, k, k, ids, 2, rot, None)
    plain, _ = rollingq_attention_reference(q, k, k, ids, 2, None, None)
    torch.testing.assert_close(as_int, as_1d)
    torch.testing.assert_close(as_int, as_2d)
    torch.testing.assert_close(none, plain)
    assert (as_int - plain).abs().max() > 1e-3


def test_default_scale_is_inverse_sqrt_d():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, 5, 16, generator=gen, dtype=torch.float64) for _ in range(2))
    ids = torch.zeros(5, dtype=torch.long)
    a, _ = rollingq_attention_reference(q, k, k, ids, 1)
    b, _ = rollingq_attention_reference(q, k, k, ids, 1, scale=1 / math.sqrt(16))
    torch.testing.assert_close(a, b)


def test_gradcheck_through_rotation():
    gen = torch.Generator().manual_seed(2)
    B, H, Hkv, L, D = 2, 2, 1, 5, 4
    q = torch.randn(B, H, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 1, -1, 1, 0], [-1, -1, 0, 1, 1]])
    rot = rand_rotation(H, D, gen)

    def f(q, k, v):
        return rollingq_attention_reference(q, k, v, ids, 2, rot, 3, causal=True, stats=False)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_no_nan_gradient_on_empty_rows():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([-1, 0, 0])  # causal row 0 sees only padding
    out, _ = rollingq_attention_reference(q, k, k, ids, 1, causal=True)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert torch.all(out[0, 0, 0] == 0) and torch.all(q.grad[0, 0, 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compute_dtype_runs_in_that_dtype_and_returns_v_dtype(dtype):
    """compute_dtype=float64: the float64 result rounded once to the inputs' dtype, gradients in
    the inputs' dtype; None (the default) keeps the computation in the inputs' dtype."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, 1])
    rot = rand_rotation(2, 16, gen)
    g = torch.randn(1, 2, 8, 16, generator=gen).to(dtype)
    out, st = rollingq_attention_reference(q, k, v, ids, 2, rot, 3, compute_dtype=torch.float64)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, st64 = rollingq_attention_reference(q64, k64, v64, ids, 2, rot, 3)
    assert out.dtype == dtype and st.attn_mass.dtype == torch.float64 and st.key_sum.dtype == torch.float64
    assert torch.equal(out, out64.to(dtype))
    torch.testing.assert_close(st.attn_mass, st64.attn_mass, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads64 = torch.autograd.grad(out64, (q64, k64, v64), g.double())
    for got, want in zip(grads, grads64):
        assert got.dtype == dtype and torch.equal(got, want.to(dtype))
    default, st_default = rollingq_attention_reference(q, k, v, ids, 2, rot, 3)
    same, _ = rollingq_attention_reference(q, k, v, ids, 2, rot, 3, compute_dtype=dtype)
    assert torch.equal(default, same) and st_default.attn_mass.dtype == torch.float32


def test_compute_dtype_is_validated():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="compute_dtype must be None or one of"):
        rollingq_attention_reference(q, q, q, torch.zeros(4, dtype=torch.long), 1, compute_dtype=torch.int32)


def test_positional_signature_is_the_public_one():
    """design.md: the reference has the public function's signature. Its extras (dropout_mask,
    compute_dtype) are keyword-only, so a positional attn_mask means the same in both."""
    import inspect

    from rollingq import rollingq_attention

    public = list(inspect.signature(rollingq_attention).parameters.values())
    ref = inspect.signature(rollingq_attention_reference).parameters.values()
    positional = [p for p in ref if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in public]
    assert {p.name for p in ref if p.kind is p.KEYWORD_ONLY} == {"dropout_mask", "compute_dtype"}
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(1, 2, 5, 5, generator=gen) > 0.4
    mask[..., 0] = True
    ids = torch.tensor([0, 1, 0, 1, 1])
    pos, _ = rollingq_attention_reference(q, k, v, ids, 2, None, None, False, None, True, 0.0, mask)
    kw, _ = rollingq_attention_reference(q, k, v, ids, 2, attn_mask=mask)
    plain, _ = rollingq_attention_reference(q, k, v, ids, 2)
    assert torch.equal(pos, kw) and not torch.allclose(pos, plain)
