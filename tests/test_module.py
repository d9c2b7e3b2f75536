"""RollingQAttention against a hand-written computation with the reference attention."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import rollingq.functional
from rollingq import rollingq_attention_reference
from rollingq.modules import RollingQAttention
from rollingq.rotation import plane_rotation


def random_rotation(H, D, gen):
    Q, Rr = torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1))[:, None, :]
    Q[:, :, 0] *= torch.sign(torch.linalg.det(Q))[:, None]  # det +1
    return Q.float()


def manual_forward(m, x, ids_mod, key_padding_mask=None, attn_mask=None):
    """The module's computation written out: projections, rotation of the selected rows by hand,
    ids with the fusion class M and padding -1, the reference attention (with `attn_mask` in its
    convention, True = attend), the output projection."""
    B, L, E = x.shape
    H, Hkv, D, nf, M = m.num_heads, m.kv_heads, m.head_dim, m.num_fusion_tokens, m.num_modalities
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).reshape(B, L, H, D).permute(0, 2, 1, 3)
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).reshape(B, L, Hkv, D).permute(0, 2, 1, 3)
    v = F.linear(x, m.v_proj.weight, m.v_proj.bias).reshape(B, L, Hkv, D).permute(0, 2, 1, 3)
    rows = nf if m.rotate == "fusion" else L
    rotated = torch.stack([q[:, h] @ m.rotation[h].T for h in range(H)], dim=1)
    q = torch.cat([rotated[:, :, :rows], q[:, :, rows:]], dim=2)
    ids = ids_mod.expand(B, L - nf).clone()
    if key_padding_mask is not None:
        ids[key_padding_mask] = -1
    ids = torch.cat([torch.full((B, nf), M, dtype=ids.dtype), ids], dim=1)
    out, stats = rollingq_attention_reference(q, k, v, ids, M + 1, attn_mask=attn_mask)
    out = out.permute(0, 2, 1, 3).reshape(B, L, H * D)
    q_fusion = rotated[:, :, :nf].mean(2)
    return F.linear(out, m.out_proj.weight, m.out_proj.bias), stats, q_fusion


CASES = [
    # rotate, H, kv_heads, M, nf, per-sample ids, padding
    ("fusion", 2, None, 2, 1, False, False),
    ("all", 2, None, 2, 1, False, False),
    ("fusion", 4, 2, 3, 2, True, False),
    ("all", 4, 1, 2, 1, False, True),
    ("fusion", 2, None, 2, 2, True, True),
]


@pytest.mark.parametrize("rotate,H,kv,M,nf,per_sample,padded", CASES)
def test_forward_matches_manual_reference(rotate, H, kv, M, nf, per_sample, padded):
    gen = torch.Generator().manual_seed(H * 100 + M * 10 + nf)
    torch.manual_seed(H * 100 + M * 10 + nf)
    D, B, Lm = 8, 3, 7
    m = RollingQAttention(H * D, H, M, num_fusion_tokens=nf, rotate=rotate, kv_heads=kv)
    with torch.no_grad():
        m.rotation.copy_(random_rotation(H, D, gen))
    x = torch.randn(B, nf + Lm, H * D, generator=gen, requires_grad=True)
    ids = torch.randint(0, M, (B, Lm) if per_sample else (Lm,), generator=gen)
    kpm = (torch.rand(B, Lm, generator=gen) < 0.3) if padded else None
    if padded:
        kpm[0] = True  # a sample whose modality tokens are all padding
    out, stats = m(x, ids, key_padding_mask=kpm, need_stats=True)
    ref, ref_stats, _ = manual_forward(m, x, ids, kpm)
    assert out.shape == (B, nf + Lm, H * D)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for name in ("attn_mass", "key_sum", "key_count"):
        assert torch.allclose(getattr(stats, name).double(), getattr(ref_stats, name).double(), atol=1e-5), name
    assert stats.attn_mass.shape == (B, H, nf + Lm, M + 1)
    assert (stats.key_count[:, M] == nf).all(), "the fusion tokens are the last class"
    # Gradients flow through the fixed rotation into the projections, and match.
    g_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * g_out).sum(), [x, m.q_proj.weight, m.k_proj.weight])
    grads_ref = torch.autograd.grad((ref * g_out).sum(), [x, m.q_proj.weight, m.k_proj.weight])
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert m.rotation.grad is None and not m.rotation.requires_grad


def test_rotate_fusion_and_all_differ():
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    a = RollingQAttention(16, 2, 2, rotate="fusion")
    b = RollingQAttention(16, 2, 2, rotate="all")
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        a.rotation.copy_(random_rotation(2, 8, gen))
        b.rotation.copy_(a.rotation)
    x = torch.randn(2, 6, 16, generator=gen)
    ids = torch.tensor([0, 0, 1, 1, 1])
    oa, ob = a(x, ids)[0], b(x, ids)[0]
    assert torch.allclose(oa[:, :1], ob[:, :1], atol=1e-6)  # fusion rows rotated in both
    assert not torch.allclose(oa[:, 1:], ob[:, 1:], atol=1e-3)


def test_rotation_buffer_state_dict_and_dtype():
    gen = torch.Generator().manual_seed(4)
    m = RollingQAttention(16, 2, 2)
    assert torch.equal(m.rotation, torch.eye(8).expand(2, 8, 8)) and m.rotation.dtype == torch.float32
    with torch.no_grad():
        m.rotation.copy_(random_rotation(2, 8, gen))
    sd = m.state_dict()
    assert "rotation" in sd and torch.equal(sd["rotation"], m.rotation)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    m2 = RollingQAttention(16, 2, 2)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(m2.rotation, m.rotation)
    x = torch.randn(2, 5, 16, generator=gen)
    ids = torch.tensor([0, 1, 1, 0])
    assert torch.equal(m(x, ids)[0], m2(x, ids)[0])
    # Casting the module keeps the rotation in float32 (a bf16 rotation is no longer orthogonal).
    saved = m.rotation.clone()
    m.to(torch.bfloat16)
    assert m.q_proj.weight.dtype == torch.bfloat16
    assert m.rotation.dtype == torch.float32 and torch.equal(m.rotation, saved)
    out, _ = m(x.bfloat16(), ids)
    assert out.dtype == torch.bfloat16
    # load_state_dict(assign=True) (meta init, then load) takes the saved tensors themselves: a bf16
    # checkpoint's rotation still comes back in float32.
    m3 = RollingQAttention(16, 2, 2, device="meta")
    m3.load_state_dict({k: v.bfloat16() for k, v in sd.items()}, assign=True)
    assert m3.rotation.dtype == torch.float32 and torch.equal(m3.rotation, sd["rotation"].bfloat16().float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rotated", [False, True])
def test_bad_rotation_buffer_is_named(bad, rotated):
    """A NaN or inf in the rotation buffer (a bad checkpoint) is an error naming the rotation, not
    an SVD failure inside the factoring, nor (inf: NaN singular values, which no rank counts) a
    silent identity; also beside a real rotation, which an identity would drop."""
    m = RollingQAttention(16, 2, 2)  # head dim 8: the factored form up to rank 1
    with torch.no_grad():
        if rotated:
            m.rotation.copy_(plane_rotation(*torch.randn(2, 2, 8, dtype=torch.float64)).float())
        m.rotation[0, 1, 2] = bad
    with pytest.raises(ValueError, match="rotation.*finite"):
        m(torch.randn(1, 5, 16), torch.tensor([0, 1, 1, 0]))


def test_module_argument_errors_name_the_module_arguments():
    """need_stats is a bool, as the op's stats (a truthy "no" used to turn the statistics on), and a
    layer in an unsupported dtype is named as such, not by the op's `q` the caller never passed."""
    m = RollingQAttention(16, 2, 2)
    x, ids = torch.randn(1, 5, 16), torch.tensor([0, 1, 1, 0])
    for bad in ("no", None, 1):
        with pytest.raises(TypeError, match="need_stats must be a bool"):
            m(x, ids, need_stats=bad)
    m64 = RollingQAttention(16, 2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"RollingQAttention computes in one of .*torch.float64 \(x torch.float64"):
        m64(x.double(), ids)


