"""The kernels as a PyTorch op: autograd through the public function, torch.compile, autocast, and a
few training steps of the attention module on the kernel path against the reference path."""
import math

import pytest
import torch

import rollingq
from rollingq.functional import set_cpu_backend, uses_kernel
from rollingq.reference import rollingq_attention_reference
from tests.numerics import CUDA_LARGE_SHAPES, assert_close_by_rule

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(dtype, gen, B=2, H=4, Hkv=2, L=19, D=16):
    q = torch.randn(B, H, L, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, Hkv, L, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    return q, k, v


def random_problem(dtype, B, H, Hkv, Lq, Lk, D, seed):
    """(generator, q, k, v requiring grad, ids [B, Lk] in -1..2, a random orthogonal rotation [H, D, D])."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    ids = torch.randint(-1, 3, (B, Lk), generator=gen).to(DEVICE)
    rot = torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))[0].float().to(DEVICE)
    return gen, q, k, v, ids, rot


def check_gradients(dtype, B, H, Hkv, Lq, Lk, D, causal, seed):
    """dq, dk, dv through the public function against float64 autograd of the reference."""
    gen, q, k, v, ids, rot = random_problem(dtype, B, H, Hkv, Lq, Lk, D, seed)
    rows = min(4, Lq)
    assert uses_kernel(q.device)
    out, _ = rollingq.rollingq_attention(q, k, v, ids, 3, rotation=rot, rotate_rows=rows, causal=causal)
    grad = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    def ref(qq, kk, vv, r):
        o, _ = rollingq_attention_reference(qq, kk, vv, ids, 3, r, rows, causal=causal, stats=False)
        return torch.autograd.grad(o, (qq, kk, vv), grad.to(o.dtype))

    g64 = ref(*(t.detach().double().requires_grad_() for t in (q, k, v)), rot.double())
    glp = ref(*(t.detach().clone().requires_grad_() for t in (q, k, v)), rot)
    for name, got, r64, rlp in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, glp):
        assert_close_by_rule(name, got, r64, rlp)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_public_function_gradients(dtype):
    check_gradients(dtype, 2, 4, 2, 19, 19, 16, causal=True, seed=4)


@pytest.mark.parametrize("score", [2.0 ** 26, 1e10])
def test_large_scores_keep_ties_and_one_hot_rows(score):
    """Scaled scores near `score` with exact ties: the forward and the gradients by design.md's rule
    (dq and dk divided by the scale, a power of two, so the rule's slack means something). Two keys
    with one score weigh 1/2 each; one float32 m + log2 l rounded to m past 2^25 (ulp 4 > log2 2)
    and gave both p = 1 in the backward: dv twice too large."""
    gen = torch.Generator().manual_seed(int(score) % 9973)
    B, H, Lq, Lk, D = 1, 2, 7, 9, 16
    # Small integers in two dims: every dot is exact in float32 and in any order.
    q = torch.zeros(B, H, Lq, D)
    q[..., :2] = torch.randint(1, 4, (B, H, Lq, 2), generator=gen).float()
    k = torch.zeros(B, 1, Lk, D)
    k[..., :2] = torch.randint(-3, 4, (B, 1, Lk, 2), generator=gen).float()
    k[:, :, 1, :2] = k[:, :, 0, :2] = 3.0  # the top key, twice: a tie on every row
    v = torch.randn(B, 1, Lk, D, generator=gen)
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    ids = torch.zeros(B, Lk, dtype=torch.long, device=DEVICE)
    scale = 2.0 ** round(math.log2(score / 18))  # q . k tops at 2 * 3 + 2 * 3 or so
    grad = torch.randn(B, H, Lq, D, generator=gen).to(DEVICE)

    def run(qq, kk, vv, fn):
        o = fn(qq, kk, vv, ids, 1, scale=scale)[0]
        return (o,) + torch.autograd.grad(o, (qq, kk, vv), grad.to(o.dtype))

    got = run(q, k, v, rollingq.rollingq_attention)
    r64 = run(*(t.detach().double().requires_grad_() for t in (q, k, v)), rollingq_attention_reference)
    r32 = run(*(t.detach().clone().requires_grad_() for t in (q, k, v)), rollingq_attention_reference)
    unscale = (1.0, 1.0 / scale, 1.0 / scale, 1.0)
    for name, a, b, c, u in zip(("out", "dq", "dk", "dv"), got, r64, r32, unscale):
        assert_close_by_rule(name, a * u, b * u, c * u)
    # Rows whose top pair is the tie split it evenly: dv of the two keys is the same.
    assert (got[3][:, :, 0] - got[3][:, :, 1]).abs().max().item() < 1e-6 < got[3][:, :, 0].abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", CUDA_LARGE_SHAPES)
def test_gradients_cuda_large(dtype, shape):
    check_gradients(dtype, *shape, seed=sum(shape[:6]))


def _backward_split_configs():
    from rollingq.kernels import attention_bwd as bwd

    return ([("dkdv", r, None) for r in bwd._DKDV_TABLE[90]["split"]]
            + [("dq", r, 0) for r in bwd._DQ_TABLE[90]["split"]] + [("dq", r, 1) for r in bwd._DQ_WIDE[90]])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel, row, wide", _backward_split_configs(),
                         ids=lambda x: "BM{}_BN{}_w{}_s{}".format(*x) if isinstance(x, tuple) else str(x))
def test_backward_split_class_configs_cuda(dtype, kernel, row, wide, monkeypatch):
    """A gradient test through the autotuner checks only the configs it picks, so each dK/dV and dQ
    config of the paper layer's class (dQ's wide split too) is forced on D 768. The shape is
    test_gradients_cuda_large's, so bench/precompile.py has already built these kernels."""
    from rollingq.kernels import attention_bwd as bwd
    from rollingq.kernels.common import target_arch

    if target_arch() < 90:
        pytest.skip("the sm_90 split-class tables: this card plans with the sm_80 ones")
    at = bwd._bwd_dkdv if kernel == "dkdv" else bwd._bwd_dq
    monkeypatch.setattr(at, "configs", bwd._to_configs([row], **({} if wide is None else {"WIDE": wide})))
    monkeypatch.setattr(at, "cache", {})
    shape = (2, 1, 1, 300, 300, 768, False)
    assert shape in CUDA_LARGE_SHAPES
    check_gradients(dtype, *shape, seed=sum(row) + (wide or 0))


def test_statistics_are_not_differentiable():
    gen = torch.Generator().manual_seed(5)
    q, k, v = inputs(torch.float32, gen, L=8)
    _, st = rollingq.rollingq_attention(q, k, v, torch.zeros(8, dtype=torch.long, device=DEVICE), 1)
    assert not st.attn_mass.requires_grad and not st.key_sum.requires_grad


def test_double_backward_names_the_limit():
    gen = torch.Generator().manual_seed(9)
    q, k, v = inputs(torch.float32, gen, L=8)
    out, _ = rollingq.rollingq_attention(q, k, v, torch.zeros(8, dtype=torch.long, device=DEVICE), 1)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)  # first order still works
    assert dq.requires_grad
    with pytest.raises(NotImplementedError, match="no second derivative"):
        dq.square().sum().backward()


