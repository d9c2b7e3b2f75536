"""The user's attention mask (kernels/attn_mask.py, SDPA's `attn_mask`): forward, statistics and
gradients against the float64 reference on every kernel path (single program with and without
descriptors, D split, wide split), both kinds (bool, float bias), broadcast and strided forms,
rows the mask hides entirely; the convention against SDPA; argument checks; torch.compile; the
module's nn.MultiheadAttention convention."""
import pytest
import torch
import torch.nn.functional as F

import rollingq
from rollingq.functional import dropout_seed, set_cpu_backend, uses_kernel
from rollingq.kernels import attention_bwd as bwd
from rollingq.kernels import attention_fwd
from rollingq.kernels.dropout import keep_mask
from rollingq.reference import attention_probs, rollingq_attention_reference
from tests.kernel_paths import DEVICE, force_d_split, force_wide_split, problem
from tests.numerics import CUDA_MASK_SHAPES, assert_bias_grad_close, assert_close_by_rule, mask_shape, stats_tol

# NaN-filled output buffers (tests/conftest.py): an unwritten element fails the test.
pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("poisoned_outputs")]
M = 3




def make_mask(kind, shape, dtype, seed, hidden_row=None):
    """A bool mask (True = attend, about 70%) or a float bias (normal, some -inf), in `shape`;
    `hidden_row` is hidden entirely (every mask row that broadcasts onto it)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) < 0.7
    else:
        mask = 2 * torch.randn(shape, generator=gen)
        mask[torch.rand(shape, generator=gen) < 0.2] = float("-inf")
        mask = mask.to(dtype)
    if hidden_row is not None:
        mask[..., hidden_row, :] = False if kind == "bool" else float("-inf")
    return mask.to(DEVICE)


def delta_term(q, k, ids, rot, rows, causal, mask, grad, out, out64):
    """p64_ij * |do_i . (out_i - out64_i)|, summed to the mask's shape (numerics.assert_bias_grad_close)."""
    ids2 = ids.expand(q.shape[0], k.shape[2]) if ids.dim() == 1 else ids
    p64 = attention_probs(q.detach().double(), k.detach().double(), ids2, None if rot is None else rot.double(),
                          rows, causal, None, mask.detach().double())
    row = (grad.double() * (out.detach().double() - out64.detach())).sum(-1).abs()
    return (p64 * row[..., None]).sum_to_size(mask.shape)