def test_data_parallel_replica_with_a_controller_is_refused():
    """nn.DataParallel's replicas are shallow copies the controller does not track: refused with a
    pointer to DDP (replicated the way DataParallel does, which needs no GPU); without a
    controller a replica is made as usual."""
    m = RollingQAttention(16, 2, 2)
    assert isinstance(m._replicate_for_data_parallel(), RollingQAttention)
    rollingq.RollingQ(m)
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        m._replicate_for_data_parallel()


def test_torch_func_ensemble_of_layers():
    """torch.func model ensembling (stacked parameters and rotation buffers, vmap of
    functional_call): each member's output is its own layer's. The batched buffers cannot be read
    inside vmap, but unbatched inputs are: out-of-range ids are still refused there."""
    gen = torch.Generator().manual_seed(8)
    layers = [RollingQAttention(16, 2, 2) for _ in range(2)]
    with torch.no_grad():
        layers[1].rotation.copy_(random_rotation(2, 8, gen))
    params, bufs = torch.func.stack_module_state(layers)
    base = copy.deepcopy(layers[0]).to("meta")
    x, ids = torch.randn(2, 5, 16, generator=gen), torch.tensor([0, 1, 1, 0])
    out = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x, ids))[0])(params, bufs)
    for i, layer in enumerate(layers):
        assert torch.allclose(out[i], layer(x, ids)[0], atol=1e-5)
    with pytest.raises(ValueError, match="modality_ids must hold values"):
        torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x, ids + 5))[0])(params, bufs)