class _CountingKernel:
    """An autotuned kernel that records each launch by name, then runs it."""

    def __init__(self, kernel, name, calls):
        self.kernel, self.name, self.calls = kernel, name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(self.name)
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("wants", ["q", "k", "v", "kv", "bias"])
def test_backward_runs_only_the_kernels_it_needs(wants, monkeypatch):
    """Inputs that do not require grad skip their kernel (SDPA's grad_input_mask): frozen keys and
    values skip dK/dV, a frozen query dQ unless a learned bias needs that kernel. The gradients
    computed equal, bit for bit, those of a backward that forms all of them."""
    from rollingq.kernels import attention_bwd as bwd

    gen, q, k, v, ids, rot = random_problem(torch.float32, 2, 4, 2, 13, 13, 16, 31)
    bias = torch.randn(1, 4, 13, 13, generator=gen).to(DEVICE).requires_grad_()
    mask = bias if wants == "bias" else None
    grad = torch.randn(2, 4, 13, 16, generator=gen).to(DEVICE)

    def run(leaves):
        out, _ = rollingq.rollingq_attention(q, k, v, ids, 3, rotation=rot, rotate_rows=3, attn_mask=mask)
        return torch.autograd.grad(out, leaves, grad)

    inputs = {"q": q, "k": k, "v": v, "bias": bias}
    full = dict(zip(inputs, run(list(inputs.values()) if mask is not None else [q, k, v])))
    calls = []
    for name in ("_bwd_dkdv", "_bwd_dq"):
        monkeypatch.setattr(bwd, name, _CountingKernel(getattr(bwd, name), name, calls))
    wanted = ["k", "v"] if wants == "kv" else [wants]
    for t in inputs.values():
        t.requires_grad_(False)
    for name in wanted:
        inputs[name].requires_grad_(True)
    got = run([inputs[n] for n in wanted])
    for name, g in zip(wanted, got):
        assert torch.equal(g, full[name]), name
    assert calls == (["_bwd_dq"] if wants in ("q", "bias") else ["_bwd_dkdv"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rotation_written_after_the_forward(dtype):
    """The rotation only turns dq back, so a backward without q's gradient does not keep it: the
    caller's rotation (the very tensor the op got, when it is float32) written in place between
    forward and backward leaves dk and dv as they were, as in the reference. With q's gradient the
    op keeps it, and autograd reports the write instead of using the new values."""
    gen, q, k, v, ids, rot = random_problem(dtype, 1, 2, 2, 16, 16, 32, 41)
    q.requires_grad_(False)
    grad = torch.randn(1, 2, 16, 32, generator=gen).to(DEVICE, dtype)

    def grads(write):
        R = rot.clone()
        out, _ = rollingq.rollingq_attention(q, k, v, ids, 3, rotation=R, rotate_rows=3)
        if write:
            with torch.no_grad():
                R.mul_(-1)
        return torch.autograd.grad(out, [k, v], grad)

    for got, want in zip(grads(True), grads(False)):
        assert torch.equal(got, want)
    q.requires_grad_(True)
    R = rot.clone()
    out, _ = rollingq.rollingq_attention(q, k, v, ids, 3, rotation=R, rotate_rows=3)
    with torch.no_grad():
        R.mul_(-1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, [q], grad)


def test_flop_counter_counts_like_sdpa():
    """FlopCounterMode sees the ops: 4*B*H*Lq*Lk*D forward, 2.5 times that backward, as it counts
    SDPA (causal not halved; rotation and statistics not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(10)
    B, H, Hkv, Lq, Lk, D = 2, 4, 2, 6, 11, 16
    q = torch.randn(B, H, Lq, D, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to(DEVICE).requires_grad_()
    ids = torch.randint(0, 2, (Lk,), generator=gen).to(DEVICE)
    with FlopCounterMode(display=False) as counter:
        out, _ = rollingq.rollingq_attention(q, k, v, ids, 2, rotation=torch.eye(D, device=DEVICE).repeat(H, 1, 1),
                                             rotate_rows=Lq)
        out.sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    fwd = 4 * B * H * Lq * Lk * D
    assert counts == {"rollingq.attention_fwd": fwd, "rollingq.attention_bwd": 5 * fwd // 2}
    # SDPA's own formulas (K and V as the H heads they serve)
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count
    kv = (B, H, Lk, D)
    assert fwd == sdpa_flop_count(q.shape, kv, kv)
    assert 5 * fwd // 2 == sdpa_backward_flop_count(q.shape, q.shape, kv, kv)
    # A backward that skips a kernel counts the matmuls it runs: frozen k and v, no dK/dV (3 of 5).
    k.requires_grad_(False), v.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        out, _ = rollingq.rollingq_attention(q, k, v, ids, 2)
        out.sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts == {"rollingq.attention_fwd": fwd, "rollingq.attention_bwd": 3 * fwd // 2}
    # Only a learned bias wants a gradient: the dQ kernel still runs for it (3 matmuls).
    q.requires_grad_(False)
    bias = torch.zeros(1, H, Lq, Lk, device=DEVICE, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out, _ = rollingq.rollingq_attention(q, k, v, ids, 2, attn_mask=bias)
        out.sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert counts == {"rollingq.attention_fwd": fwd, "rollingq.attention_bwd": 3 * fwd // 2}


def test_torch_compile_fullgraph_module():
    """A model using RollingQAttention compiles with fullgraph=True (no graph break), forward and
    backward, through Inductor, and matches eager."""
    torch.manual_seed(0)
    layer = rollingq.RollingQAttention(32, 4, 2, num_fusion_tokens=1, kv_heads=2).to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, -1], device=DEVICE)

    def f(x):
        out, st = layer(x, ids, need_stats=True)
        return out, st.attn_mass

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    out_c, mass_c = compiled(x)
    out_e, mass_e = f(x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(mass_c, mass_e)
    (gc,) = torch.autograd.grad(out_c.sum(), x)
    (ge,) = torch.autograd.grad(out_e.sum(), x)
    torch.testing.assert_close(gc, ge)


@pytest.mark.cuda
def test_cuda_graph_capture_replays_module():
    """A training step of RollingQAttention (forward and backward) captured in a CUDA graph: the
    capture reads nothing back (value checks, the factor cache), replays on new inputs match eager,
    and a rotation written in place between replays, as RollingQ writes it, takes effect."""
    from rollingq.rotation import plane_rotation

    torch.manual_seed(11)
    gen = torch.Generator().manual_seed(11)
    H, D, L = 4, 32, 40
    layer = rollingq.RollingQAttention(H * D, H, 2, rotate="all").cuda()
    ids = torch.randint(-1, 2, (L - 1,), generator=gen).cuda()

    def rotate_by_a_plane():
        xs, ys = torch.randn(2, H, D, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            layer.rotation.copy_((plane_rotation(xs, ys) @ layer.rotation.double().cpu()).float())

    def step(x):
        out, _ = layer(x, ids)
        out.square().sum().backward()
        return out

    def eager(x):
        layer.zero_grad(set_to_none=True)
        out = step(x).detach().clone()
        return out, layer.q_proj.weight.grad.clone()

    rotate_by_a_plane()
    x_static = torch.randn(3, L, H * D, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and the first launches outside the capture
        for _ in range(2):
            eager(x_static)
    torch.cuda.current_stream().wait_stream(side)
    layer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = step(x_static)
    grad_static = layer.q_proj.weight.grad  # eager() below replaces .grad; replays write this one
    for update in (False, True):
        if update:
            rotate_by_a_plane()
        x_static.copy_(torch.randn(3, L, H * D, generator=gen).cuda())
        graph.replay()
        got_out, got_grad = out_static.clone(), grad_static.clone()
        want_out, want_grad = eager(x_static)
        torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-4)


def test_autocast_runs_in_autocast_dtype():
    gen = torch.Generator().manual_seed(6)
    q, k, v = inputs(torch.float32, gen, L=12)
    ids = torch.randint(0, 2, (12,), generator=gen).to(DEVICE)
    dtype = torch.float16
    with torch.autocast(DEVICE, dtype=dtype):
        out, st = rollingq.rollingq_attention(q, k, v, ids, 2)
    assert out.dtype == dtype
    assert st.attn_mass.dtype == torch.float32 and st.key_sum.dtype == torch.float32
    ref, _ = rollingq.rollingq_attention(q.to(dtype), k.to(dtype), v.to(dtype), ids, 2)
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def test_training_steps_match_reference_path():
    """Same module, same data, same optimiser: the loss curve on the kernel path follows the reference."""
    def run(backend):
        torch.manual_seed(1)
        layer = rollingq.RollingQAttention(32, 2, 2, num_fusion_tokens=1).to(DEVICE)
        with torch.no_grad():  # a non-trivial rotation of the fusion query
            layer.rotation.copy_(torch.linalg.qr(torch.randn(2, 16, 16))[0])
        head = torch.nn.Linear(32, 3).to(DEVICE)
        opt = torch.optim.SGD(list(layer.parameters()) + list(head.parameters()), lr=0.5)
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(8, 11, 32, generator=gen).to(DEVICE)
        y = torch.randint(0, 3, (8,), generator=gen).to(DEVICE)
        ids = torch.tensor([0] * 5 + [1] * 5, device=DEVICE)
        previous = set_cpu_backend(backend)
        try:
            losses = []
            for _ in range(4):
                out, _ = layer(x, ids)
                loss = torch.nn.functional.cross_entropy(head(out[:, 0]), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        finally:
            set_cpu_backend(previous)
        return losses

    kernel = run("auto")
    reference = run("reference") if DEVICE == "cpu" else kernel
    assert kernel[-1] < kernel[0]
    if DEVICE == "cpu":
        assert max(abs(a - b) for a, b in zip(kernel, reference)) < 1e-4, (kernel, reference)


@pytest.mark.skipif(DEVICE == "cuda", reason="concerns the CPU interpreter only")
def test_bf16_refused_by_the_interpreter_path():
    q = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="bfloat16 cannot run through Triton's CPU interpreter"):
        rollingq.rollingq_attention(q, q, q, torch.zeros(4, dtype=torch.long), 1)


@pytest.mark.parametrize("dtype, rotate, stats, strided, every_row_split", [
    (torch.float16, True, True, True, False), (torch.float32, True, True, True, False),
    (torch.float16, False, False, False, False), (torch.float32, True, True, False, True)])
def test_opcheck(dtype, rotate, stats, strided, every_row_split, monkeypatch):
    """torch.library.opcheck: schema, fake implementation (shapes *and* strides) and autograd
    registration of both ops agree with the real kernels. every_row_split: a dense rotation of
    every row on the D-split path, where dq is rotated outside the kernels (kernels/rotate.py;
    its layout once differed from the fake's and failed Inductor's stride check)."""
    from rollingq import ops
    from tests.kernel_paths import force_d_split

    if every_row_split:
        force_d_split(monkeypatch)

    gen = torch.Generator().manual_seed(7)
    # The D split runs a program per chunk: fewer heads there keep the interpreter's time down.
    B, H, Hkv, L, D, M = (2, 2, 1, 12, 40, 3) if every_row_split else (2, 4, 2, 12, 16, 3)

    def t(*shape):
        if strided:
            b, h, l, d = shape
            return torch.randn(b, l, h, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    q, k, v = t(B, H, L, D).requires_grad_(), t(B, Hkv, L, D).requires_grad_(), t(B, Hkv, L, D).requires_grad_()
    ids = torch.randint(-1, M, (L,), generator=gen).to(DEVICE, torch.int32).expand(B, L)
    rot = torch.linalg.qr(torch.randn(H, D, D, generator=gen))[0].to(DEVICE) if rotate else None
    mask = (torch.arange(L, device=DEVICE) < 3).expand(B, L).view(torch.uint8) if rotate else None
    if every_row_split:
        mask = None
    args = (q, k, v, ids, M, rot, mask, True, D ** -0.5, stats, rotate)
    torch.library.opcheck(ops.attention_fwd_op, args)
    out, lse, q_rot, _, _ = ops.attention_fwd_op(*args)
    do = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
    q_used = q_rot if rotate else q
    bwd_args = (do, q_used.detach(), k.detach(), v.detach(), out.detach(), lse, ids, True, D ** -0.5, rot, mask)
    torch.library.opcheck(ops.attention_bwd_op, bwd_args)
    if strided and dtype == torch.float16:  # the backward that skips dQ, and the one that skips dK/dV
        torch.library.opcheck(ops.attention_bwd_op, bwd_args + (0.0, None, None, False, False, True))
        torch.library.opcheck(ops.attention_bwd_op, bwd_args + (0.0, None, None, False, True, False))


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_device_other_than_the_current_one():
    """Triton launches on the current device; the ops switch to the tensors' device first."""
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=gen).to("cuda:1", torch.float16).requires_grad_() for _ in range(3))
    ids = torch.randint(0, 2, (64,), generator=gen).to("cuda:1")
    rot = torch.linalg.qr(torch.randn(2, 32, 32, generator=gen))[0].to("cuda:1")
    with torch.cuda.device(0):
        out, st = rollingq.rollingq_attention(q, k, v, ids, 2, rotation=rot, rotate_rows=64)
        out.float().sum().backward()
    ref, _ = rollingq_attention_reference(q.double(), k.double(), v.double(), ids, 2, rot.double(), 64, stats=False)
    assert out.device == q.grad.device == torch.device("cuda:1")
    assert (out.double() - ref).abs().max().item() < 1e-2 and torch.isfinite(q.grad).all()
    # kernels/dropout.keep_mask launches on its seed's device too.
    from rollingq.kernels.dropout import keep_mask

    seed = torch.tensor([1234], dtype=torch.int64, device="cuda:1")
    with torch.cuda.device(0):
        mask = keep_mask(seed, 1, 2, 64, 64, 0.5)
    with torch.cuda.device(1):
        want = keep_mask(seed, 1, 2, 64, 64, 0.5)
    assert mask.device == seed.device and torch.equal(mask, want) and 0.4 < want.float().mean().item() < 0.6


def test_torch_compile_fullgraph_low_rank_rotation():
    """The factored rotation traces too (a NamedTuple of tensors), forward and backward."""
    from rollingq.rotation import LowRankRotation

    gen = torch.Generator().manual_seed(9)
    q, k, v = inputs(torch.float32, gen, L=10)
    H, D = q.shape[1], q.shape[-1]
    rot = LowRankRotation(*(0.2 * torch.randn(2, H, D, 2, generator=gen)).to(DEVICE))
    ids = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1, -1, 0], device=DEVICE)

    def f(q, k, v):
        return rollingq.rollingq_attention(q, k, v, ids, 2, rotation=rot, rotate_rows=3)[0]

    torch._dynamo.reset()
    out_c = torch.compile(f, fullgraph=True)(q, k, v)
    out_e = f(q, k, v)
    torch.testing.assert_close(out_c, out_e)
    (gc,) = torch.autograd.grad(out_c.sum(), q)
    (ge,) = torch.autograd.grad(out_e.sum(), q)
    torch.testing.assert_close(gc, ge)