def check(dtype, kind, B=2, H=4, Hkv=2, L=37, D=16, causal=False, rows=5, seed=0, shape=None, p=0.0,
          hidden_row=None, mask=None, mask_grad=False, ids=None):
    """Forward, statistics and gradients with the mask against the float64 reference; with
    `mask_grad` the (float) mask requires grad and its gradient is checked too."""
    q, k, v, rand_ids, rot, grad = problem(dtype, B, H, Hkv, L, D, seed)
    ids = rand_ids if ids is None else ids
    assert uses_kernel(q.device), "these tests must run the Triton kernels"
    if mask is None:
        mask = make_mask(kind, shape or mask_shape(kind, B, H, L, L), dtype, seed, hidden_row)
    leaves = (q, k, v)
    if mask_grad:
        mask = mask.detach().requires_grad_()
        leaves += (mask,)
    torch.manual_seed(seed)
    out, st = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=rows, causal=causal,
                                          dropout_p=p, attn_mask=mask)
    grads = torch.autograd.grad(out, leaves, grad)
    dq, dk, dv = grads[:3]
    keep = None
    if p:
        torch.manual_seed(seed)  # the same draw as the call's: the kernels' dropout mask, rebuilt
        keep = keep_mask(dropout_seed(q.device), B, H, L, L, p)

    def ref(dt, r):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        refs = (qq, kk, vv)
        mm = mask
        if mask_grad:  # in float64 for the exact run, in its own dtype for the low-precision one
            mm = mask.detach().to(dt if dt == torch.float64 else mask.dtype).requires_grad_()
            refs += (mm,)
        o, s = rollingq_attention_reference(qq, kk, vv, ids, M, r, rows, causal, dropout_p=p, dropout_mask=keep,
                                            attn_mask=mm)
        return (o,) + torch.autograd.grad(o, refs, grad.to(dt)), s

    r64, s64 = ref(torch.float64, None if rot is None else rot.double())
    rlp, _ = ref(dtype, rot)
    for name, got, a, b in zip(("out", "dq", "dk", "dv"), (out,) + grads[:3], r64, rlp):
        assert_close_by_rule(name, got, a, b)
    if mask_grad:
        assert grads[3].shape == mask.shape and grads[3].dtype == mask.dtype
        assert_bias_grad_close(grads[3], r64[4], rlp[4], delta_term(q, k, ids, rot, rows, causal, mask, grad, out,
                                                                    r64[0]))
    assert (st.attn_mass.double() - s64.attn_mass).abs().max().item() <= stats_tol(dtype)
    return out, st, (dq, dk, dv)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_single_program_path(dtype, kind, tma, monkeypatch):
    """GQA, padding ids, rotated rows, a row the mask hides; causal on half of the cases."""
    monkeypatch.setattr(attention_fwd, "USE_TMA", tma)
    monkeypatch.setattr(bwd, "USE_TMA", tma)
    causal = (kind == "bool") == tma
    check(dtype, kind, causal=causal, D=40 if causal else 16, seed=1 + 2 * tma + (kind == "bool"), hidden_row=6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_d_split_path(dtype, monkeypatch):
    """Heads wider than one program: every D chunk of the output and of dk/dv/dq reads the mask."""
    force_d_split(monkeypatch)
    check(dtype, "float", H=2, Hkv=1, D=40, causal=True, rows=9, seed=11)


def test_wide_split_path(monkeypatch):
    """The wide splits (forward and dQ), forced, with 16-wide chunks: D 72 is 5 chunks."""
    force_wide_split(monkeypatch)
    check(torch.float16, "bool", H=2, Hkv=1, D=72, rows=9, seed=12)


@pytest.mark.parametrize("form", ["keys", "square", "head_keys", "batch_rows", "transposed", "full"])
def test_broadcast_and_strided_forms(form):
    """Every broadcastable shape reaches the kernels as a stride-0 view; a transposed view is
    read through its strides."""
    B, H, L = 2, 4, 21
    shapes = {"keys": (L,), "square": (L, L), "head_keys": (1, H, 1, L), "batch_rows": (B, 1, L, 1),
              "full": (B, H, L, L)}
    if form == "transposed":
        mask = make_mask("float", (B, H, L, L), torch.float32, 5).transpose(-1, -2)
        assert not mask.is_contiguous()
    else:
        mask = make_mask("float" if form in ("square", "batch_rows") else "bool", shapes[form], torch.float32, 5)
    check(torch.float32, None, B=B, H=H, L=L, mask=mask, seed=13, causal=form == "square")


def test_with_dropout():
    """Both masks at once: the dropout draw acts on the attention the user's mask leaves."""
    check(torch.float16, "bool", D=24, p=0.3, seed=14, hidden_row=3)


# The two ways dQ forms a bias's gradient (kernels/attn_mask.grad_plan): a bias shared by the batch
# ([1, H, L, L], contiguous) gets its ds tiles added by atomics into its own shape; a full
# [B, H, L, L] one has them stored into a dense buffer (and the skipped key blocks zero-filled).
PLANS = {"shared": lambda B, H, L: (1, H, L, L), "dense": lambda B, H, L: (B, H, L, L)}


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_bias_gradient_single_program(dtype, tma, plan, monkeypatch):
    """A bias that requires grad gets d(bias) = ds, summed over its broadcast dims: with GQA,
    padding ids, rotated rows, a hidden row; causal with descriptors, so the key blocks past the
    diagonal, which the dQ loop skips, get zero gradient."""
    monkeypatch.setattr(attention_fwd, "USE_TMA", tma)
    monkeypatch.setattr(bwd, "USE_TMA", tma)
    check(dtype, "float", causal=tma, D=40 if tma else 16, seed=31 + tma, hidden_row=6, mask_grad=True,
          shape=PLANS[plan](2, 4, 37))


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_bias_gradient_d_split_path(plan, monkeypatch):
    """Every D-split program of a query block computes the same ds; one stores (or adds) it."""
    force_d_split(monkeypatch)
    check(torch.float32, "float", H=2, Hkv=1, D=40, causal=True, rows=9, seed=33, mask_grad=True,
          shape=PLANS[plan](2, 2, 37))


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_bias_gradient_wide_split_path(plan, monkeypatch):
    """The wide dQ split: two programs per query block, one stores (or adds) ds."""
    force_wide_split(monkeypatch)
    check(torch.float16, "float", H=2, Hkv=1, D=72, rows=9, seed=34, mask_grad=True, shape=PLANS[plan](2, 2, 37))


def test_bias_gradient_with_dropout():
    """ds under dropout, p * (z * dp / (1 - p_drop) - delta), is the bias's gradient too."""
    check(torch.float16, "float", D=24, p=0.3, seed=35, hidden_row=3, mask_grad=True)


@pytest.mark.parametrize("form", ["keys", "square", "per_batch", "per_head", "batch_rows", "full_fp16", "transposed"])
def test_bias_gradient_broadcast_forms(form):
    """The gradient comes back in the mask's own shape and dtype: added up by atomics where the
    bias is shared by batch or heads ([L, L], [B, 1, L, L], [H, L, L]), summed in float32 over the
    broadcast dims of a dense buffer otherwise, or stored directly for a full [B, H, L, L] mask
    (fp16 mask, fp32 inputs)."""
    B, H, L = 2, 4, 21
    shapes = {"keys": (L,), "square": (L, L), "per_batch": (B, 1, L, L), "per_head": (H, L, L),
              "batch_rows": (B, 1, L, 1), "full_fp16": (B, H, L, L)}
    if form == "transposed":
        mask = make_mask("float", (B, H, L, L), torch.float32, 36).transpose(-1, -2)
    else:
        mask = make_mask("float", shapes[form], torch.float16 if form == "full_fp16" else torch.float32, 36)
    check(torch.float32, None, B=B, H=H, L=L, mask=mask, seed=36, causal=form == "square", mask_grad=True)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_bias_gradient_past_trailing_padding(plan):
    """Per-batch ids padded at the end: the dQ loop stops at each row's last live key (TRIM), and
    the key blocks after it get a zero bias gradient."""
    B, L = 3, 37
    ids = torch.randint(0, M, (B, L), generator=torch.Generator().manual_seed(37)).to(DEVICE)
    ids[0, 10:] = -1
    ids[1, 21:] = -1
    check(torch.float32, "float", B=B, L=L, seed=37, mask_grad=True, ids=ids, shape=PLANS[plan](B, 4, L))


@pytest.mark.parametrize("shape, contiguous, deterministic, plan", [
    ((1, 4, 9, 11), True, False, "shared"), ((4, 9, 11), True, False, "shared"), ((9, 11), True, False, "shared"),
    ((2, 1, 9, 11), True, False, "shared"), ((2, 4, 9, 11), True, False, "dense"), ((11,), True, False, "dense"),
    ((1, 4, 1, 11), True, False, "dense"), ((2, 1, 9, 1), True, False, "dense"), ((1, 4, 9, 11), False, False, "dense"),
    ((1, 4, 9, 11), True, True, "dense")])
def test_gradient_plan(shape, contiguous, deterministic, plan):
    """Atomics only where a tile's elements have distinct addresses (the bias's Lq and Lk dims are
    whole), the bias is shared by batch or heads, its strides are its shape's, and the run need not
    repeat bit for bit; the dense buffer otherwise."""
    from rollingq.kernels.attn_mask import DENSE_GRAD, SHARED_GRAD, grad_plan

    bias = torch.zeros(shape) if contiguous else torch.zeros(shape[:-2] + shape[:-3:-1]).transpose(-1, -2)
    assert grad_plan(bias, 2, 4, 9, 11, deterministic) == {"shared": SHARED_GRAD, "dense": DENSE_GRAD}[plan]


def test_shared_bias_gradient_survives_autotuning(monkeypatch):
    """On a GPU the autotuner times its configs on the real arguments before the launch it keeps,
    and the shared path's atomics would add every timed run into the bias's gradient (the
    interpreter has one config and never times). Made to time here (two configs, three runs
    each), the gradient must still be that of one launch: the pre-hook zeroes the buffer."""
    timed = []

    def fake_bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        timed.append(1)
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(bwd._bwd_dq, "configs", bwd._to_configs([bwd._INTERPRET_DQ, (16, 16, 4, 1)], WIDE=0))
    monkeypatch.setattr(bwd._bwd_dq, "cache", {})
    monkeypatch.setattr(bwd._bwd_dq, "_do_bench", fake_bench)
    check(torch.float32, "float", B=2, H=2, Hkv=1, L=21, D=16, seed=43, mask_grad=True)  # [1, H, L, L]: atomics
    assert timed


def test_shared_bias_gradient_under_deterministic_algorithms():
    """torch.use_deterministic_algorithms(True): the dense path (no atomics), bit for bit the same
    from run to run, and equal to the atomics' result to float32 rounding."""
    q, k, v, ids, rot, grad = problem(torch.float32, 2, 2, 1, 21, 16, 42)
    bias = make_mask("float", (1, 2, 21, 21), torch.float32, 42).requires_grad_()

    def bias_grad():
        out, _ = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=3, attn_mask=bias)
        return torch.autograd.grad(out, bias, grad)[0]

    by_atomics = bias_grad()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = bias_grad(), bias_grad()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(first, second) and (first - by_atomics).abs().max().item() < 1e-5


