"""Argument checks shared by the public function, the reference and the module.

Every error names the argument and what was expected; nothing is reshaped or truncated silently.
Checks on tensor *values* (ids range, finite rotation) read the data back, a host sync on CUDA.
Their results are kept per live tensor and version (`checked_values`), so a tensor passed again
unchanged (a fixed modality layout, the module's rotation buffer) is not read again; an in-place
PyTorch op bumps the version and the next call checks anew. Writes that bypass the version counter
are not seen: through `.data`, `.numpy()` or the storage, by torch.distributed collectives
(broadcast, all_reduce) or by foreign kernels. ROLLINGQ_CHECK_VALUES=always checks on every call
(for buffers refilled that way), =0 skips the checks. They are skipped while torch.compile traces
and while a CUDA graph is captured, where data cannot be read, and for tensors batched by torch.func
transforms (vmap), whose values cannot be read either (`readable`).
"""
import numbers
import os
import weakref
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .rotation import LowRankRotation

RotateRows = Union[None, int, torch.Tensor]
Rotation = Union[None, torch.Tensor, LowRankRotation]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_MODALITIES = 16


def capturing_cuda_graph(device: torch.device) -> bool:
    """True while the current CUDA stream records a CUDA graph for `device`'s kind: a host read
    (`.tolist()`, `bool(tensor)`) would fail the capture there."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_values_always() -> bool:
    """ROLLINGQ_CHECK_VALUES=always: trust no cache keyed on a tensor's version (see the module
    doc); `CheckedValues` and `RollingQAttention`'s factor cache both read it here."""
    return os.environ.get("ROLLINGQ_CHECK_VALUES", "1") == "always"


def value_checks_enabled(device: torch.device) -> bool:
    """Whether checks that read tensor values back (a host sync on CUDA) run on tensors of
    `device`; see the module doc."""
    if os.environ.get("ROLLINGQ_CHECK_VALUES", "1") == "0" or torch.compiler.is_compiling():
        return False
    if device.type == "meta":  # shape-only tensors hold no values to check
        return False
    return not capturing_cuda_graph(device)


def readable(*tensors: torch.Tensor) -> bool:
    """Whether the tensors' values can be read back: not inside a torch.func transform's batching
    (vmap over stacked parameters). Unbatched tensors inside vmap are readable and are checked."""
    return not any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """The tensor's in-place write counter; None for inference-mode tensors, which keep none."""
    try:
        return t._version
    except RuntimeError:
        return None


class CheckedValues:
    """What a value check found, per live tensor and version (see the module doc for the writes
    a version does not see)."""

    def __init__(self) -> None:
        self._found: Dict[Tuple[int, str], tuple] = {}

    def get(self, t: torch.Tensor, what: str, compute: Callable[[torch.Tensor], object]):
        if check_values_always():
            return compute(t)
        version = tensor_version(t)
        if version is None:  # an inference-mode tensor: check every time
            return compute(t)
        key = (id(t), what)
        hit = self._found.get(key)
        if hit is not None and hit[0]() is t and hit[1] == version:
            return hit[2]
        found = compute(t)
        # Dropped when the tensor dies, before its id can be reused.
        ref = weakref.ref(t, lambda _, key=key, table=self._found: table.pop(key, None))
        self._found[key] = (ref, version, found)
        return found

    def ids_range(self, ids: torch.Tensor) -> Tuple[int, int]:
        """(min, max) of a non-empty integer tensor; one host sync for both the first time."""
        return self.get(ids, "range", lambda t: tuple(torch.stack(torch.aminmax(_aminmax_able(t))).tolist()))

    def finite(self, t: torch.Tensor) -> bool:
        """Finite in float32, which the kernels compute in (a float64 entry past its range would
        arrive as inf)."""
        return self.get(t, "finite", lambda x: bool(torch.isfinite(x.to(torch.float32)).all()))


_WIDE_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def _aminmax_able(t: torch.Tensor) -> torch.Tensor:
    # aminmax has no kernels for uint16/32/64: widen those (their values fit int64 up to 2**63).
    return t.to(torch.int64) if t.dtype in _WIDE_UNSIGNED else t


checked_values = CheckedValues()


def plain_int(x):
    """An integer of another type (numpy's np.int64, a 0-d index from a config) as a Python int, as
    SDPA and range() take them; bools, tensors and everything else unchanged (the checks judge them)."""
    if isinstance(x, numbers.Integral) and not isinstance(x, (bool, torch.Tensor)) and type(x) is not int:
        return int(x)
    return x


