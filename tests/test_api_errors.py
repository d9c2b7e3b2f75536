"""Every bad input gets a clear error naming the argument."""
import pytest
import torch

import rollingq
from rollingq.rotation import LowRankRotation


def base(**over):
    args = dict(
        q=torch.randn(2, 4, 6, 8), k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 8),
        modality_ids=torch.tensor([0, 0, 1, 1, -1, 1]), num_modalities=2,
        rotation=None, rotate_rows=None, causal=False, scale=None,
    )
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, words", [
    (dict(q=torch.randn(4, 6, 8)), ValueError, "q must be 4-D"),
    (dict(q=torch.randn(2, 4, 6, 8, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(k=torch.randn(2, 2, 6, 8).half()), TypeError, "share one dtype"),
    (dict(v=torch.randn(2, 2, 5, 8)), ValueError, "same shape"),
    (dict(k=torch.randn(3, 2, 6, 8), v=torch.randn(3, 2, 6, 8)), ValueError, "batch"),
    (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "multiple of k/v heads"),
    (dict(k=torch.randn(2, 2, 6, 4), v=torch.randn(2, 2, 6, 4)), ValueError, "head dim"),
    (dict(q=torch.randn(2, 0, 6, 8)), ValueError, "q must have at least one head"),
    (dict(q=torch.randn(2, 4, 6, 0), k=torch.randn(2, 2, 6, 0), v=torch.randn(2, 2, 6, 0)), ValueError,
     "head dim >= 1"),
    (dict(modality_ids=torch.tensor([0, 1, 2, 0, 0, 0])), ValueError, "modality_ids must hold values in -1..1"),
    (dict(modality_ids=torch.tensor([0, 1, -2, 0, 0, 0])), ValueError, "modality_ids must hold values"),
    (dict(modality_ids=torch.tensor([0, 1, 0])), ValueError, "modality_ids must have shape"),
    (dict(modality_ids=torch.zeros(3, 6, dtype=torch.long)), ValueError, "modality_ids must have shape"),
    (dict(modality_ids=torch.zeros(6)), TypeError, "modality_ids must be an integer tensor"),
    (dict(modality_ids=torch.zeros(6, dtype=torch.uint32)), TypeError, "modality_ids must be int8/16/32/64 or uint8"),
    (dict(num_modalities=0), ValueError, "num_modalities"),
    (dict(num_modalities=17, modality_ids=torch.zeros(6, dtype=torch.long)), ValueError, "num_modalities"),
    (dict(rotation=torch.randn(4, 8, 7), rotate_rows=1), ValueError, "rotation must have shape"),
    (dict(rotation=torch.full((4, 8, 8), float("nan")), rotate_rows=1), ValueError, "rotation must be finite"),
    (dict(rotation=LowRankRotation(torch.randn(4, 8, 2), torch.randn(4, 8, 3)), rotate_rows=1), ValueError,
     "rotation.left and rotation.right must have one shape"),
    (dict(rotation=LowRankRotation(torch.randn(4, 7, 2), torch.randn(4, 7, 2)), rotate_rows=1), ValueError,
     r"rotation.left must have shape \[H, D, r\] = \[4, 8, r\]"),
    (dict(rotation=LowRankRotation(torch.randn(4, 8, 2), torch.randn(4, 8, 2).long()), rotate_rows=1), TypeError,
     "rotation.right must be floating point"),
    (dict(rotation=LowRankRotation(torch.randn(4, 8, 2), "no"), rotate_rows=1), TypeError,
     "rotation.right must be a torch.Tensor"),
    (dict(rotation=LowRankRotation(torch.full((4, 8, 2), float("inf")), torch.randn(4, 8, 2)), rotate_rows=1),
     ValueError, "must be finite"),
    (dict(rotation="rot", rotate_rows=1), TypeError, "rotation must be a torch.Tensor, a LowRankRotation or None"),
    (dict(rotation=torch.eye(8).expand(4, 8, 8), rotate_rows=7), ValueError, "rotate_rows as an int"),
    (dict(rotation=torch.eye(8).expand(4, 8, 8), rotate_rows=torch.ones(5, dtype=torch.bool)), ValueError, "rotate_rows must have shape"),
    (dict(rotation=torch.eye(8).expand(4, 8, 8), rotate_rows=torch.ones(6)), TypeError, "rotate_rows as a tensor must be bool"),
    (dict(rotation=torch.eye(8).expand(4, 8, 8), rotate_rows=1.5), TypeError, "rotate_rows must be None"),
    (dict(q=torch.randn(2, 4, 5, 8), causal=True), ValueError, "causal=True requires Lq == Lk"),
    (dict(scale=float("inf")), ValueError, "scale must be a finite number"),
    (dict(scale=-1e39), ValueError, "scale must be a finite number of magnitude at most 2.36e"),  # inf in fp32 base 2
    (dict(rotation=torch.full((4, 8, 8), 1e39, dtype=torch.float64), rotate_rows=1), ValueError,
     "rotation must be finite in float32"),  # finite in float64, inf where the kernels compute
    (dict(rotation=LowRankRotation(torch.full((4, 8, 2), -1e300, dtype=torch.float64), torch.randn(4, 8, 2)),
          rotate_rows=1), ValueError, "must be finite in float32"),
    (dict(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    (dict(stats="no"), TypeError, "stats must be a bool, got str"),
    (dict(stats=None), TypeError, "stats must be a bool, got NoneType"),
    (dict(stats=1), TypeError, "stats must be a bool, got int"),
    (dict(q=torch.randn(2, 4, 6, 8).to_sparse()), TypeError, r"q must be a dense \(strided\) tensor, got layout"),
    (dict(v=torch.randn(2, 2, 6, 8).to_sparse()), TypeError, r"v must be a dense \(strided\) tensor"),
    (dict(modality_ids=torch.tensor([0, 0, 1, 1, -1, 1]).to_sparse()), TypeError,
     r"modality_ids must be a dense \(strided\) tensor"),
    (dict(rotation=torch.eye(8).expand(4, 8, 8).to_sparse(), rotate_rows=1), TypeError,
     r"rotation must be a dense \(strided\) tensor"),
    (dict(rotation=torch.eye(8).expand(4, 8, 8), rotate_rows=torch.ones(6, dtype=torch.bool).to_sparse()), TypeError,
     r"rotate_rows must be a dense \(strided\) tensor"),
    (dict(attn_mask=torch.ones(6, 6, dtype=torch.bool).to_sparse()), TypeError,
     r"attn_mask must be a dense \(strided\) tensor"),
    (dict(rotation=LowRankRotation(torch.randn(4, 8, 2).to_sparse(), torch.randn(4, 8, 2)), rotate_rows=1), TypeError,
     r"rotation.left must be a dense \(strided\) tensor"),
])
def test_bad_input_errors(over, exc, words):
    with pytest.raises(exc, match=words):
        rollingq.rollingq_attention(**base(**over))


@pytest.mark.parametrize("stats", ["no", None])
def test_reference_refuses_non_bool_stats(stats):
    """The reference checks `stats` as the kernel path does (a truthy "no" used to mean True)."""
    with pytest.raises(TypeError, match="stats must be a bool"):
        rollingq.rollingq_attention_reference(**base(stats=stats))


@pytest.mark.parametrize("over, exc, words", [
    (dict(q=torch.randn(2, 4, 6, 8, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(q=torch.randn(2, 4, 6, 8, dtype=torch.float64), k=torch.randn(2, 2, 6, 8, dtype=torch.float64),
          v=torch.randn(2, 2, 6, 8, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(q=torch.randint(0, 3, (2, 4, 6, 8)), k=torch.randint(0, 3, (2, 2, 6, 8)),
          v=torch.randint(0, 3, (2, 2, 6, 8))), TypeError, "q must have dtype"),
    (dict(v=torch.randint(0, 3, (2, 2, 6, 8))), TypeError, "share one dtype"),
])
def test_autocast_casts_only_what_autocast_casts(over, exc, words):
    """Under autocast only floating-point, non-float64 tensors are cast (as PyTorch's autocast
    does): int and float64 inputs get the same error as without autocast."""
    with pytest.raises(exc, match=words):
        rollingq.rollingq_attention(**base(**over))
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(exc, match=words):
        rollingq.rollingq_attention(**base(**over))


def test_autocast_casts_mixed_float_inputs_to_one_dtype():
    """float32 q with bf16 k, v: autocast makes them one dtype, as it would for a matmul."""
    args = base(k=torch.randn(2, 2, 6, 8).bfloat16(), v=torch.randn(2, 2, 6, 8).bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, st = rollingq.rollingq_attention(**args)
    assert out.dtype == torch.bfloat16 and st.attn_mass.dtype == torch.float32


def test_valid_input_passes():
    out, st = rollingq.rollingq_attention(**base(rotation=torch.eye(8).expand(4, 8, 8), rotate_rows=2))
    assert out.shape == (2, 4, 6, 8) and st.attn_mass.shape == (2, 4, 6, 2)
    assert st.key_sum.shape == (2, 2, 2, 8) and st.key_count.tolist() == [[2, 3], [2, 3]]


def test_numpy_integers_count_as_ints():
    """num_modalities and rotate_rows as numpy integers (read from a config or an array) mean what
    the Python ints mean, for the public function and the reference; numpy bools are still refused."""
    import numpy as np

    from rollingq.reference import rollingq_attention_reference

    args = base(rotation=torch.linalg.qr(torch.randn(4, 8, 8))[0], rotate_rows=2)
    for fn in (rollingq.rollingq_attention, rollingq_attention_reference):
        want = fn(**args)
        got = fn(**dict(args, rotate_rows=np.int64(2), num_modalities=np.int32(2)))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1].attn_mass, want[1].attn_mass)
        assert not torch.equal(fn(**dict(args, rotate_rows=np.int64(0)))[0], want[0])  # the rows count
        with pytest.raises(TypeError, match="rotate_rows"):
            fn(**dict(args, rotate_rows=np.bool_(True)))


def test_numpy_bools_and_other_reals_mean_what_python_ones_do():
    """causal and stats as numpy bools (read from a config or an array) and scale as any real number
    (a Fraction, np.float32) mean what Python's bool and float do, on the kernel path and in the
    reference alike (a Fraction used to reach the reference's tensor product and fail there)."""
    from fractions import Fraction

    import numpy as np

    from rollingq.reference import rollingq_attention_reference

    args = base(q=torch.randn(2, 4, 6, 8), rotation=torch.linalg.qr(torch.randn(4, 8, 8))[0], rotate_rows=2)
    for fn in (rollingq.rollingq_attention, rollingq_attention_reference):
        want = fn(**dict(args, causal=True, scale=0.25))
        for causal, scale in ((np.bool_(True), 0.25), (True, Fraction(1, 4)), (True, np.float32(0.25))):
            got = fn(**dict(args, causal=causal, scale=scale))
            assert torch.equal(got[0], want[0]) and torch.equal(got[1].attn_mass, want[1].attn_mass)
        assert not torch.equal(fn(**dict(args, causal=np.bool_(False), scale=0.25))[0], want[0])
        assert fn(**dict(args, stats=np.bool_(False)))[1] is None
        with pytest.raises(ValueError, match="scale must be a finite number"):
            fn(**dict(args, scale=Fraction(10 ** 40)))


def test_head_dims_past_the_kernels_limit_are_refused_by_name():
    """The split forward's on-chip state grows with D (over an H100's shared memory at 2048): where
    the kernels run, heads above MAX_KERNEL_HEAD_DIM are refused naming q's head dim; the reference
    computes them."""
    from rollingq.functional import MAX_KERNEL_HEAD_DIM, uses_kernel
    from rollingq.reference import rollingq_attention_reference

    D = MAX_KERNEL_HEAD_DIM + 8
    args = base(q=torch.randn(1, 1, 2, D), k=torch.randn(1, 1, 2, D), v=torch.randn(1, 1, 2, D),
                modality_ids=torch.tensor([0, 1]))
    assert rollingq_attention_reference(**args)[0].shape == (1, 1, 2, D)
    if uses_kernel(args["q"].device):
        with pytest.raises(ValueError, match=f"q's head dim must be at most {MAX_KERNEL_HEAD_DIM} where the kernels "
                                             f"run, got {D}"):
            rollingq.rollingq_attention(**args)
    else:  # the CPU reference backend: no limit
        assert rollingq.rollingq_attention(**args)[0].shape == (1, 1, 2, D)


def test_cpu_backend_setting_is_validated():
    with pytest.raises(ValueError, match="backend must be one of"):
        rollingq.functional.set_cpu_backend("gpu")


def test_value_checks_read_each_tensor_version_once(monkeypatch):
    """ids and rotation values are read back (a host sync on CUDA) once per tensor version: an
    unchanged tensor passed again is not re-read, an in-place write is checked anew."""
    reads = []
    args = base(rotation=torch.linalg.qr(torch.randn(4, 8, 8))[0], rotate_rows=2)
    aminmax, isfinite = torch.aminmax, torch.isfinite
    # Only the reads of these two tensors count (the reference path calls isfinite on its own).
    monkeypatch.setattr(torch, "aminmax", lambda t: (t is args["modality_ids"] and reads.append("ids")) or aminmax(t))
    monkeypatch.setattr(torch, "isfinite", lambda t: (t is args["rotation"] and reads.append("rot")) or isfinite(t))
    for _ in range(3):
        rollingq.rollingq_attention(**args)
    assert reads == ["ids", "rot"]
    args["modality_ids"][0] = 1  # legal write: checked again
    rollingq.rollingq_attention(**args)
    assert reads == ["ids", "rot", "ids"]
    args["modality_ids"][0] = 2
    with pytest.raises(ValueError, match=r"modality_ids must hold values in -1..1 \(-1 = padding\), got range -1..2"):
        rollingq.rollingq_attention(**args)
    args["modality_ids"][0] = 0
    args["rotation"][1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="rotation must be finite"):
        rollingq.rollingq_attention(**args)


def test_value_check_results_die_with_their_tensors():
    from rollingq.validation import checked_values

    before = len(checked_values._found)
    for _ in range(20):
        rollingq.rollingq_attention(**base(modality_ids=torch.tensor([0, 0, 1, 1, -1, 1])))
    assert len(checked_values._found) <= before + 1


def test_check_values_always_rereads(monkeypatch):
    """ROLLINGQ_CHECK_VALUES=always: for buffers refilled behind the version counter's back (e.g. by
    torch.distributed or through .numpy()), a write the counter does not see is still caught."""
    ids = torch.tensor([0, 0, 1, 1, -1, 1])
    rollingq.rollingq_attention(**base(modality_ids=ids))
    ids.numpy()[2] = 5  # not a PyTorch op: the version stays
    rollingq.rollingq_attention(**base(modality_ids=ids))  # the default trusts the version
    monkeypatch.setenv("ROLLINGQ_CHECK_VALUES", "always")
    with pytest.raises(ValueError, match="got range -1..5"):
        rollingq.rollingq_attention(**base(modality_ids=ids))