def test_bias_gradient_alone():
    """Only the bias requires grad (q, k, v do not): the forward still saves its rotated queries,
    and the bias's gradient matches the float64 reference."""
    q, k, v, ids, rot, grad = problem(torch.float32, 2, 2, 1, 19, 16, 38)
    q, k, v = q.detach(), k.detach(), v.detach()
    mask = make_mask("float", (2, 19), torch.float32, 38)[:, None, None, :].requires_grad_()
    out, _ = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=4, attn_mask=mask)
    (got,) = torch.autograd.grad(out, mask, grad)
    m64 = mask.detach().double().requires_grad_()
    o64, _ = rollingq_attention_reference(q.double(), k.double(), v.double(), ids, M, rot.double(), 4,
                                          attn_mask=m64)
    (want,) = torch.autograd.grad(o64, m64, grad.double())
    assert got.shape == mask.shape and (got.double() - want).abs().max().item() < 1e-5


def test_bias_gradient_matches_sdpa():
    """The same gradient as torch.nn.functional.scaled_dot_product_attention's for its attn_mask
    (no padding ids, no rotation)."""
    gen = torch.Generator().manual_seed(39)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=gen).to(DEVICE) for _ in range(3))
    grad = torch.randn(2, 3, 17, 16, generator=gen).to(DEVICE)
    ids = torch.zeros(17, dtype=torch.long, device=DEVICE)
    bias = torch.randn(1, 3, 17, 17, generator=gen).to(DEVICE).requires_grad_()
    out, _ = rollingq.rollingq_attention(q, k, v, ids, 1, attn_mask=bias, scale=0.3)
    (got,) = torch.autograd.grad(out, bias, grad)
    want_out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    (want,) = torch.autograd.grad(want_out, bias, grad)
    assert (got - want).abs().max().item() < 1e-5 and got.abs().max().item() > 1e-3


