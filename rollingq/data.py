"""Datasets for the training program: an embedded synthetic task and `.npz` feature files.

Both produce a `MultimodalData`: one float32 array [N, L_m, F_m] per modality, int64 labels [N],
a split (0 train, 1 test) and a corruption tag (-1 clean, or the index of the corrupted modality).

The synthetic task is built so that the imbalance described in docs/method.md can appear:
modality 0 ("audio") carries a strong class signal in a few tokens and is learned first;
modality 1 ("visual") carries the class in many weak tokens (harder, learned later) and is
complementary: each sample has a quality factor per modality, and a fraction of the training
samples has one modality corrupted (its signal replaced by noise of the same power). The test set
has a clean part and one part per corrupted modality; `corrupt_0` (the easy, favoured modality is
corrupted) is the subset on which a fusion stuck on modality 0 fails.
"""
from dataclasses import dataclass
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

DEFAULT_NAMES = ("audio", "visual", "text", "depth")


@dataclass
class SyntheticSpec:
    """Parameters of the synthetic task; tuples hold one entry per modality (padded from defaults).

    Attributes:
        num_modalities: M >= 2.
        num_classes: K >= 2.
        tokens: L_m, tokens per sample of each modality.
        features: F_m, feature width of each modality.
        signal_tokens: how many of the L_m tokens carry the class signal (at random positions).
        snr: amplitude of the class signal (noise is unit Gaussian per feature).
        sign_flip: per modality, multiply the signal by a random sign per sample; the class is then
            only in the signal's axis, not its mean, so a linear read-out of pooled tokens cannot
            see it and the encoder must learn a nonlinear feature (this makes a modality hard).
        n_train: training samples; n_test: test samples per subset (clean, corrupt_0, ...).
        quality: (low, high) of the per-sample, per-modality quality factor (uniform).
        corrupt_frac: fraction of the training samples with one modality corrupted.
        corrupt_weights: relative odds of each modality being the corrupted one in training.
        seed: generator seed; the same spec and seed always give identical arrays.
    """

    num_modalities: int = 2
    num_classes: int = 8
    tokens: Tuple[int, ...] = (8, 8)
    features: Tuple[int, ...] = (16, 16)
    signal_tokens: Tuple[int, ...] = (2, 8)
    snr: Tuple[float, ...] = (3.0, 0.8)
    sign_flip: Tuple[bool, ...] = (False, True)
    n_train: int = 4000
    n_test: int = 500
    quality: Tuple[float, float] = (0.2, 1.0)
    corrupt_frac: float = 0.05
    corrupt_weights: Optional[Tuple[float, ...]] = None
    seed: int = 0

    def per_modality(self, name: str) -> Tuple:
        """The tuple `name` extended to num_modalities entries (extra modalities copy the last)."""
        values = tuple(getattr(self, name))
        if len(values) == 0:
            raise ValueError(f"SyntheticSpec.{name} must not be empty")
        if len(values) < self.num_modalities:
            values = values + (values[-1],) * (self.num_modalities - len(values))
        return values[: self.num_modalities]

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not (isinstance(self.num_modalities, int) and 2 <= self.num_modalities <= 16):
            raise ValueError(f"num_modalities must be an int in 2..16, got {self.num_modalities!r}")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 2):
            raise ValueError(f"num_classes must be an int >= 2, got {self.num_classes!r}")
        for name in ("tokens", "features", "signal_tokens"):
            for v in self.per_modality(name):
                if not (isinstance(v, (int, np.integer)) and v >= 1):
                    raise ValueError(f"{name} entries must be ints >= 1, got {getattr(self, name)!r}")
        for L, s in zip(self.per_modality("tokens"), self.per_modality("signal_tokens")):
            if s > L:
                raise ValueError(f"signal_tokens ({s}) must not exceed tokens ({L})")
        if any(v < 0 for v in self.per_modality("snr")):
            raise ValueError(f"snr entries must be >= 0, got {self.snr!r}")
        lo, hi = self.quality
        if not 0 <= lo <= hi:
            raise ValueError(f"quality must be (low, high) with 0 <= low <= high, got {self.quality!r}")
        if not 0 <= self.corrupt_frac <= 1:
            raise ValueError(f"corrupt_frac must be in [0, 1], got {self.corrupt_frac!r}")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")


