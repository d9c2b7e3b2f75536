"""Launches from several threads at once (nn.DataParallel replicas, autograd's per-device threads).
Triton's Autotuner keeps each call's arguments on the shared kernel object, so every autotuned
launch must hold `common.LAUNCH_LOCK` (triton-lang/triton#11494)."""
import threading

import pytest
import torch

import rollingq
from rollingq.kernels import attention_bwd, attention_fwd, common

pytestmark = pytest.mark.kernel
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [(attention_fwd, "_rollingq_fwd_kernel"), (attention_bwd, "_bwd_dkdv"), (attention_bwd, "_bwd_dq")]


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


def test_every_autotuned_launch_holds_the_lock(monkeypatch):
    held = []
    for module, name in KERNELS:
        kernel = getattr(module, name)
        assert isinstance(kernel, __import__("triton").runtime.autotuner.Autotuner)

        def run(*args, _run=kernel.run, _name=name, **kwargs):
            held.append((_name, common.LAUNCH_LOCK.locked()))
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    fwd_bwd(*problem(0))
    assert sorted(held) == sorted((name, True) for _, name in KERNELS)


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
        t.join()
    assert not errors, errors
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            assert torch.equal(a, b)
