"""Launches from several threads at once (nn.DataParallel replicas, autograd's per-device threads).
Triton's Autotuner keeps each call's arguments on the shared kernel object (triton-lang/triton
#11494) and its interpreter patches triton.language while a kernel runs: every launch holds
`common.LAUNCH_LOCK`."""
import threading

import pytest
import torch

import rollingq
from rollingq.kernels import common, dropout
from rollingq.rotation import low_rank_rotation, plane_rotation

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(seed, L=9, D=16):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, L, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    ids = torch.randint(0, 2, (L,), generator=gen).to(DEVICE)
    bias = torch.randn(1, 2, L, L, generator=gen).to(DEVICE).requires_grad_()  # shared by the batch: atomics
    grad = torch.randn(2, 2, L, D, generator=gen).to(DEVICE)
    return (q, k, v, bias), ids, grad


def fwd_bwd(leaves, ids, grad):
    q, k, v, bias = leaves
    out, _ = rollingq.rollingq_attention(q, k, v, ids, 2, attn_mask=bias)
    return (out.detach(),) + torch.autograd.grad(out, leaves, grad)


def test_every_launch_holds_the_lock(monkeypatch):
    """Each kernel run (the autotuned ones through their Autotuner, the rotation, delta and dropout
    mask kernels directly) happens under `common.LAUNCH_LOCK`."""
    cls = type(dropout._keep_mask_kernel)  # JITFunction, or the interpreter's stand-in
    run, seen = cls.run, []

    def locked_run(self, *args, **kwargs):
        seen.append((self.fn.__name__, common.LAUNCH_LOCK.locked()))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", locked_run)
    leaves, ids, grad = problem(0)
    gen = torch.Generator().manual_seed(4)
    dense = torch.linalg.qr(torch.randn(2, 16, 16, generator=gen, dtype=torch.float64))[0].float().to(DEVICE)
    x, y = torch.randn(2, 2, 16, generator=gen, dtype=torch.float64)
    factored = low_rank_rotation(plane_rotation(x, y).float().to(DEVICE))
    q, k, v, bias = leaves
    for rot in (dense, factored):  # fp32 rotates the selected rows up front: the rotation kernels
        out, _ = rollingq.rollingq_attention(q, k, v, ids, 2, rotation=rot, rotate_rows=3, attn_mask=bias)
        torch.autograd.grad(out, leaves, grad)
    dropout.keep_mask(torch.tensor([7], device=DEVICE), 1, 1, 4, 4, 0.5)
    names = {name for name, _ in seen}
    assert {"_rollingq_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
            "_dense_rows_rotate_kernel", "_low_rank_rotate_kernel", "_keep_mask_kernel"} <= names, names
    assert all(held for _, held in seen), [name for name, held in seen if not held]


def test_concurrent_calls_equal_sequential_ones():
    problems = [problem(seed) for seed in (1, 2, 3)]
    want = [fwd_bwd(*p) for p in problems]
    got, errors = [None] * 3, []

    def work(i):
        try:
            got[i] = fwd_bwd(*problems[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a launch never returned (deadlock?)"
    assert not errors, errors
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert torch.equal(a, b)