@dataclass
class MultimodalData:
    """Samples of M modalities, train and test together.

    Attributes:
        x: per modality m, float32 [N, L_m, F_m].
        y: int64 [N] class labels 0..K-1.
        split: int64 [N], 0 = train, 1 = test.
        corrupt: int64 [N], -1 = clean, m = modality m corrupted.
        names: modality names, len M.
        num_classes: K.
    """

    x: List[np.ndarray]
    y: np.ndarray
    split: np.ndarray
    corrupt: np.ndarray
    names: List[str]
    num_classes: int

    @property
    def num_modalities(self) -> int:
        return len(self.x)

    @property
    def tokens(self) -> List[int]:
        return [a.shape[1] for a in self.x]

    @property
    def features(self) -> List[int]:
        return [a.shape[2] for a in self.x]

    def indices(self, split: int) -> np.ndarray:
        """Sample indices of one split (0 train, 1 test), increasing."""
        return np.flatnonzero(self.split == split)

    def dataset(self, split: int) -> "MultimodalDataset":
        """Torch dataset over one split."""
        return MultimodalDataset(self, self.indices(split))

    def subsets(self, split: int = 1) -> Dict[str, np.ndarray]:
        """Named subsets of a split: `clean`, and `corrupt_<m>` for each modality present, as
        positions into `self.indices(split)`."""
        tags = self.corrupt[self.indices(split)]
        out = {"clean": np.flatnonzero(tags == -1)}
        for m in range(self.num_modalities):
            pos = np.flatnonzero(tags == m)
            if len(pos):
                out[f"corrupt_{m}"] = pos
        return out


