"""Slices that span 2^31 elements (kernels/offsets.py): q, k, v and the output gradient as views with
a row stride just above 2^30, so that row 2 lies 2^31 + 128 elements past row 0. With 32-bit
in-slice offsets that row wraps to the storage's first elements (filled with a sentinel here), so
the result differs from the reference on contiguous copies. The storage is 8.6 GB of address space;
only the pages of the few rows used are ever touched (Linux allocates on first write)."""
import pytest
import torch

from rollingq import rollingq_attention
from rollingq.kernels import attention_bwd as bwd
from rollingq.kernels import attention_fwd
from rollingq.kernels.common import interpreting
from rollingq.kernels.offsets import int64_offsets
from rollingq.reference import rollingq_attention_reference
from tests.kernel_paths import force_d_split, force_wide_split
from tests.numerics import assert_close_by_rule, stats_tol

# CPU tensors through the interpreter; a CUDA machine (no interpreter) runs the reference on them.
pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("poisoned_outputs"),
              pytest.mark.skipif(not interpreting(), reason="runs the kernels through TRITON_INTERPRET=1")]

L, D = 3, 16
ROW = 2 ** 30 + 64  # elements between rows: < 2^31, so Triton passes it as int32
START = 2 ** 31  # storage offset of every view: a wrapped row lands inside the storage


def huge_views(n: int, dtype, gen):
    """n [1, 1, L, D] views of one storage, view i in columns i*D..(i+1)*D of rows ROW apart,
    filled with random values; the storage's first elements hold a sentinel."""
    store = torch.empty(START + (L - 1) * ROW + n * D, dtype=dtype)
    store[:4096] = 7.0
    views = [store.as_strided((1, 1, L, D), (0, 0, ROW, 1), START + i * D) for i in range(n)]
    for v in views:
        v.copy_(torch.randn(1, 1, L, D, generator=gen))
    return views


def test_int64_offsets_flags_only_slices_past_2_31():
    x = torch.empty(2, 3, 4, 5)
    assert not int64_offsets(x, x.transpose(1, 2))
    assert int64_offsets(x, torch.empty_strided((1, 1, 3, 16), (0, 0, ROW, 1), device="meta"))
    assert not int64_offsets(torch.empty_strided((1, 1, 2, 16), (0, 0, ROW, 1), device="meta"))  # 2^30 + 79
    assert int64_offsets(torch.empty_strided((1, 1, 16, 3), (0, 0, 1, ROW), device="meta"))  # column-major
    assert not int64_offsets(torch.empty(0, 1, 3, 16))


@pytest.mark.parametrize("path", ["single", "single_tma_off", "d_split", "wide_split"])
def test_rows_past_2_31_elements_forward_and_backward(path, monkeypatch):
    if path == "single_tma_off":
        monkeypatch.setattr(attention_fwd, "USE_TMA", False)
        monkeypatch.setattr(bwd, "USE_TMA", False)
    elif path == "d_split":
        force_d_split(monkeypatch)
    elif path == "wide_split":
        force_wide_split(monkeypatch)
    dtype = torch.float16
    gen = torch.Generator().manual_seed(61)
    views = huge_views(4, dtype, gen)
    assert int64_offsets(views[0])
    q, k, v = (t.detach().requires_grad_() for t in views[:3])  # leaves that are views of the storage
    grad = views[3]
    ids = torch.tensor([0, 1, 0])
    rot = torch.linalg.qr(torch.randn(1, D, D, generator=gen, dtype=torch.float64))[0].float()
    out, stats = rollingq_attention(q, k, v, ids, 2, rotation=rot, rotate_rows=1)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)

    results = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        qc, kc, vc = (t.detach().contiguous().to(dt).requires_grad_() for t in views[:3])
        o, st = rollingq_attention_reference(qc, kc, vc, ids, 2, rotation=rot, rotate_rows=1)
        results[name] = (o, *torch.autograd.grad(o, (qc, kc, vc), grad.contiguous().to(dt)), st)
    for i, (name, got) in enumerate((("out", out), ("dq", dq), ("dk", dk), ("dv", dv))):
        assert_close_by_rule(name, got, results["64"][i], results["lowp"][i])
    ref_stats = results["64"][4]
    assert (stats.attn_mass.double() - ref_stats.attn_mass).abs().max() <= stats_tol(dtype)
    assert (stats.key_sum.double() - ref_stats.key_sum).abs().max() <= 1e-2  # fp16 keys summed in fp32


@pytest.mark.parametrize("kind", ["bool", "bias"])
@pytest.mark.parametrize("path", ["single", "d_split"])
def test_mask_rows_past_2_31_elements(kind, path, monkeypatch):
    """A mask whose [Lq, Lk] slice spans 2^31 elements (a dense [L, L] one from L = 46341 on, which
    the launchers used to refuse): here a view with rows ROW apart. The forward, dK/dV and dQ
    kernels each read it; a wrapped row would read the sentinel (False, or a bias of 7). The
    results equal, bit for bit, those with a contiguous copy of the mask, and meet the rule."""
    if path == "d_split":
        force_d_split(monkeypatch)
    gen = torch.Generator().manual_seed(62)
    dtype = torch.float32
    store = torch.empty(START + (L - 1) * ROW + L, dtype=torch.bool if kind == "bool" else torch.float16)
    store[:4096] = False if kind == "bool" else 7.0
    mask = store.as_strided((L, L), (ROW, 1), START)
    if kind == "bool":
        mask.copy_(torch.tensor([[True, False, True], [False, True, True], [True, True, True]]))
    else:
        mask.copy_(torch.randn(L, L, generator=gen))
    assert int64_offsets(mask)
    q, k, v, grad = (torch.randn(1, 2, L, D, generator=gen, dtype=dtype) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ids = torch.tensor([0, 1, 0])
    got = {}
    for name, m in (("huge", mask), ("contiguous", mask.contiguous())):
        out, stats = rollingq_attention(q, k, v, ids, 2, attn_mask=m)
        got[name] = (out, *torch.autograd.grad(out, (q, k, v), grad), stats.attn_mass)
    for a, b in zip(got["huge"], got["contiguous"]):
        assert torch.equal(a, b)

    results = {}
    for name, dt in (("64", torch.float64), ("lowp", dtype)):
        qc, kc, vc = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        m = mask.contiguous() if kind == "bool" else mask.contiguous().to(dt)
        o, st = rollingq_attention_reference(qc, kc, vc, ids, 2, attn_mask=m)
        results[name] = (o, *torch.autograd.grad(o, (qc, kc, vc), grad.to(dt)), st)
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close_by_rule(name, got["huge"][i], results["64"][i], results["lowp"][i])
    assert (got["huge"][4].double() - results["64"][4].attn_mass).abs().max() <= stats_tol(dtype)
