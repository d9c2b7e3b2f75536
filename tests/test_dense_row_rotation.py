"""Dense rotations of selected rows (kernels/rotate.py's dense kernel): what the D-split and fp32
paths run for a dense rotation with a row mask, e.g. RollingQAttention's fusion rows under
torch.compile, or an svd_rotation. The kernel against float64, then attention parity through it.

On CPU the kernels run through Triton's interpreter; every kernel output starts NaN-filled.
"""
import pytest
import torch

from rollingq.kernels import common, rotate
from tests.test_low_rank_rotation import DEVICE, DTYPES, _check_parity, _force_split, _gen, _nan_new

pytestmark = pytest.mark.kernel


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(common, "new_buffer", _nan_new)


def _rotations(H, D, gen) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(H, D, D, generator=gen, dtype=torch.float64))[0].float()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", ["first_rows", "batch_mask", "none", "all"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("D", [40, 72])
def test_dense_rows_kernel(dtype, rows, transpose, D, poisoned):
    """Selected rows: x @ R^T (x @ R when transposed) in float32 rounded once, within twice the
    error of the same product as a matmul in the dtype; other rows bit for bit. D 40 and 72 leave
    partial input and output chunks; L 45 a partial row block; x strided as users pass q."""
    gen = _gen("dense_rows", dtype, rows, transpose, D)
    B, H, L = 2, 3, 45
    x = torch.randn(B, L, H, D, generator=gen).to(dtype).to(DEVICE).transpose(1, 2)
    R = _rotations(H, D, gen).to(DEVICE)
    mask = {"first_rows": (torch.arange(L) < 3).expand(B, L),
            "batch_mask": torch.rand(B, L, generator=gen) < 0.3,
            "none": torch.zeros(B, L, dtype=torch.bool),
            "all": torch.ones(B, L, dtype=torch.bool)}[rows].to(DEVICE)
    y = rotate.rotate(x, R, mask.to(torch.uint8), transpose=transpose)
    assert y.dtype == dtype and y.shape == x.shape and y.data_ptr() != x.data_ptr()
    eq = "bhld,hde->bhle" if transpose else "bhld,hed->bhle"
    sel = mask[:, None, :, None].expand_as(x)
    assert torch.equal(y[~sel], x[~sel])
    ref = torch.einsum(eq, x.double(), R.double())
    same_dtype = torch.einsum(eq, x, R.to(dtype)).double()  # what a matmul in the dtype gives
    err = (y.double() - ref)[sel].abs().max().item() if sel.any() else 0.0
    bound = max(torch.finfo(dtype).eps * ref.abs().max().item(), 2 * (same_dtype - ref)[sel].abs().max().item()
                if sel.any() else 0.0)
    assert err <= bound + 1e-6, (err, bound)
    if rows == "first_rows":
        assert (y[:, :, :3] - x[:, :, :3]).abs().max() > 0.1  # rotated, not copied


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("rows", ["first", "mask"])
def test_attention_parity_dense_rotation_of_some_rows(dtype, split, rows, poisoned, monkeypatch):
    """Forward, statistics and gradients with a dense rotation of the first rows (the module's
    fusion rows) or of a random mask, against float64. Through the dense kernel before the forward
    and after dQ on the D split and in fp32; in-kernel on the single path in 16 bits."""
    if split:
        _force_split(monkeypatch)
    gen = _gen("dense_parity", dtype, split, rows)
    B, H, L, D = 2, 4, 23, 40
    R = _rotations(H, D, gen).to(DEVICE)
    rot_rows = 2 if rows == "first" else (torch.rand(B, L, generator=gen) < 0.4).to(DEVICE)
    _check_parity(B, H, 2, L, D, 3, dtype, R, rot_rows, rows == "first", gen)