class MultimodalDataset(torch.utils.data.Dataset):
    """A split of `MultimodalData` as torch tensors. Indexed by a list of positions it returns a
    whole batch at once (used with a BatchSampler and `batch_size=None`), avoiding a per-sample
    collate.

    Item / batch: `(xs, y, corrupt)` where xs is a tuple of M float tensors [B, L_m, F_m] (no
    batch dimension for an int index), y int64 [B], corrupt int64 [B].
    """

    def __init__(self, data: MultimodalData, indices: np.ndarray):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        self.xs = tuple(torch.from_numpy(np.ascontiguousarray(a))[idx] for a in data.x)
        self.y = torch.from_numpy(data.y)[idx]
        self.corrupt = torch.from_numpy(data.corrupt)[idx]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index):
        if isinstance(index, (list, tuple)):
            index = torch.as_tensor(index, dtype=torch.long)
        return tuple(x[index] for x in self.xs), self.y[index], self.corrupt[index]


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_synthetic(spec: Optional[SyntheticSpec] = None, **overrides) -> MultimodalData:
    """Generate the synthetic task in memory (numpy Generator seeded by `spec.seed`).

    Token t of modality m of sample i is `noise + a * s`, noise ~ N(0, I), where for the
    `signal_tokens[m]` signal positions (random per sample) `s = snr[m] * quality[i, m] *
    sqrt(F_m) * P_m[y_i]` with P_m[y] a fixed unit prototype of class y; elsewhere s = 0. A
    corrupted modality gets, instead of the prototype, a fresh random unit direction per token:
    same power, no class information. Modality 0 has few tokens with a strong signal (easy); the
    others spread a weak signal over many tokens (harder).

    Returns train samples (split 0, `corrupt_frac` of them corrupted in one modality) followed by
    the test set: n_test clean, then n_test with modality m corrupted for each m.
    """
    spec = SyntheticSpec(**overrides) if spec is None else (
        SyntheticSpec(**{**spec.__dict__, **overrides}) if overrides else spec)
    spec.check()
    M, K = spec.num_modalities, spec.num_classes
    tokens, feats = spec.per_modality("tokens"), spec.per_modality("features")
    sig_tokens, snr = spec.per_modality("signal_tokens"), spec.per_modality("snr")
    flips = spec.per_modality("sign_flip")
    rng = np.random.default_rng(spec.seed)
    protos = [_unit_rows(rng, K, F) for F in feats]

    n_test_total = spec.n_test * (M + 1)
    N = spec.n_train + n_test_total
    y = rng.integers(0, K, size=N)
    split = np.concatenate([np.zeros(spec.n_train, np.int64), np.ones(n_test_total, np.int64)])
    corrupt = np.full(N, -1, np.int64)
    # Training corruption: a fraction of samples, one modality each.
    n_bad = int(round(spec.corrupt_frac * spec.n_train))
    bad = rng.choice(spec.n_train, size=n_bad, replace=False)
    w = np.ones(M) if spec.corrupt_weights is None else np.asarray(spec.corrupt_weights, float)
    if w.shape != (M,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"corrupt_weights must hold {M} non-negative weights, got {spec.corrupt_weights!r}")
    corrupt[bad] = rng.choice(M, size=n_bad, p=w / w.sum())
    # Test: clean block, then one block per corrupted modality.
    for m in range(M):
        start = spec.n_train + spec.n_test * (m + 1)
        corrupt[start:start + spec.n_test] = m
    lo, hi = spec.quality
    quality = rng.uniform(lo, hi, size=(N, M))

    xs = []
    for m in range(M):
        L, F, S = tokens[m], feats[m], sig_tokens[m]
        x = rng.standard_normal((N, L, F))
        # Random signal positions per sample: argsort of uniform keys picks S distinct tokens.
        pos = np.argsort(rng.random((N, L)), axis=1)[:, :S]
        direction = protos[m][y][:, None, :].repeat(S, axis=1)  # [N, S, F]
        bad_m = corrupt == m
        direction[bad_m] = _unit_rows(rng, int(bad_m.sum()) * S, F).reshape(-1, S, F)
        amp = (snr[m] * np.sqrt(F) * quality[:, m])[:, None, None]
        if flips[m]:
            amp = amp * rng.choice([-1.0, 1.0], size=(N, 1, 1))
        np.put_along_axis(x, pos[:, :, None].repeat(F, axis=2),
                          np.take_along_axis(x, pos[:, :, None].repeat(F, axis=2), axis=1) + amp * direction,
                          axis=1)
        xs.append(x.astype(np.float32))
    names = [DEFAULT_NAMES[m] if m < len(DEFAULT_NAMES) else f"mod{m}" for m in range(M)]
    return MultimodalData(xs, y.astype(np.int64), split, corrupt, names, K)


def _modality_order(keys: Sequence[str]) -> List[str]:
    suffixes = [k[2:] for k in keys]
    if all(s.isdigit() for s in suffixes):
        return [k for _, k in sorted(zip((int(s) for s in suffixes), keys))]
    return list(keys)


