"""Attention dropout (kernels/dropout.py): the kernels' forward and gradients against the float64
reference given the same keep mask, on every path (single program with and without descriptors,
D split, wide split); the mask's own properties; the argument checks; the module and autograd
features that depend on the random stream (checkpointing, torch.compile)."""
import pytest
import torch

import rollingq
from rollingq.functional import dropout_seed, uses_kernel
from rollingq.kernels import attention_bwd as bwd
from rollingq.kernels import attention_fwd
from rollingq.kernels.dropout import KEEP_BITS, keep_mask, threshold
from rollingq.reference import rollingq_attention_reference
from tests.kernel_paths import DEVICE, force_d_split, force_wide_split, problem
from tests.numerics import CUDA_DROPOUT_SHAPES, assert_close_by_rule, stats_tol

# NaN-filled output buffers (tests/conftest.py): an unwritten element fails the test.
pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("poisoned_outputs")]
M = 3




def check(dtype, B=2, H=4, Hkv=2, L=37, D=16, causal=False, rows=5, p=0.3, seed=0):
    """Forward, statistics and gradients with dropout against the reference with the kernel's mask."""
    q, k, v, ids, rot, grad = problem(dtype, B, H, Hkv, L, D, seed)
    assert uses_kernel(q.device), "these tests must run the Triton kernels"
    torch.manual_seed(seed)
    out, st = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=rows, causal=causal,
                                          dropout_p=p)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    torch.manual_seed(seed)  # the same draw as the call's: the kernels' mask, rebuilt
    mask = keep_mask(dropout_seed(q.device), B, H, L, L, p)
    assert 0 < mask.float().mean().item() < 1

    def ref(dt, r):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        o, s = rollingq_attention_reference(qq, kk, vv, ids, M, r, rows, causal, dropout_p=p, dropout_mask=mask)
        return (o,) + torch.autograd.grad(o, (qq, kk, vv), grad.to(dt)), s

    r64, s64 = ref(torch.float64, rot.double())
    rlp, _ = ref(dtype, rot)
    for name, got, a, b in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), r64, rlp):
        assert_close_by_rule(name, got, a, b)
    # The statistics are those of the attention without dropout.
    assert (st.attn_mass.double() - s64.attn_mass).abs().max().item() <= stats_tol(dtype)
    return out, mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_single_program_path(dtype, causal, tma, monkeypatch):
    """GQA, padding, rotated rows; every kernel holds whole rows."""
    monkeypatch.setattr(attention_fwd, "USE_TMA", tma)
    monkeypatch.setattr(bwd, "USE_TMA", tma)
    check(dtype, causal=causal, D=40 if causal else 16, seed=1 + causal + 2 * tma)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_d_split_path(dtype, monkeypatch):
    """Heads wider than one program: every D chunk of the output draws the same mask."""
    force_d_split(monkeypatch)
    check(dtype, H=2, Hkv=1, D=40, causal=True, rows=9, seed=11)


@pytest.mark.parametrize("path", ["single", "d_split"])
def test_bf16_mass_branch(path, monkeypatch):
    """bf16's statistics branch (the mass dot in fp16; forced here with fp16 inputs, which the
    interpreter takes): the statistics still come from the probabilities before dropout."""
    monkeypatch.setattr(attention_fwd, "FORCE_MASS_F16", True)
    if path == "d_split":
        force_d_split(monkeypatch)
    check(torch.float16, H=2, Hkv=1, D=40 if path == "d_split" else 16, causal=path == "d_split", rows=5, seed=14)


def test_wide_split_path(monkeypatch):
    """The wide splits (forward and dQ), forced, with 16-wide chunks: D 72 is 5 chunks."""
    force_wide_split(monkeypatch)
    # dQ's wide split runs without the in-kernel rotation epilogue: rows rotated, dq rotated after.
    check(torch.float16, H=2, Hkv=1, D=72, causal=False, rows=9, seed=12)


def test_no_rotation_and_large_p():
    """p = 0.9 (few kept probabilities, scale 10) and no rotation at all."""
    check(torch.float32, D=24, rows=None, p=0.9, seed=13)


