"""Shared by the dropout and attention-mask tests: a random problem, and the module constants and
autotune lists that send small heads down the D-split and wide-split paths (under the
interpreter, heads of 72 instead of the 257+ that take those paths on a GPU)."""
import torch

from rollingq.kernels import attention_bwd as bwd
from rollingq.kernels import attention_fwd

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_D_SPLIT = ((attention_fwd, "MAX_SINGLE_D", 16), (attention_fwd, "SPLIT_D_CHUNK", 16),
            (attention_fwd, "SPLIT_DV_CHUNK", 32), (attention_fwd, "SPLIT_DV_CHUNK_NARROW", 16),
            (bwd, "DKDV_MAX_RESIDENT_D", 32), (bwd, "DQ_MAX_RESIDENT_D", 32),
            (bwd, "NARROW_MAX_RESIDENT_D", 32), (bwd, "SPLIT_D_CHUNK", 16),
            (bwd, "SPLIT_DKDV_CHUNK", 32), (bwd, "SPLIT_DKDV_CHUNK_NARROW", 32),
            (bwd, "SPLIT_DQ_CHUNK", 16), (bwd, "SPLIT_DQ_CHUNK_IEEE", 16))
_WIDE_SPLIT = ((attention_fwd, "MAX_SINGLE_D", 16), (attention_fwd, "WIDE_CHUNK", 16),
               (bwd, "DKDV_MAX_RESIDENT_D", 32), (bwd, "DQ_MAX_RESIDENT_D", 32),
               (bwd, "SPLIT_D_CHUNK", 16), (bwd, "SPLIT_DKDV_CHUNK", 32), (bwd, "SPLIT_DQ_CHUNK", 16),
               (bwd, "WIDE_CHUNK", 16))


def problem(dtype, B, H, Hkv, L, D, seed, modalities=3):
    """q [B, H, L, D], k, v [B, Hkv, L, D] (requiring grad), per-batch ids with padding, a random
    orthogonal rotation [H, D, D] and an output gradient, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, D, generator=gen).to(DEVICE, dtype).requires_grad_() for h in (H, Hkv, Hkv))
    ids = torch.randint(-1, modalities, (B, L), generator=gen).to(DEVICE)
    rot = torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))[0].float().to(DEVICE)
    grad = torch.randn(B, H, L, D, generator=gen).to(DEVICE, dtype)
    return q, k, v, ids, rot, grad


def force_d_split(monkeypatch) -> None:
    """Heads above 16 (forward) / 32 (backward) take the plain D split, in narrow chunks."""
    for mod, name, value in _D_SPLIT:
        monkeypatch.setattr(mod, name, value)


def force_wide_split(monkeypatch) -> None:
    """The wide splits (forward and dQ) with 16-wide chunks, as the only configs: D 72 is 5 chunks."""
    for mod, name, value in _WIDE_SPLIT:
        monkeypatch.setattr(mod, name, value)
    fwd_kernel = attention_fwd._rollingq_fwd_kernel
    monkeypatch.setattr(fwd_kernel, "configs", [attention_fwd._config((16, 16, 4, 1), wide=True)])
    monkeypatch.setattr(fwd_kernel, "cache", {})
    monkeypatch.setattr(bwd._bwd_dq, "configs", bwd._to_configs([bwd._INTERPRET_DQ], WIDE=1))
    monkeypatch.setattr(bwd._bwd_dq, "cache", {})