def load_npz(path: Union[str, os.PathLike], test_fraction: float = 0.2, seed: int = 0) -> MultimodalData:
    """Load a feature file (format in docs/training.md).

    Arrays: `x_<name>` float [N, L_m, F_m], one per modality (>= 2; order: numeric suffixes sorted,
    otherwise the order in the archive, which np.savez keeps from its keywords); `y` int [N];
    optional `split` int [N] (0 train, 1 test; without it a seeded random `test_fraction` of the
    samples is the test set); optional `corrupt` int [N] (-1 clean, or the corrupted modality).
    Loaded with allow_pickle=False: object arrays are refused.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no such file: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as e:  # not a zip / not an npz
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: expected an .npz archive (np.savez), got a single array")
    with archive:
        arrays = {}
        for key in archive.files:
            try:
                arrays[key] = archive[key]
            except ValueError as e:
                # np.load raises on object arrays when allow_pickle=False.
                raise ValueError(f"{path}: array '{key}' holds Python objects (pickled); only numeric "
                                 f"arrays are allowed (save with a numeric dtype)") from e
    xkeys = _modality_order([k for k in arrays if k.startswith("x_") and len(k) > 2])
    if len(xkeys) < 2:  # a multimodal model: MultimodalTransformer needs M >= 2
        raise ValueError(f"{path}: expected at least two modality arrays 'x_<modality>' [N, L, F], found "
                         f"{sorted(arrays)}")
    if "y" not in arrays:
        raise ValueError(f"{path}: missing the label array 'y' [N]; found {sorted(arrays)}")
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{path}: array '{k}' must be numeric, got dtype {a.dtype}")
    xs = []
    for k in xkeys:
        a = arrays[k]
        if a.ndim != 3:
            raise ValueError(f"{path}: array '{k}' must be 3-D [N, L, F], got shape {a.shape}")
        if a.dtype.kind != "f":
            raise ValueError(f"{path}: array '{k}' must be floating point, got dtype {a.dtype}")
        if a.shape[1] < 1 or a.shape[2] < 1:
            raise ValueError(f"{path}: array '{k}' has an empty token or feature axis: {a.shape}")
        # Check after the cast: a finite float64 beyond float32's range becomes inf in the model.
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below, with the array named
            x = a.astype(np.float32)
        if not np.isfinite(x).all():
            if np.isfinite(a).all():
                raise ValueError(f"{path}: array '{k}' holds values beyond float32's range "
                                 f"(|x| <= {float(np.finfo(np.float32).max):.4g} expected; features are loaded as float32)")
            raise ValueError(f"{path}: array '{k}' holds NaN or inf")
        xs.append(x)
    y = arrays["y"]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'y' must be a 1-D integer array [N], got shape {y.shape} dtype {y.dtype}")
    N = y.shape[0]
    if N < 2:
        raise ValueError(f"{path}: need at least 2 samples, got {N}")
    for k, a in zip(xkeys, xs):
        if a.shape[0] != N:
            raise ValueError(f"{path}: array '{k}' has {a.shape[0]} samples but 'y' has {N} (mismatched N)")
    if y.min() < 0:
        raise ValueError(f"{path}: labels in 'y' must be >= 0, got min {y.min()}")
    num_classes = int(y.max()) + 1
    if num_classes < 2:
        raise ValueError(f"{path}: need at least 2 classes in 'y', got labels {np.unique(y)}")

    def int_array(name: str, lo: int, hi: int) -> Optional[np.ndarray]:
        if name not in arrays:
            return None
        a = arrays[name]
        if a.ndim != 1 or a.shape[0] != N or a.dtype.kind not in "iu":
            raise ValueError(f"{path}: '{name}' must be a 1-D integer array of N = {N} entries, "
                             f"got shape {a.shape} dtype {a.dtype}")
        if len(a) and (a.min() < lo or a.max() > hi):
            raise ValueError(f"{path}: '{name}' values must be in {lo}..{hi}, got {a.min()}..{a.max()}")
        return a.astype(np.int64)

    split = int_array("split", 0, 1)
    if split is None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        split = np.zeros(N, np.int64)
        n_test = max(1, int(round(test_fraction * N)))
        split[np.random.default_rng(seed).choice(N, size=n_test, replace=False)] = 1
    if not (split == 0).any() or not (split == 1).any():
        raise ValueError(f"{path}: 'split' must hold both train (0) and test (1) samples")
    corrupt = int_array("corrupt", -1, len(xs) - 1)
    if corrupt is None:
        corrupt = np.full(N, -1, np.int64)
    return MultimodalData(xs, y.astype(np.int64), split, corrupt, [k[2:] for k in xkeys], num_classes)


def save_npz(data: MultimodalData, path: Union[str, os.PathLike]) -> None:
    """Write `data` in the feature-file format that `load_npz` reads."""
    arrays = {f"x_{n}": a for n, a in zip(data.names, data.x)}
    np.savez(path, **arrays, y=data.y, split=data.split, corrupt=data.corrupt)


def load_data(spec: str, seed: int = 0, synthetic: Optional[SyntheticSpec] = None) -> MultimodalData:
    """`--data` value -> data: 'synthetic' (generated with `synthetic`, seeded by `seed` unless the
    spec fixes it) or the path of an .npz feature file."""
    if spec == "synthetic":
        base = synthetic if synthetic is not None else SyntheticSpec(seed=seed)
        return make_synthetic(base)
    if not str(spec).endswith(".npz"):
        raise ValueError(f"--data must be 'synthetic' or the path of an .npz file, got {spec!r}")
    return load_npz(spec, seed=seed)
