"""The synthetic task generator and the .npz feature-file loader."""
import numpy as np
import pytest
import torch

from rollingq.data import MultimodalData, SyntheticSpec, load_data, load_npz, make_synthetic, save_npz

SMALL = dict(n_train=200, n_test=40)


def test_same_seed_gives_identical_arrays_and_other_seed_differs():
    a = make_synthetic(seed=3, **SMALL)
    b = make_synthetic(seed=3, **SMALL)
    c = make_synthetic(seed=4, **SMALL)
    for xa, xb, xc in zip(a.x, b.x, c.x):
        np.testing.assert_array_equal(xa, xb)
        assert not np.array_equal(xa, xc)
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.corrupt, b.corrupt)
    assert not np.array_equal(a.y, c.y)


@pytest.mark.parametrize("M", [2, 3])
def test_shapes_splits_and_subsets(M):
    spec = SyntheticSpec(num_modalities=M, num_classes=5, tokens=(4, 6), features=(8, 12), signal_tokens=(1, 6),
                         n_train=100, n_test=30, corrupt_frac=0.2, seed=1)
    d = make_synthetic(spec)
    N = 100 + 30 * (M + 1)
    tokens, feats = spec.per_modality("tokens"), spec.per_modality("features")
    assert d.num_modalities == M and len(d.names) == M and d.names[:2] == ["audio", "visual"]
    for m, x in enumerate(d.x):
        assert x.shape == (N, tokens[m], feats[m]) and x.dtype == np.float32
    assert d.y.shape == (N,) and d.y.min() >= 0 and d.y.max() < 5
    assert (d.split == 0).sum() == 100 and (d.split == 1).sum() == 30 * (M + 1)
    # 20% of the training samples are corrupted in exactly one modality.
    assert (d.corrupt[d.split == 0] >= 0).sum() == 20
    subsets = d.subsets(1)
    assert sorted(subsets) == ["clean"] + [f"corrupt_{m}" for m in range(M)]
    assert all(len(v) == 30 for v in subsets.values())
    ds = d.dataset(0)
    xs, y, corrupt = ds[[0, 5, 7]]
    assert len(ds) == 100 and [tuple(x.shape) for x in xs] == [(3, tokens[m], feats[m]) for m in range(M)]
    assert y.dtype == torch.int64 and corrupt.shape == (3,)


def _pooled_class_means_accuracy(d: MultimodalData, m: int, test_subset: str) -> float:
    """Nearest class mean of the |token|-max-pooled features, fitted on clean training samples."""
    def feat(idx):
        x = d.x[m][idx]
        # The signal sits in the tokens of largest norm; take each sample's strongest token.
        best = np.linalg.norm(x, axis=-1).argmax(1)
        return x[np.arange(len(idx)), best]
    tr = np.flatnonzero((d.split == 0) & (d.corrupt == -1))
    means = np.stack([feat(tr[d.y[tr] == k]).mean(0) for k in range(d.num_classes)])
    te = d.indices(1)[d.subsets(1)[test_subset]]
    pred = (feat(te) @ means.T).argmax(1)
    return float((pred == d.y[te]).mean())


def test_corruption_removes_the_class_signal_of_that_modality():
    d = make_synthetic(n_train=1500, n_test=300, seed=0)
    chance = 1 / d.num_classes
    # Modality 0 (easy): readable on clean samples and where the *other* modality is corrupted,
    # chance level where it is corrupted itself.
    assert _pooled_class_means_accuracy(d, 0, "clean") > 0.8
    assert _pooled_class_means_accuracy(d, 0, "corrupt_1") > 0.8
    assert _pooled_class_means_accuracy(d, 0, "corrupt_0") < chance + 0.08


def test_hard_modality_has_no_linear_class_mean():
    # The sign flip of modality 1 leaves no class information in its mean-pooled tokens, yet the
    # class is there in second moments: the mean of x x^T differs between classes.
    d = make_synthetic(n_train=2000, n_test=10, seed=0, corrupt_frac=0.0)
    pooled = d.x[1][d.split == 0].mean(1)
    y = d.y[d.split == 0]
    class_means = np.stack([pooled[y == k].mean(0) for k in range(d.num_classes)])
    assert np.abs(class_means).max() < 0.25  # pure noise level: std 1/sqrt(8 * 250)
    second = np.stack([np.einsum("nf,ng->fg", pooled[y == k], pooled[y == k]) / (y == k).sum()
                       for k in range(d.num_classes)])
    assert np.abs(second[0] - second[1]).max() > 1.0


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="signal_tokens"):
        make_synthetic(tokens=(4, 4), signal_tokens=(5, 1))
    with pytest.raises(ValueError, match="num_modalities"):
        make_synthetic(num_modalities=1)
    with pytest.raises(ValueError, match="corrupt_weights"):
        make_synthetic(corrupt_weights=(1.0,), **SMALL)


