"""Empty batches and sequences, and meta tensors: legal inputs with well-defined results."""
import pytest
import torch

import rollingq
from rollingq.reference import modality_one_hot
from tests.test_op_integration import DEVICE, random_problem

pytestmark = pytest.mark.kernel  # through the kernel path's dispatch (the interpreter on CPU)


@pytest.mark.parametrize("B, Lq, Lk, causal", [(0, 5, 5, True), (2, 0, 7, False), (2, 6, 0, False),
                                               (2, 0, 0, True)])
def test_empty_dimensions(B, Lq, Lk, causal):
    H, Hkv, D, M = 4, 2, 16, 3
    _, q, k, v, ids, rot = random_problem(torch.float32, B, H, Hkv, Lq, Lk, D, seed=0)
    out, st = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=Lq, causal=causal)
    assert out.shape == (B, H, Lq, D) and out.dtype == v.dtype
    assert st.attn_mass.shape == (B, H, Lq, M) and st.attn_mass.dtype == torch.float32
    assert st.key_sum.shape == (B, Hkv, M, D) and st.key_count.shape == (B, M)
    # No live key for any row when Lk = 0: zero rows, as for a fully padded row.
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(st.attn_mass, torch.zeros_like(st.attn_mass))
    # The key statistics do not depend on the query rows: with Lq = 0 they still sum the keys.
    onehot = modality_one_hot(ids, M, torch.float64)  # [B, Lk, M]
    expected = torch.einsum("bnm,bhnd->bhmd", onehot, k.detach().double())
    assert torch.allclose(st.key_sum.double(), expected, atol=1e-5)
    assert torch.equal(st.key_count, onehot.sum(1).long())
    if Lq and Lk:  # the B = 0 case: nothing more to check than the shapes
        return
    grad = torch.randn(out.shape, device=DEVICE)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad, allow_unused=True)
    for name, g, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert g is None or (g.shape == t.shape and torch.equal(g, torch.zeros_like(g))), name


def test_module_empty_batch():
    layer = rollingq.RollingQAttention(32, 2, 2).to(DEVICE)
    x = torch.randn(0, 9, 32, device=DEVICE, requires_grad=True)
    out, st = layer(x, torch.randint(0, 2, (8,), device=DEVICE), need_stats=True)
    assert out.shape == (0, 9, 32) and st.attn_mass.shape == (0, 2, 9, 3)
    out.sum().backward()
    assert x.grad.shape == (0, 9, 32)
    assert torch.equal(layer.q_proj.weight.grad, torch.zeros_like(layer.q_proj.weight))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_meta_tensors(dtype):
    B, H, Hkv, L, D, M = 2, 4, 2, 10, 16, 3
    q = torch.empty(B, H, L, D, device="meta", dtype=dtype)
    k = torch.empty(B, Hkv, L, D, device="meta", dtype=dtype)
    ids = torch.empty(L, device="meta", dtype=torch.long)
    rot = torch.empty(H, D, D, device="meta")
    out, st = rollingq.rollingq_attention(q, k, k, ids, M, rotation=rot, rotate_rows=2, causal=True)
    assert out.is_meta and out.shape == (B, H, L, D) and out.dtype == dtype
    assert st.attn_mass.shape == (B, H, L, M) and st.attn_mass.dtype == torch.float32
    assert st.key_sum.shape == (B, Hkv, M, D) and st.key_count.shape == (B, M)


def test_module_on_meta_device():
    # Deferred initialisation: build on meta, trace shapes, then materialise.
    with torch.device("meta"):
        layer = rollingq.RollingQAttention(64, 4, 2, kv_heads=2)
    x = torch.empty(3, 11, 64, device="meta")
    out, st = layer(x, torch.empty(10, dtype=torch.long, device="meta"), need_stats=True)
    assert out.is_meta and out.shape == (3, 11, 64) and st.key_sum.shape == (3, 2, 3, 16)