class StubController:
    def __init__(self, collecting):
        self.collecting = collecting
        self.calls = []

    def observe(self, layer, q_fusion, stats):
        self.calls.append((layer, q_fusion, stats))


def test_stats_only_when_asked_or_collecting(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    H, D, nf = 2, 8, 2
    m = RollingQAttention(H * D, H, 2, num_fusion_tokens=nf)
    with torch.no_grad():
        m.rotation.copy_(random_rotation(H, D, gen))
    seen = []
    real = rollingq.functional.attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((kwargs["stats"], q.stride(), q.data_ptr()))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(rollingq.functional, "attention", spy)
    B, L = 3, 7
    x = torch.randn(B, L, H * D, generator=gen)
    ids = torch.tensor([0, 0, 1, 1, 1])

    assert m(x, ids)[1] is None and seen[-1][0] is False
    assert m(x, ids, need_stats=True)[1] is not None and seen[-1][0] is True
    # q reaches the kernel as a [B, L, H, D] -> [B, H, L, D] view, not a copy.
    assert seen[-1][1] == (L * H * D, D, H * D, 1)

    stub = StubController(collecting=False)
    m.controller = stub
    assert m(x, ids)[1] is None and seen[-1][0] is False and stub.calls == []
    stub.collecting = True
    out, stats = m(x, ids)
    assert stats is not None and seen[-1][0] is True and len(stub.calls) == 1
    layer, q_fusion, st = stub.calls[0]
    assert layer is m and st is stats
    _, _, q_fusion_ref = manual_forward(m, x, ids)
    assert q_fusion.shape == (B, H, D) and not q_fusion.requires_grad
    assert torch.allclose(q_fusion, q_fusion_ref, atol=1e-5)
    # Eval mode (validation) is not reported, unless inside a controller's full pass.
    m.eval()
    assert m(x, ids)[1] is None and len(stub.calls) == 1
    stub.in_full_pass = True
    m(x, ids)
    assert len(stub.calls) == 2
    # A copy or pickle of the layer does not carry the controller along.
    assert copy.deepcopy(m).controller is None
    assert pickle.loads(pickle.dumps(m)).controller is None
    assert m.controller is stub and "controller" not in dict(m.named_children())



@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_reports_each_batch_once(reentrant):
    """Under torch.utils.checkpoint the forward runs again inside the backward; that rerun does not
    report the batch to the controller a second time, and the gradients are those without it."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    m = RollingQAttention(16, 2, 2)
    with torch.no_grad():
        m.rotation.copy_(random_rotation(2, 8, gen))
    stub = StubController(collecting=True)
    m.controller = stub
    x = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 1, 1, 0])
    out, _ = m(x, ids)
    (g_plain,) = torch.autograd.grad(out.square().sum(), x)
    assert len(stub.calls) == 1
    out, _ = checkpoint(m, x, ids, use_reentrant=reentrant)
    out.square().sum().backward()
    assert len(stub.calls) == 2
    torch.testing.assert_close(x.grad, g_plain)

def test_bad_inputs():
    with pytest.raises(ValueError, match="embed_dim"):
        RollingQAttention(10, 3, 2)
    with pytest.raises(ValueError, match="rotate"):
        RollingQAttention(16, 2, 2, rotate="keys")
    with pytest.raises(ValueError, match="kv_heads"):
        RollingQAttention(24, 3, 2, kv_heads=2)
    with pytest.raises(ValueError, match="num_modalities"):
        RollingQAttention(16, 2, 16)
    with pytest.raises(ValueError, match="num_fusion_tokens"):
        RollingQAttention(16, 2, 2, num_fusion_tokens=0)
    m = RollingQAttention(16, 2, 2)
    x = torch.randn(2, 6, 16)
    with pytest.raises(ValueError, match="modality_ids"):
        m(x, torch.zeros(6, dtype=torch.long))  # covers all tokens instead of the modality tokens
    with pytest.raises(ValueError, match="modality_ids"):
        m(x, torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="modality_ids"):
        m(x, torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(TypeError, match="modality_ids"):
        m(x, torch.zeros(5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, torch.zeros(5, dtype=torch.long), key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(x, torch.zeros(5, dtype=torch.long), key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="x must"):
        m(torch.randn(2, 6, 8), torch.zeros(5, dtype=torch.long))


@pytest.mark.kernel
@pytest.mark.parametrize("rotate,kv", [("fusion", None), ("all", 1)])
def test_forward_through_kernel_matches_manual_reference(rotate, kv):
    """The same parity through the Triton kernels (the interpreter on CPU): the strided q/k/v views
    and the ids the module builds reach the kernel as they are."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    m = RollingQAttention(32, 4, 2, num_fusion_tokens=2, rotate=rotate, kv_heads=kv)
    with torch.no_grad():
        m.rotation.copy_(random_rotation(4, 8, gen))
    x = torch.randn(2, 9, 32, generator=gen, requires_grad=True)
    ids = torch.randint(0, 2, (7,), generator=gen)
    kpm = torch.rand(2, 7, generator=gen) < 0.3
    out, stats = m(x, ids, key_padding_mask=kpm, need_stats=True)
    ref, ref_stats, _ = manual_forward(m, x, ids, kpm)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
    for name in ("attn_mass", "key_sum", "key_count"):
        assert torch.allclose(getattr(stats, name).double(), getattr(ref_stats, name).double(), atol=1e-5), name
    gx, = torch.autograd.grad(out.sum(), [x])
    gr, = torch.autograd.grad(ref.sum(), [x])
    assert torch.allclose(gx, gr, atol=1e-4, rtol=1e-4)


def test_kernel_gets_the_rotation_factored_while_its_rank_is_low(monkeypatch):
    """Identity: rank 0 (no rotation); after a plane rotation: rank 2, factored once and reused until
    the buffer's values change; a rotation of high rank: the dense buffer. The output matches the
    manual computation with the dense buffer in every state."""
    import rollingq.modules as modules
    from rollingq.rotation import LowRankRotation

    calls = []
    real = modules.low_rank_rotation
    monkeypatch.setattr(modules, "low_rank_rotation", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(8)
    torch.manual_seed(8)
    m = RollingQAttention(4 * 16, 4, 2, rotate="all")  # head_dim 16: factored up to rank 2
    x = torch.randn(2, 6, 64, generator=gen)
    ids = torch.tensor([0, 1, 1, 0, 1])

    def check_output():
        assert torch.allclose(m(x, ids)[0], manual_forward(m, x, ids)[0], atol=1e-5)

    form = m.rotation_for_kernel()
    assert isinstance(form, LowRankRotation) and form.rank == 0
    check_output()
    xs, ys = torch.randn(2, 4, 16, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        m.rotation.copy_(plane_rotation(xs, ys).float())
    form = m.rotation_for_kernel()
    assert isinstance(form, LowRankRotation) and form.rank == 2
    check_output()
    n = len(calls)
    with torch.no_grad():
        m.rotation.copy_(m.rotation.clone())  # same values written again (a DDP buffer broadcast)
    assert m.rotation_for_kernel() is form and len(calls) == n
    with torch.no_grad():
        m.rotation.copy_(random_rotation(4, 16, gen))
    assert m.rotation_for_kernel() is m.rotation and len(calls) == n + 1
    check_output()
    m2 = copy.deepcopy(m)
    assert m2._kernel_rotation is None and m2.rotation_for_kernel() is m2.rotation
    m.rotation.data = plane_rotation(xs, ys).float()  # a new storage, the version counter unchanged
    form = m.rotation_for_kernel()
    assert isinstance(form, LowRankRotation) and form.rank == 2
    check_output()


def test_capture_of_a_cuda_graph_reads_nothing_back(monkeypatch):
    """While a CUDA stream is capturing, the checks that read values back (illegal there) stand
    aside for CUDA tensors only, and the module passes its dense buffer, which a replay reads live.
    The capture flag is faked here; test_cuda_graph_capture_replays_module runs a real capture."""
    import rollingq.validation as validation

    monkeypatch.delenv("ROLLINGQ_CHECK_VALUES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert validation.value_checks_enabled(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not validation.value_checks_enabled(torch.device("cuda"))
    assert validation.value_checks_enabled(torch.device("cpu"))
    assert validation.capturing_cuda_graph(torch.device("cuda"))
    assert not validation.capturing_cuda_graph(torch.device("cpu"))
    import rollingq.modules as modules

    m = RollingQAttention(32, 2, 2)
    xs, ys = torch.randn(2, 2, 16, dtype=torch.float64)
    with torch.no_grad():
        m.rotation.copy_(plane_rotation(xs, ys).float())
    assert m.rotation_for_kernel() is not m.rotation  # factored outside a capture
    monkeypatch.setattr(modules, "capturing_cuda_graph", lambda device: True)
    assert m.rotation_for_kernel() is m.rotation


@pytest.mark.kernel
@pytest.mark.parametrize("low_rank", [True, False])
def test_steady_state_forward_reads_no_values_back(low_rank, monkeypatch):
    """Value checks read data back (a host sync on CUDA). With the same modality_ids tensor and an
    unchanged rotation, only the first forward reads anything: the user's ids once, the rotation
    (its factors, or the dense buffer) once; the ids the module builds from them are not re-read."""
    from rollingq.validation import CheckedValues

    reads = []
    get = CheckedValues.get
    monkeypatch.setattr(CheckedValues, "get", lambda self, t, what, compute: get(
        self, t, what, lambda x: reads.append(what) or compute(x)))
    gen = torch.Generator().manual_seed(8)
    m = RollingQAttention(32, 2, 2)
    with torch.no_grad():
        if low_rank:
            m.rotation.copy_(plane_rotation(*torch.randn(2, 2, 16, generator=gen, dtype=torch.float64)).float())
        else:
            m.rotation.copy_(random_rotation(2, 16, gen))
    ids = torch.tensor([0, 1, 1, 0, -1, 1])
    for _ in range(3):
        out, _ = m(torch.randn(2, 7, 32, generator=gen), ids, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
    assert reads == ["range"] + ["finite"] * (2 if low_rank else 1)
    ids[0] = 2  # out of range, written in place: caught on the next call
    with pytest.raises(ValueError, match="modality_ids must hold values in 0..1"):
        m(torch.randn(2, 7, 32, generator=gen), ids)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.uint16, torch.uint32, torch.uint64])
def test_integer_id_dtypes(dtype):
    """Any integer ids the module can widen to int64 work, and their range is still checked."""
    m = RollingQAttention(32, 2, 2)
    x = torch.randn(2, 7, 32)
    out, _ = m(x, torch.tensor([0, 1, 1, 0, 1, 0], dtype=dtype))
    ref, _ = m(x, torch.tensor([0, 1, 1, 0, 1, 0]))
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="modality_ids must hold values in 0..1"):
        m(x, torch.tensor([0, 1, 5, 0, 1, 0], dtype=dtype))


def test_check_values_always_sees_a_rotation_written_through_data(monkeypatch):
    """A write through `.data` (or a torch.distributed broadcast) leaves the version counter as it
    was; under ROLLINGQ_CHECK_VALUES=always the factor cache compares values instead of trusting it."""
    from rollingq.rotation import LowRankRotation

    monkeypatch.setenv("ROLLINGQ_CHECK_VALUES", "always")
    gen = torch.Generator().manual_seed(21)
    torch.manual_seed(21)
    m = RollingQAttention(32, 2, 2, rotate="all")
    x = torch.randn(2, 6, 32, generator=gen)
    ids = torch.tensor([0, 1, 1, 0, 1])
    form = m.rotation_for_kernel()
    assert isinstance(form, LowRankRotation) and form.rank == 0  # the identity, cached
    m(x, ids)
    version = m.rotation._version
    m.rotation.data.copy_(random_rotation(2, 16, gen))
    assert m.rotation._version == version  # the write is invisible to the counter
    assert m.rotation_for_kernel() is m.rotation  # full rank: the dense buffer, not the stale identity
    assert torch.allclose(m(x, ids)[0], manual_forward(m, x, ids)[0], atol=1e-5)


def test_reset_parameters_after_meta_to_empty():
    """The meta-init idiom: build on meta, to_empty, reset_parameters on every module that has it.
    The rotation is the identity again (not uninitialised memory), the factor cache is dropped, and
    with the same projection weights the output is that of a normally built module."""
    torch.manual_seed(22)
    ref = RollingQAttention(32, 2, 2, kv_heads=1)
    m = RollingQAttention(32, 2, 2, kv_heads=1, device="meta")
    m.to_empty(device="cpu")
    with torch.no_grad():
        m.rotation.fill_(float("nan"))  # what uninitialised memory may hold
    for mod in m.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
    assert m.rotation.dtype == torch.float32 and torch.equal(m.rotation, torch.eye(16).expand(2, 16, 16))
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        proj = getattr(m, name)
        assert proj.weight.device.type == "cpu" and torch.isfinite(proj.weight).all()
        proj.load_state_dict(getattr(ref, name).state_dict())
    x = torch.randn(2, 6, 32)
    ids = torch.tensor([0, 1, 1, 0, 1])
    assert torch.equal(m(x, ids)[0], ref(x, ids)[0])
    # A rotated, cached layer goes back to the identity, its cache dropped.
    with torch.no_grad():
        m.rotation.copy_(random_rotation(2, 16, torch.Generator().manual_seed(22)))
    m.rotation_for_kernel()
    m.reset_parameters()
    assert m._kernel_rotation is None and torch.equal(m.rotation, torch.eye(16).expand(2, 16, 16))


def test_init_weights_unchanged_by_reset_parameters_refactor():
    """__init__ draws the projections' weights once (nn.Linear's init), as before: a seeded module
    has the weights of seeded nn.Linear layers built in the same order."""
    torch.manual_seed(23)
    m = RollingQAttention(32, 2, 2)
    torch.manual_seed(23)
    linears = [torch.nn.Linear(32, 32) for _ in range(4)]
    for proj, lin in zip((m.q_proj, m.k_proj, m.v_proj, m.out_proj), linears):
        assert torch.equal(proj.weight, lin.weight) and torch.equal(proj.bias, lin.bias)
    assert torch.equal(m.rotation, torch.eye(16).expand(2, 16, 16))