def plain_scalars(num_modalities, rotate_rows, causal, scale, stats):
    """The scalar arguments in the types both paths compute with: numpy's (and other) integers as
    Python ints, numpy's bool as a bool, real numbers such as a `Fraction` or `np.float32` as a
    float (a traced SymFloat stays symbolic). Anything else is returned unchanged for the checks to
    judge (a Python bool is no int here, a truthy string no bool)."""
    num_modalities, rotate_rows = plain_int(num_modalities), plain_int(rotate_rows)
    causal, stats = (bool(x) if isinstance(x, np.bool_) else x for x in (causal, stats))
    if isinstance(scale, numbers.Real) and not isinstance(scale, (bool, float, torch.SymFloat, torch.SymInt)):
        scale = float(scale)
    return num_modalities, rotate_rows, causal, scale, stats


def _require(cond: bool, message: Union[str, Callable[[], str]], exc=ValueError) -> None:
    """Raise exc(message) unless cond. Messages that format sizes come as a lambda, built only on
    failure: under torch.compile formatting a symbolic size fixes it to its current value (a new
    graph per length or batch size, and an error at the recompile limit with fullgraph=True)."""
    if not cond:
        raise exc(message() if callable(message) else message)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modality_ids: torch.Tensor,
    num_modalities: int,
    rotation: Rotation,
    rotate_rows: RotateRows,
    causal: bool,
    scale: Optional[float],
    allowed_dtypes=SUPPORTED_DTYPES + (torch.float64,),
    ids_in_range: bool = False,
    dropout_p: float = 0.0,
    attn_mask: Optional[torch.Tensor] = None,
    stats: bool = True,
) -> None:
    """Raises on any bad argument. `ids_in_range`: the caller has checked the ids' values already
    (RollingQAttention, which builds them from checked ones)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("modality_ids", modality_ids)):
        _require(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        _require_strided(name, t)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require(t.dim() == 4, lambda: f"{name} must be 4-D [B, heads, L, D], got shape {tuple(t.shape)}")
    _require(q.dtype in allowed_dtypes, lambda: f"q must have dtype in {allowed_dtypes}, got {q.dtype}", TypeError)
    _require(k.dtype == q.dtype and v.dtype == q.dtype,
             lambda: f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}", TypeError)
    _require(k.device == q.device and v.device == q.device and modality_ids.device == q.device,
             lambda: f"q, k, v and modality_ids must be on one device, got q {q.device}, k {k.device}, "
             f"v {v.device}, modality_ids {modality_ids.device}")
    B, H, Lq, D = q.shape
    _require(k.shape == v.shape, lambda: f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    Bk, Hkv, Lk, Dk = k.shape
    _require(Bk == B, lambda: f"k must have batch {B} like q, got {Bk}")
    _require(Dk == D, lambda: f"k and v must have head dim {D} like q, got {Dk}")
    _require(Hkv >= 1 and H % Hkv == 0, lambda: f"q heads ({H}) must be a multiple of k/v heads ({Hkv}) for GQA")
    # Empty batches and sequences are legal (rollingq_attention returns empty or zero results);
    # a head without width or without query heads is not.
    _require(H >= 1 and D >= 1, lambda: f"q must have at least one head and head dim >= 1, got shape {tuple(q.shape)}")

    _require(isinstance(num_modalities, int) and not isinstance(num_modalities, bool)
             and 1 <= num_modalities <= MAX_MODALITIES,
             lambda: f"num_modalities must be an int in 1..{MAX_MODALITIES}, got {num_modalities!r}")
    _require(not modality_ids.dtype.is_floating_point and modality_ids.dtype != torch.bool
             and not modality_ids.is_complex(),
             lambda: f"modality_ids must be an integer tensor, got {modality_ids.dtype}", TypeError)
    _require(modality_ids.dtype not in _WIDE_UNSIGNED,  # PyTorch has few ops for these (no >=, no aminmax)
             lambda: f"modality_ids must be int8/16/32/64 or uint8, got {modality_ids.dtype}", TypeError)
    _require(modality_ids.dim() in (1, 2) and modality_ids.shape[-1] == Lk
             and (modality_ids.dim() == 1 or modality_ids.shape[0] == B),
             lambda: f"modality_ids must have shape [Lk] = [{Lk}] or [B, Lk] = [{B}, {Lk}], got {tuple(modality_ids.shape)}")
    check_values = value_checks_enabled(q.device)
    if check_values and modality_ids.numel() and not ids_in_range and readable(modality_ids):
        lo, hi = checked_values.ids_range(modality_ids)
        _require(lo >= -1 and hi < num_modalities,
                 lambda: f"modality_ids must hold values in -1..{num_modalities - 1} (-1 = padding), got range {lo}..{hi}")

    if isinstance(rotation, LowRankRotation):
        _check_low_rank(rotation, H, D, q.device, check_values)
    elif rotation is not None:
        _require(isinstance(rotation, torch.Tensor), "rotation must be a torch.Tensor, a LowRankRotation or None",
                 TypeError)
        _require_strided("rotation", rotation)
        _require(rotation.shape == (H, D, D), lambda: f"rotation must have shape [H, D, D] = [{H}, {D}, {D}], got {tuple(rotation.shape)}")
        _require(rotation.dtype.is_floating_point, lambda: f"rotation must be floating point, got {rotation.dtype}", TypeError)
        _require(rotation.device == q.device, lambda: f"rotation must be on {q.device}, got {rotation.device}")
        if check_values and readable(rotation):
            _require(checked_values.finite(rotation), "rotation must be finite in float32 (it holds NaN or inf, "
                     "or values past float32's range)")
    if rotate_rows is not None:
        if isinstance(rotate_rows, torch.Tensor):
            _require_strided("rotate_rows", rotate_rows)
            _require(rotate_rows.dtype == torch.bool, lambda: f"rotate_rows as a tensor must be bool, got {rotate_rows.dtype}", TypeError)
            _require((rotate_rows.dim() == 1 and rotate_rows.shape[0] == Lq)
                     or (rotate_rows.dim() == 2 and tuple(rotate_rows.shape) == (B, Lq)),
                     lambda: f"rotate_rows must have shape [Lq] = [{Lq}] or [B, Lq] = [{B}, {Lq}], got {tuple(rotate_rows.shape)}")
            _require(rotate_rows.device == q.device, lambda: f"rotate_rows must be on {q.device}, got {rotate_rows.device}")
        else:
            _require(isinstance(rotate_rows, int) and not isinstance(rotate_rows, bool),
                     lambda: f"rotate_rows must be None, an int or a bool tensor, got {type(rotate_rows).__name__}", TypeError)
            _require(0 <= rotate_rows <= Lq, lambda: f"rotate_rows as an int must be in 0..Lq = 0..{Lq}, got {rotate_rows}")
    _require(isinstance(causal, bool), lambda: f"causal must be a bool, got {type(causal).__name__}", TypeError)
    # A bool, not any truthy value: the kernel op's schema takes only a bool, and None or "no"
    # would otherwise mean different things on the two paths.
    _require(isinstance(stats, bool), lambda: f"stats must be a bool, got {type(stats).__name__}", TypeError)
    _require(not causal or Lq == Lk, lambda: f"causal=True requires Lq == Lk, got Lq {Lq}, Lk {Lk}")
    # These two messages are built only on failure: under torch.compile a value that changes from
    # call to call arrives as a SymFloat, which the tracer cannot format into a string.
    if scale is not None and not (_is_real(scale) and scale == scale and abs(scale) <= MAX_SCALE):
        raise ValueError(f"scale must be a finite number of magnitude at most {MAX_SCALE:.3g} or None, got {scale!r}")
    check_dropout(dropout_p)
    # float64 masks only for float64 inputs (the reference's exact runs); the kernels read 16/32-bit ones.
    check_attn_mask(attn_mask, (B, H, Lq, Lk), q.device,
                    SUPPORTED_DTYPES + ((torch.float64,) if q.dtype == torch.float64 else ()), check_values)


# The kernels add the bias in base 2 (times log2 e): above float32's max / log2 e (2.36e38) it
# overflows to +inf and the row becomes NaN. The limit leaves room for the scores beside it.
MAX_BIAS = 1e38
# The kernels scale the scores by scale * log2 e, a float32: past this it would be inf.
MAX_SCALE = float(torch.finfo(torch.float32).max) / 1.4426950408889634


def check_attn_mask(attn_mask: Optional[torch.Tensor], shape: Tuple[int, int, int, int], device,
                    allowed_dtypes=SUPPORTED_DTYPES, check_values: bool = True) -> None:
    """An attention mask as SDPA takes it: None, or a bool (True = attend) or float (added to the
    scaled scores) tensor broadcastable to `shape` = [B, H, Lq, Lk]; a float one may require grad,
    and must hold no NaN and nothing above `MAX_BIAS` (+inf among them; -inf hides a key), checked
    once per tensor version."""
    if attn_mask is None:
        return
    _require(isinstance(attn_mask, torch.Tensor), lambda: f"attn_mask must be a torch.Tensor or None, got "
             f"{type(attn_mask).__name__}", TypeError)
    _require_strided("attn_mask", attn_mask)
    _require(attn_mask.dtype == torch.bool or attn_mask.dtype in allowed_dtypes,
             lambda: f"attn_mask must be bool or one of {allowed_dtypes}, got {attn_mask.dtype}", TypeError)
    # `n == 1 or n == want`, not `n in (1, want)`: torch.compile(dynamic=True) cannot trace `in` on sizes.
    _require(attn_mask.dim() <= 4 and all(n == 1 or n == want for n, want in zip(attn_mask.shape[::-1], shape[::-1])),
             lambda: f"attn_mask must broadcast to [B, H, Lq, Lk] = {list(shape)}, got shape {tuple(attn_mask.shape)}")
    _require(attn_mask.device == device, lambda: f"attn_mask must be on {device}, got {attn_mask.device}")
    if check_values and attn_mask.is_floating_point() and attn_mask.numel() and readable(attn_mask):
        # The max alone, compared as a Python float: no mask-sized temporary (a broadcast view stays
        # uncopied), NaN carries through it, and float16's +inf is not mistaken for MAX_BIAS.
        _require(checked_values.get(attn_mask, "bias", lambda t: float(t.detach().amax()) <= MAX_BIAS),
                 f"attn_mask must not hold NaN or values above {MAX_BIAS:g} (+inf among them; -inf hides a key)")


# The kernels keep a probability when its 16-bit draw is >= round(p * 2^16): from p = 1 - 2^-17 on,
# that threshold is 2^16 and nothing would be kept (every output 0, silently). One limit for every
# backend, so that a run does not change meaning between CPU and GPU.
MAX_DROPOUT = 1.0 - 2.0 ** -17


def check_dropout(p, name: str = "dropout_p") -> None:
    """A dropout probability: a real number in [0, 1 - 2^-17) (a SymFloat while torch.compile traces)."""
    if not (_is_real(p) and 0 <= p < MAX_DROPOUT):
        raise ValueError(f"{name} must be a number in [0, 1 - 2^-17) (from there on the kernels' 16-bit draws "
                         f"would drop everything), got {p!r}")


def _require_strided(name: str, t: torch.Tensor) -> None:
    # Sparse and other layouts would fail deep inside torch or Triton, far from the argument.
    _require(t.layout == torch.strided, lambda: f"{name} must be a dense (strided) tensor, got layout {t.layout}",
             TypeError)


def _is_real(x) -> bool:
    """A real number: Python's, numpy's, or a SymInt/SymFloat while torch.compile traces; not a bool."""
    return isinstance(x, (numbers.Real, torch.SymInt, torch.SymFloat)) and not isinstance(x, (bool, torch.SymBool))


def _check_low_rank(rotation: LowRankRotation, H: int, D: int, device, check_values: bool) -> None:
    for name, t in (("rotation.left", rotation.left), ("rotation.right", rotation.right)):
        _require(isinstance(t, torch.Tensor), lambda: f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        _require_strided(name, t)
        _require(t.dim() == 3 and t.shape[:2] == (H, D) and t.shape[2] <= D,
                 lambda: f"{name} must have shape [H, D, r] = [{H}, {D}, r] with r <= {D}, got {tuple(t.shape)}")
        _require(t.dtype.is_floating_point, lambda: f"{name} must be floating point, got {t.dtype}", TypeError)
        _require(t.device == device, lambda: f"{name} must be on {device}, got {t.device}")
    _require(rotation.left.shape == rotation.right.shape,
             lambda: f"rotation.left and rotation.right must have one shape [H, D, r], got {tuple(rotation.left.shape)} "
             f"and {tuple(rotation.right.shape)}")
    if check_values and readable(rotation.left, rotation.right):
        _require(checked_values.finite(rotation.left) and checked_values.finite(rotation.right),
                 "rotation.left and rotation.right must be finite in float32 (they hold NaN or inf, or values past "
                 "float32's range)")


def rotate_row_mask(rotate_rows: RotateRows, batch: int, lq: int, device) -> Optional[torch.Tensor]:
    """Any accepted form of `rotate_rows` -> a [B, Lq] bool mask, or None when no row is rotated."""
    if rotate_rows is None:
        return None
    if isinstance(rotate_rows, torch.Tensor):
        return rotate_rows.expand(batch, lq) if rotate_rows.dim() == 1 else rotate_rows
    return (torch.arange(lq, device=device) < rotate_rows).expand(batch, lq)