def test_mask_statistics():
    """The kept fraction is 1 - p; masks of different heads, batches and seeds are independent;
    the same seed gives the same mask (the backward's redraw)."""
    B, H, L = 2, 3, 64
    seed = torch.tensor([123456789123], dtype=torch.int64, device=DEVICE)
    mask = keep_mask(seed, B, H, L, L, 0.25)
    assert abs(mask.float().mean().item() - 0.75) < 0.02  # 24576 draws: 5 standard deviations is 0.014
    assert torch.equal(mask, keep_mask(seed, B, H, L, L, 0.25))
    # An element's draw depends on (batch, head, row, key) only: non-square masks are sub-blocks.
    assert torch.equal(keep_mask(seed, B, H, 40, 33, 0.25), mask[:, :, :40, :33])
    assert torch.equal(keep_mask(seed, B, H, 5, 64, 0.25), mask[:, :, :5])
    agree = 0.75 ** 2 + 0.25 ** 2  # two independent masks agree this often
    for other in (mask[0, 1], mask[1, 0], keep_mask(seed + 1, B, H, L, L, 0.25)[0, 0], mask[0, 0].T):
        assert abs((mask[0, 0] == other).float().mean().item() - agree) < 0.05
    assert threshold(0.25) == 1 << (KEEP_BITS - 2)
    assert keep_mask(seed, 1, 1, 8, 8, 0.0).all()  # (a p that would keep nothing is refused: below)


def test_dropout_changes_the_output_and_zero_changes_nothing():
    q, k, v, ids, rot, _ = problem(torch.float32, 1, 2, 2, 21, 16, 14)
    plain, st = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=3)
    zero, st0 = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=3, dropout_p=0.0)
    assert torch.equal(plain, zero) and torch.equal(st.attn_mass, st0.attn_mass)
    torch.manual_seed(0)
    a, sa = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=3, dropout_p=0.5)
    b, _ = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=3, dropout_p=0.5)
    torch.manual_seed(0)
    a2, _ = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=3, dropout_p=0.5)
    assert not torch.equal(a, plain) and not torch.equal(a, b)  # a new mask per call
    assert torch.equal(a, a2)  # repeated under torch.manual_seed
    assert torch.equal(sa.attn_mass, st.attn_mass)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), True, "0.1", None, 1 - 2 ** -17, 0.999999])