def test_hidden_rows_are_zero_and_finite():
    """A query row that the mask (or the mask with the padding ids) leaves no key gets a zero
    output, a zero mass row and zero gradients: no NaN, as for rows without a live key."""
    q, k, v, ids, _, grad = problem(torch.float32, 1, 2, 2, 19, 16, 15)
    for kind in ("bool", "float"):
        mask = make_mask(kind, (1, 2, 19, 19), torch.float32, 16, hidden_row=4)
        out, st = rollingq.rollingq_attention(q, k, v, ids, M, attn_mask=mask)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
        assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
        assert torch.isfinite(dv).all()
        assert (out[:, :, 4] == 0).all() and (st.attn_mass[:, :, 4] == 0).all() and (dq[:, :, 4] == 0).all()


def test_neutral_masks_change_nothing():
    """An all-True bool mask and an all-zero bias give bit for bit the forward without a mask, and
    the bool mask its gradients too (a bias's backward forms p from the row max and log2 sum kept
    apart, common.lse_shape: equal to rounding; without a mask s * scale - m may fuse to one FMA)."""
    q, k, v, ids, rot, grad = problem(torch.float32, 2, 2, 1, 23, 16, 17)
    base = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=2)
    base_g = torch.autograd.grad(base[0], (q, k, v), grad)
    for mask in (torch.ones(23, 23, dtype=torch.bool, device=DEVICE), torch.zeros(23, 23, device=DEVICE)):
        out, st = rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=2, attn_mask=mask)
        assert torch.equal(out, base[0]) and torch.equal(st.attn_mass, base[1].attn_mass)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), base_g):
            assert torch.equal(a, b) if mask.dtype == torch.bool else (a - b).abs().max().item() < 1e-5
    # ... and a mask that hides something changes the output.
    hide = torch.ones(23, 23, dtype=torch.bool, device=DEVICE).tril()
    assert not torch.equal(rollingq.rollingq_attention(q, k, v, ids, M, attn_mask=hide)[0],
                           rollingq.rollingq_attention(q, k, v, ids, M)[0])


