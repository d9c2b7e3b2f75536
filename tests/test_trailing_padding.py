"""Sequences of different lengths padded at the end: the forward and dQ key loops stop at each batch
row's last live key (kernels/common.live_key_ends). The skipped blocks hold only padding, so the
results equal those of the full loop bit for bit, and match the float64 reference."""
import pytest
import torch

import rollingq
from rollingq.functional import kernel_arguments, uses_kernel
from rollingq.kernels import common
from rollingq.reference import rollingq_attention_reference
from tests.numerics import assert_close_by_rule

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M = 3


def test_live_key_ends():
    ids = torch.tensor([[0, 1, -1, -1], [-1, -1, -1, -1], [2, -1, 0, -1], [0, 0, 0, 1]], dtype=torch.int32)
    assert common.live_key_ends(ids).tolist() == [2, 0, 3, 4]
    shared = torch.tensor([1, -1, 0, -1, -1], dtype=torch.int32).expand(3, 5)
    ends = common.live_key_ends(shared)
    assert ends.tolist() == [3, 3, 3] and ends.dtype == torch.int32 and ends.is_contiguous()
    # Only per-batch ids trim: a shared layout (and a batch of one) keeps the plain loop, also when
    # passed as a [B, Lk] batch view of another dtype (the cast must not make it per-batch).
    assert common.trims_padding(ids) and not common.trims_padding(shared) and not common.trims_padding(ids[:1])
    q = torch.empty(3, 1, 4, 8)
    cast, _, _ = kernel_arguments(q, torch.empty(3, 1, 5, 8), shared[0].long().expand(3, 5), None, None)
    assert cast.dtype == torch.int32 and cast.stride(0) == 0 and not common.trims_padding(cast)


def _problem(dtype, causal, seed, lengths=(45, 17, 13, 1, 0)):
    """Batch rows of the given lengths out of L = lengths[0] keys and queries: by default 45 (no
    padding), 17 (its last live key starts a 16-key block), 13, 1 and 0 (a row of padding only)."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, L, D = len(lengths), 2, 1, lengths[0], 16
    q, k, v = (torch.randn(B, h, L, D, generator=gen).to(DEVICE, dtype).requires_grad_() for h in (H, Hkv, Hkv))
    ids = torch.randint(0, M, (B, L), generator=gen)
    for b, length in enumerate(lengths):
        ids[b, length:] = -1
    rot = torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))[0].float().to(DEVICE)
    return q, k, v, ids.to(DEVICE), rot, torch.randn(B, H, L, D, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_right_padded_batch(dtype, causal, monkeypatch):
    check_right_padded(dtype, causal, (45, 17, 13, 1, 0), monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_right_padded_batch_cuda(dtype, causal, monkeypatch):
    """Real tiles (64-128 keys): rows that skip some blocks, all but one, and all."""
    check_right_padded(dtype, causal, (300, 130, 1, 0), monkeypatch)


def check_right_padded(dtype, causal, lengths, monkeypatch):
    q, k, v, ids, rot, grad = _problem(dtype, causal, seed=3 + causal, lengths=lengths)
    assert uses_kernel(q.device)
    # One fixed config per launch (common.deterministic): on a GPU the three runs below have
    # different autotune keys, and tiles chosen by timing could sum in different orders.
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)

    def run():
        out, st = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=3, causal=causal)
        return (out, st.attn_mass) + torch.autograd.grad(out, (q, k, v), grad)

    try:
        skipped = run()
        monkeypatch.setattr(common, "live_key_ends",
                            lambda ids: torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int32, device=ids.device))
        full = run()  # the trimming kernels, told every row is live
        monkeypatch.setattr(common, "trims_padding", lambda ids: False)
        plain = run()  # the kernels without trimming
    finally:  # a failure must not leave deterministic mode on for the tests after it
        torch.use_deterministic_algorithms(was)
    for a, b, c in zip(skipped, full, plain):
        assert torch.equal(a, b) and torch.equal(a, c)

    def ref(dt, r):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o, s = rollingq_attention_reference(qq, kk, vv, ids, M, r, 3, causal)
        return (o,) + torch.autograd.grad(o, (qq, kk, vv), grad.to(dt)), s

    (r64, s64), (rlp, _) = ref(torch.float64, rot.double()), ref(dtype, rot)
    for name, got, a, b in zip(("out", "dq", "dk", "dv"), skipped[:1] + skipped[2:], r64, rlp):
        assert_close_by_rule(name, got, a, b)
    assert (skipped[1].double() - s64.attn_mass).abs().max() <= (1e-5 if dtype == torch.float32 else 1e-3)
    assert not skipped[0][-1].any() and not skipped[1][-1].any()  # the row of padding only: zeros