# ----------------------------------------------------------------------------- .npz files
def test_npz_round_trip(tmp_path):
    d = make_synthetic(seed=2, **SMALL)
    path = tmp_path / "f.npz"
    save_npz(d, path)
    e = load_npz(path)
    assert e.names == d.names and e.num_classes == d.num_classes
    for a, b in zip(d.x, e.x):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(d.y, e.y)
    np.testing.assert_array_equal(d.split, e.split)
    np.testing.assert_array_equal(d.corrupt, e.corrupt)
    assert load_data(str(path)).num_modalities == 2


def test_npz_numeric_suffixes_sort_numerically_and_split_defaults(tmp_path):
    rng = np.random.default_rng(0)
    N = 50
    arrays = {f"x_{i}": rng.standard_normal((N, 2, i + 1)).astype(np.float32) for i in (10, 2, 1)}
    path = tmp_path / "g.npz"
    np.savez(path, **arrays, y=rng.integers(0, 3, N))
    d = load_npz(path, test_fraction=0.2, seed=0)
    assert d.names == ["1", "2", "10"] and d.features == [2, 3, 11]
    assert (d.split == 1).sum() == 10 and (d.corrupt == -1).all()
    # The default split is seeded: the same file and seed give the same split.
    np.testing.assert_array_equal(d.split, load_npz(path, test_fraction=0.2, seed=0).split)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def good():
    rng = np.random.default_rng(0)
    return {"x_a": rng.standard_normal((6, 3, 4)).astype(np.float32),
            "x_b": rng.standard_normal((6, 2, 5)).astype(np.float32),
            "y": np.array([0, 1, 0, 1, 2, 2])}


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("y"), "missing the label array 'y'"),
    (lambda a: (a.pop("x_a"), a.pop("x_b")), "at least two modality arrays"),
    (lambda a: a.pop("x_b"), "at least two modality arrays"),
    (lambda a: a.update(x_b=a["x_b"][:5]), "mismatched N"),
    (lambda a: a.update(x_a=a["x_a"][:, 0]), r"'x_a' must be 3-D \[N, L, F\]"),
    (lambda a: a.update(y=a["y"][:, None]), "'y' must be a 1-D integer array"),
    (lambda a: a.update(y=a["y"].astype(np.float32)), "'y' must be a 1-D integer array"),
    (lambda a: a.update(x_a=a["x_a"].astype(np.int32)), "'x_a' must be floating point"),
    (lambda a: a.update(split=np.array([0, 0, 0, 0, 0, 2])), "'split' values must be in 0..1"),
    (lambda a: a.update(split=np.zeros(6, np.int64)), "both train"),
    (lambda a: a.update(corrupt=np.array([-1, 0, 1, 2, -1, -1])), "'corrupt' values must be in -1..1"),
    (lambda a: a.update(x_a=np.full((6, 3, 4), np.nan, np.float32)), "NaN or inf"),
    (lambda a: a.update(x_a=np.full((6, 3, 4), -np.inf)), "'x_a' holds NaN or inf"),
    # Finite in float64, inf once cast to the float32 the model reads: checked after the cast.
    (lambda a: a.update(x_b=np.where(np.arange(5) == 2, 1e39, a["x_b"].astype(np.float64))),
     r"'x_b' holds values beyond float32's range \(\|x\| <= 3.403e\+38 expected"),
])
def test_npz_errors(tmp_path, good, change, message):
    change(good)
    path = _write(tmp_path / "bad.npz", **good)
    with pytest.raises(ValueError, match=message):
        load_npz(path)


def test_npz_object_array_is_refused_with_the_file_named(tmp_path, good):
    good["x_a"] = np.array([np.zeros((3, 4)), np.zeros((2, 4))] * 3, dtype=object)
    path = _write(tmp_path / "pickled.npz", **good)
    with pytest.raises(ValueError, match=r"pickled\.npz.*'x_a' holds Python objects"):
        load_npz(path)


def test_npz_not_an_archive_and_missing_file(tmp_path):
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="expected an .npz archive"):
        load_npz(tmp_path / "single.npy")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_npz(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="'synthetic' or the path of an .npz"):
        load_data("features.csv")