def test_convention_matches_sdpa():
    """True = attend and a float mask added to the scaled scores, as in
    torch.nn.functional.scaled_dot_product_attention (no padding ids, no rotation)."""
    gen = torch.Generator().manual_seed(18)
    q, k, v = (torch.randn(2, 3, 17, 16, generator=gen).to(DEVICE) for _ in range(3))
    ids = torch.zeros(17, dtype=torch.long, device=DEVICE)
    for mask in (torch.rand(2, 1, 17, 17, generator=gen).to(DEVICE) < 0.6,
                 torch.randn(1, 3, 17, 17, generator=gen).to(DEVICE)):
        if mask.dtype == torch.bool:
            mask[..., 0] = True  # no row without a key: rollingq gives zeros there, SDPA's backends differ
        out, _ = rollingq.rollingq_attention(q, k, v, ids, 1, attn_mask=mask, scale=0.3)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        assert (out - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("bad,exc,match", [
    (torch.ones(2, 2, 5, 9, dtype=torch.bool), ValueError, "broadcast"),
    (torch.ones(9, 8, dtype=torch.bool), ValueError, "broadcast"),
    (torch.ones(1, 1, 1, 9, 9, dtype=torch.bool), ValueError, "broadcast"),
    (torch.ones(9, 9, dtype=torch.int32), TypeError, "attn_mask must be bool"),
    (torch.zeros(9, 9, dtype=torch.float64), TypeError, "attn_mask must be bool"),
    (torch.tensor([[float("nan")] * 9] * 9), ValueError, "NaN"),
    (torch.full((9, 9), float("inf")), ValueError, "NaN"),
    (torch.full((9, 9), 2.4e38), ValueError, "above 1e.38"),  # the kernels' base-2 bias would overflow
    (torch.full((9, 9), 2.4e38, dtype=torch.bfloat16), ValueError, "above 1e.38"),
    (torch.full((9, 9), float("inf"), dtype=torch.float16), ValueError, "NaN"),  # 1e38 rounds to inf in fp16
    ([[True] * 9] * 9, TypeError, "attn_mask must be a torch.Tensor"),
])
def test_bad_masks(bad, exc, match):
    q, k, v, ids, _, _ = problem(torch.float32, 1, 2, 1, 9, 16, 19)
    if isinstance(bad, torch.Tensor):
        bad = bad.to(DEVICE)
    with pytest.raises(exc, match=match):
        rollingq.rollingq_attention(q, k, v, ids, M, attn_mask=bad)
    with pytest.raises(exc, match=match):
        rollingq_attention_reference(q, k, v, ids, M, attn_mask=bad)


def test_launchers_check_the_mask():
    q, k, v, ids, _, _ = problem(torch.float32, 1, 2, 1, 9, 16, 20)
    with pytest.raises(ValueError, match="attn_mask"):
        attention_fwd.rollingq_fwd(q.detach(), k.detach(), v.detach(), ids.to(torch.int32), M, None, None, False,
                                   0.25, False, False, attn_mask=torch.ones(3, 9, dtype=torch.bool, device=DEVICE))


@pytest.mark.parametrize("learned", [False, True], ids=["constant", "learned"])
def test_torch_compile_fullgraph(learned):
    """Traced with the mask as a graph input: equal to eager, forward and gradients (the mask's
    too when it requires grad)."""
    q, k, v, ids, rot, grad = problem(torch.float32, 1, 2, 2, 16, 16, 21)
    mask = make_mask("float", (16, 16), torch.float32, 21).requires_grad_(learned)
    leaves = (q, k, v, mask) if learned else (q, k, v)

    def f(q, k, v, mask):
        return rollingq.rollingq_attention(q, k, v, ids, M, rotation=rot, rotate_rows=2, attn_mask=mask)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = []
    for fn in (f, compiled):
        out = fn(q, k, v, mask)
        got.append((out,) + torch.autograd.grad(out, leaves, grad))
    assert len(got[1]) == len(leaves) + 1
    for a, b in zip(*got):
        assert torch.equal(a, b)


def test_mask_gradient_arguments_are_checked():
    """The launcher forms a gradient only for a float mask, and only where the dense
    [B, H, Lq, Lk] buffer's (batch, head) slices fit 32-bit offsets (meta tensors: nothing is
    allocated)."""
    from rollingq.kernels.attn_mask import grad_buffer

    with pytest.raises(ValueError, match="float attn_mask"):
        grad_buffer(torch.ones(9, 9, dtype=torch.bool), 1, 1, 9, 9)
    with pytest.raises(ValueError, match="float attn_mask"):
        grad_buffer(None, 1, 1, 9, 9)
    row = torch.empty(1, 46341, device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match="attn_mask.*2\\^31"):
        grad_buffer(row, 1, 1, 46341, 46341)
    buf = grad_buffer(row, 2, 3, 46340, 46341)
    assert buf.shape == (2, 3, 46340, 46341) and buf.dtype == torch.float32  # summed over broadcast dims
    full = torch.empty(2, 3, 5, 7, device="meta", dtype=torch.bfloat16)
    assert grad_buffer(full, 2, 3, 5, 7).dtype == torch.bfloat16  # nothing to sum: the mask's dtype


def test_opcheck_with_bias_gradient():
    """torch.library.opcheck of both ops with a bias that requires grad: the forward's autograd
    registration returns its gradient, the backward op's fake result has its shape and dtype."""
    from rollingq import ops

    q, k, v, ids, rot, grad = problem(torch.float16, 2, 4, 2, 12, 16, 40)
    ids = ids.to(torch.int32)
    bias = make_mask("float", (1, 4, 12, 12), torch.float32, 40).requires_grad_()
    args = (q, k, v, ids, M, rot, None, True, 0.25, True, True, 0.0, None, bias)
    torch.library.opcheck(ops.attention_fwd_op, args)
    out, lse, q_rot, _, _ = ops.attention_fwd_op(*args)
    torch.library.opcheck(ops.attention_bwd_op, (grad, q_rot, k.detach(), v.detach(), out.detach(), lse, ids, True,
                                                 0.25, rot, None, 0.0, None, bias.detach(), True))


def test_torch_compile_dynamic_shapes():
    """torch.compile(dynamic=True): the argument checks trace with symbolic sizes (their messages
    are formatted only on failure: formatting a size fixes it to its value), so three lengths and
    two batch sizes run through one graph, with the eager results."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()

    def f(q, k, v, ids, mask):
        return rollingq.rollingq_attention(q, k, v, ids, M, attn_mask=mask, stats=False)[0]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    for batch, length in ((3, 9), (4, 12), (3, 17)):
        q, k, v, ids, _, _ = problem(torch.float32, batch, 2, 1, length, 16, length)
        mask = make_mask("bool", (length, length), torch.float32, length, hidden_row=1)
        assert torch.equal(compiled(q, k, v, ids, mask), f(q, k, v, ids, mask))
    graphs = [g for g in counter.graphs if any(n.op == "placeholder" for n in g.graph.nodes)]  # not empty ones
    assert len(graphs) == 1, f"{len(graphs)} graphs for one function"


def test_module_follows_multihead_attention():
    """RollingQAttention's attn_mask as nn.MultiheadAttention's: bool True = masked; a float mask
    is added. The bool mask and its -inf bias equal each other and the reference by hand."""
    from tests.test_module import manual_forward

    gen = torch.Generator().manual_seed(22)
    m = rollingq.RollingQAttention(32, 4, 2, num_fusion_tokens=1).to(DEVICE)
    x = torch.randn(2, 9, 32, generator=gen).to(DEVICE)
    ids = torch.randint(0, 2, (8,), generator=gen).to(DEVICE)
    masked = torch.rand(9, 9, generator=gen).to(DEVICE) < 0.3
    masked.fill_diagonal_(False)
    bias = torch.zeros(9, 9, device=DEVICE).masked_fill(masked, float("-inf"))
    with torch.no_grad():
        by_bool, st = m(x, ids, attn_mask=masked, need_stats=True)
        by_bias, _ = m(x, ids, attn_mask=bias)
        plain, _ = m(x, ids)
        want, want_st, _ = manual_forward(m.cpu(), x.cpu(), ids.cpu(), attn_mask=~masked.cpu())
    assert torch.allclose(by_bool, by_bias, atol=1e-6) and not torch.allclose(by_bool, plain, atol=1e-3)
    assert torch.allclose(by_bool.cpu(), want, atol=1e-5)
    assert torch.allclose(st.attn_mass.cpu().double(), want_st.attn_mass.double(), atol=1e-5)
    with pytest.raises(ValueError, match="attn_mask"):
        m.to(DEVICE)(x, ids, attn_mask=torch.zeros(8, 9, 9, dtype=torch.bool, device=DEVICE))


def test_module_learned_bias():
    """A learned per-head bias (e.g. relative positions) passed to RollingQAttention as a float
    attn_mask gets its gradient: equal to the same model run through the PyTorch reference."""
    import copy

    gen = torch.Generator().manual_seed(41)
    m = rollingq.RollingQAttention(32, 4, 2, num_fusion_tokens=1).to(DEVICE)
    x = torch.randn(2, 9, 32, generator=gen).to(DEVICE)
    ids = torch.randint(0, 2, (8,), generator=gen).to(DEVICE)
    bias = torch.nn.Parameter(torch.randn(1, 4, 9, 9, generator=gen).to(DEVICE))
    ref_m, ref_bias = copy.deepcopy(m).cpu(), torch.nn.Parameter(bias.detach().cpu())
    out, _ = m(x, ids, attn_mask=bias)
    out.square().sum().backward()
    previous = set_cpu_backend("reference")
    try:
        want, _ = ref_m(x.cpu(), ids.cpu(), attn_mask=ref_bias)
        want.square().sum().backward()
    finally:
        set_cpu_backend(previous)
    assert ref_bias.grad.abs().max().item() > 1e-2
    assert torch.allclose(bias.grad.cpu(), ref_bias.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(m.q_proj.weight.grad.cpu(), ref_m.q_proj.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CUDA_MASK_SHAPES)
def test_parity_cuda_large(dtype, shape):
    """Real tiles and the autotuner's choice on the GPU (bf16 too), with a dense rotation of 5 rows."""
    B, H, Hkv, L, D, kind = shape
    check(dtype, kind, B=B, H=H, Hkv=Hkv, L=L, D=D, rows=5, seed=D, hidden_row=7)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CUDA_MASK_SHAPES)