def test_bad_dropout_p(p):
    q, k, v, ids, _, _ = problem(torch.float32, 1, 1, 1, 8, 16, 15)
    with pytest.raises(ValueError, match="dropout_p"):
        rollingq.rollingq_attention(q, k, v, ids, M, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_p"):
        rollingq_attention_reference(q, k, v, ids, M, dropout_p=p)


def test_largest_dropout_still_keeps_and_keep_mask_checks_its_arguments():
    """Just below 1 - 2^-17 the 16-bit threshold is 2^16 - 1: a probability is kept when its draw is
    2^16 - 1 (1 in 65536). At 1 - 2^-17 the threshold would be 2^16 and drop every element: refused."""
    from rollingq.functional import dropout_seed
    from rollingq.kernels.dropout import keep_mask, threshold

    assert threshold(1 - 2 ** -17 - 1e-9) == 2 ** 16 - 1 and threshold(1 - 2 ** -17) == 2 ** 16
    seed = dropout_seed(torch.device("cpu"))
    assert keep_mask(seed, 1, 1, 8, 8, 1 - 2 ** -17 - 1e-9).shape == (1, 1, 8, 8)
    for bad, err in ((1.5, ValueError), (-0.5, ValueError), (float("nan"), ValueError), (1 - 2 ** -17, ValueError)):
        with pytest.raises(err, match="dropout_p"):
            keep_mask(seed, 1, 1, 8, 8, bad)
    with pytest.raises(ValueError, match="seed"):
        keep_mask(seed.to(torch.int32), 1, 1, 8, 8, 0.5)
    with pytest.raises(TypeError, match="seed"):
        keep_mask(7, 1, 1, 8, 8, 0.5)


def test_reference_mask_checked_and_launchers_need_a_seed():
    q, k, v, ids, _, _ = problem(torch.float32, 1, 2, 1, 8, 16, 16)
    for p in (0.1, 0.0):  # checked even where it is not applied
        with pytest.raises(ValueError, match="dropout_mask"):
            rollingq_attention_reference(q, k, v, ids, M, dropout_p=p, dropout_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="seed"):
        attention_fwd.rollingq_fwd(q.detach(), k.detach(), v.detach(), ids.to(torch.int32), M, None, None, False,
                                   0.25, False, False, 0.1, None)


def test_checkpointing_redraws_the_same_masks():
    """torch.utils.checkpoint restores the generator before its rerun, so the recomputed forward
    drops what the first one dropped: the gradients equal those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    q, k, v, ids, rot, grad = problem(torch.float32, 1, 2, 1, 19, 16, 17)

    def f(q, k, v):
        return rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=2, dropout_p=0.4,
                                           stats=False)[0]

    torch.manual_seed(3)
    plain = torch.autograd.grad(f(q, k, v), (q, k, v), grad)
    torch.manual_seed(3)
    ckpt = torch.autograd.grad(checkpoint(f, q, k, v, use_reentrant=False), (q, k, v), grad)
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


def test_module_drops_in_training_only():
    torch.manual_seed(0)
    layer = rollingq.RollingQAttention(32, 2, 2, dropout=0.5).to(DEVICE)
    x = torch.randn(2, 11, 32, device=DEVICE)
    ids = torch.randint(0, 2, (10,), device=DEVICE)
    train_a, _ = layer(x, ids)
    train_b, _ = layer(x, ids)
    layer.eval()
    eval_a, _ = layer(x, ids)
    eval_b, _ = layer(x, ids)
    assert not torch.equal(train_a, train_b) and torch.equal(eval_a, eval_b)
    assert "dropout=0.5" in repr(layer)
    with pytest.raises(ValueError, match="dropout"):
        rollingq.RollingQAttention(32, 2, 2, dropout=1.0)


def test_reference_backend_drops_too():
    """The CPU reference path (no interpreter) applies dropout with torch's generator."""
    from rollingq.functional import set_cpu_backend

    q, k, v, ids, _, _ = problem(torch.float32, 1, 2, 2, 16, 16, 18)
    previous = set_cpu_backend("reference")
    try:
        plain, _ = rollingq.rollingq_attention(q.cpu(), k.cpu(), v.cpu(), ids.cpu(), M)
        dropped, _ = rollingq.rollingq_attention(q.cpu(), k.cpu(), v.cpu(), ids.cpu(), M, dropout_p=0.5)
    finally:
        set_cpu_backend(previous)
    assert not torch.equal(plain, dropped)


def test_torch_compile_fullgraph():
    """Traced, the call draws its seed as eager does (the same masks under one torch.manual_seed),
    and a dropout_p that changes from call to call (a schedule) compiles without a graph break."""
    q, k, v, ids, rot, grad = problem(torch.float32, 1, 2, 2, 16, 16, 19)

    def f(q, k, v, p):
        return rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=2, dropout_p=p)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for p in (0.3, 0.2, 0.1):
        got = []
        for fn in (f, compiled):
            torch.manual_seed(7)
            out = fn(q, k, v, p)
            got.append((out,) + torch.autograd.grad(out, (q, k, v), grad))
        for a, b in zip(*got):
            assert torch.equal(a, b), p


def test_dropout_p_accepts_real_numbers():
    import numpy as np

    q, k, v, ids, _, _ = problem(torch.float32, 1, 1, 1, 8, 16, 21)
    for p in (0, np.float32(0.25), np.float64(0.25)):
        out, _ = rollingq.rollingq_attention(q, k, v, ids, M, dropout_p=p)
        assert torch.isfinite(out).all()
    assert rollingq.RollingQAttention(16, 1, 2, dropout=np.float32(0.5)).dropout == 0.5


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CUDA_DROPOUT_SHAPES)
def test_parity_cuda_large(dtype, shape):
    """Real tiles and the autotuner's choice on the GPU (bf16 too), with a dense rotation of 5 rows."""
    B, H, Hkv, L, D = shape
    check(dtype, B=B, H=H, Hkv=Hkv, L=L, D=D, rows=5, p=0.2, seed=D)


@pytest.mark.cuda
def test_cuda_graph_replays_draw_new_masks():
    """The seed is drawn on the device inside the captured work, so each replay drops differently."""
    q, k, v, ids, _, _ = problem(torch.float16, 2, 4, 2, 64, 64, 20)
    q, k, v = (t.detach() for t in (q, k, v))

    def f():
        return rollingq.rollingq_attention(q, k, v, ids, M, dropout_p=0.5, stats=False)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: autotuning, value checks
        f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = f()
    graph.replay()
    first = out.clone()
    graph.replay()
    assert torch.isfinite(first).all() and not torch.equal(first, out)