def test_bias_gradient_cuda_large(dtype, shape):
    """A learned [1, H, L, L] bias on the GPU: shared by a batch of 2 (atomics, D 64) and full at
    batch 1 (the dense store, D 768)."""
    B, H, Hkv, L, D, _ = shape
    check(dtype, "float", B=B, H=H, Hkv=Hkv, L=L, D=D, rows=5, seed=D + 1, hidden_row=7, mask_grad=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_cross_attention_lengths(kind):
    """Lq != Lk (cross-attention): the mask's rows follow the queries, its columns the keys."""
    gen = torch.Generator().manual_seed(23)
    B, H, Hkv, Lq, Lk, D = 2, 2, 1, 19, 30, 16
    q = torch.randn(B, H, Lq, D, generator=gen).to(DEVICE).requires_grad_()
    k, v = (torch.randn(B, Hkv, Lk, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    ids = torch.randint(-1, M, (B, Lk), generator=gen).to(DEVICE)
    grad = torch.randn(B, H, Lq, D, generator=gen).to(DEVICE)
    mask = make_mask(kind, (B, 1, Lq, Lk), torch.float32, 23, hidden_row=2)
    out, st = rollingq.rollingq_attention(q, k, v, ids, M, attn_mask=mask)
    got = (out,) + torch.autograd.grad(out, (q, k, v), grad)
    qq, kk, vv = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, s64 = rollingq_attention_reference(qq, kk, vv, ids, M, attn_mask=mask)
    want = (o64,) + torch.autograd.grad(o64, (qq, kk, vv), grad.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a.double() - b).abs().max().item() < 1e-5, name
    assert (st.attn_mass.double() - s64.attn_mass).abs().max().item() < 1e-5


def test_mask_slices_beyond_32_bit_offsets_take_64_bit_ones():
    """A [L, L] slice from L = 46341 on spans 2^31 elements: the launchers then pass OFFS64 (the
    kernels read it with 64-bit offsets; tests/test_int64_offsets.py runs one); a smaller one, or a
    row shared by all queries, keeps 32-bit offsets (meta tensors: no memory is allocated)."""
    from rollingq.kernels.attn_mask import launch_args, offset_slices
    from rollingq.kernels.offsets import int64_offsets

    def offs64(mask, B, H, Lq, Lk):
        amask, _, kind = launch_args(mask, B, H, Lq, Lk, stand_in)
        return int64_offsets(*offset_slices(amask, kind))

    stand_in = torch.empty(1)
    big = torch.empty_strided((46341, 46341), (46341, 1), device="meta", dtype=torch.bool)
    assert offs64(big, 1, 1, 46341, 46341)
    fits = torch.empty_strided((46340, 46340), (46340, 1), device="meta", dtype=torch.bool)
    assert not offs64(fits, 2, 3, 46340, 46340)
    shared = torch.empty_strided((1, 10 ** 6), (0, 1), device="meta", dtype=torch.float16)  # one row for all
    assert not offs64(shared, 1, 1, 10 ** 5, 10 ** 6)
    assert offset_slices(stand_in, 0) == ()


@pytest.mark.parametrize("fill", [-1e30, -1e9, torch.finfo(torch.float32).min, 1e38])
def test_rows_under_a_large_finite_bias(fill):
    """A whole row under one large finite bias (a common padding fill), forward and backward by
    design.md's rule: the backward keeps the row max and log2 of the sum apart (m + log2 l rounds
    to m at -1e30, which made p = 1 instead of 1 / L), and finfo.min scaled to base 2 stays finite
    instead of overflowing to -inf (which would hide the row)."""
    q, k, v, ids, _, grad = problem(torch.float32, 1, 2, 1, 16, 16, 24)
    ids = torch.zeros_like(ids)
    mask = make_mask("float", (16, 16), torch.float32, 24)
    mask[5] = fill
    mask.requires_grad_()
    row_grad = torch.zeros_like(grad)
    row_grad[:, :, 5] = grad[:, :, 5]  # only the row under the bias sends a gradient
    out, _ = rollingq.rollingq_attention(q, k, v, ids, M, attn_mask=mask)
    got = (out,) + torch.autograd.grad(out, (q, k, v, mask), row_grad)

    def ref(dt):
        qq, kk, vv, mm = (t.detach().to(dt).requires_grad_() for t in (q, k, v, mask))
        o, _ = rollingq_attention_reference(qq, kk, vv, ids, M, attn_mask=mm)
        return (o,) + torch.autograd.grad(o, (qq, kk, vv, mm), row_grad.to(dt))

    r64, r32 = ref(torch.float64), ref(torch.float32)
    if abs(fill) >= 1e30:  # the bias swamps the scores even in float64: every key weighs 1 / L there
        uniform = v.detach().double().mean(2, keepdim=True).expand(-1, 2, -1, -1)
        assert (r64[0][:, :, 5:6] - uniform).abs().max().item() < 1e-6
    assert r64[4][5].abs().max().item() > 1e-3  # the row's bias gets a gradient, the others none
    for name, a, b, c in zip(("out", "dq", "dk", "dv", "d_mask"), got, r64, r32):
        assert_close_by_rule(name, a, b, c)
