"""The implementations under comparison, and the measurement of one (shape, implementation) case.

Forward implementations:
- `rollingq_fwd`: rollingq.rollingq_attention, all rows rotated, statistics on (the product), the
  rotation as RollingQAttention passes it after RollingQ's default plane rotation (factored, rank 2).
- `rollingq_fwd_nostats`: the same kernel with rotation=None, stats=False (plain fused attention;
  the ratio of the two is the cost of rotation + statistics).
- `rollingq_fwd_denserot`: `rollingq_fwd` with a general (dense) rotation instead of the plane
  rotation's factored form: what a rotation that turns the whole space (the paper's SVD
  construction) costs, a D x D matmul per query.
- `sdpa_flash_fwd`, `sdpa_cudnn_fwd`, `sdpa_efficient_fwd`: torch SDPA pinned to one backend.
- `flex_fwd`: FlexAttention compiled with torch.compile (causal through a block mask).
- `unfused_fwd`: what one would write without the kernel: rotate q with a matmul, SDPA for the
  output, a second SDPA against one-hot modality values for the attention mass, a one-hot matmul
  for the key sums.
Forward + backward twins (`*_fwdbwd`): the forward, then backward of a fixed random grad_out; the
timer sets q/k/v .grad to None between runs so no accumulation kernel is timed.
Opt-in (EXTRA_IMPL_ORDER, run with ROLLINGQ_BENCH_EXTRA=1, not by gpu_check.sh), each compared with
`rollingq_fwd(bwd)` on the same shape (bench/NOTES.md has the predictions):
- `rollingq_dropout_fwd(bwd)`: with attention dropout 0.1; the ratio is the cost of the draw.
- `rollingq_varlen_fwd(bwd)`: per-batch ids, batch row b padded at the end after
  L - floor(b L / 2B) keys (lengths spread over [L/2, L]); credited the padded shape's FLOPs, so
  the ratio is what skipping trailing padding saves (predicted ~0.75x of the time non-causal).
- `rollingq_mask_fwd(bwd)`: with a bool attention mask [L, L] shared by the batch and heads
  (`attn_mask_of`: about 90% True, no empty row); the ratio is the cost of reading the mask per tile.
- `rollingq_bias_fwd(bwd)`: with a learned float bias [1, H, L, L] in the inputs' dtype (`bias_of`),
  which requires grad in the fwd+bwd case: its ratio adds the dense [B, H, L, L] float32 gradient
  buffer that dQ writes and its sum over the batch.

The peers compute plain attention (no rotation, no statistics): the targets of design.md compare the
product against them. Outcomes that are not measurements become records, never test errors:
"n/a: <reason>" when an SDPA backend declines a shape, "fails: <reason>" when a peer crashes, or is
known to (FlexAttention's shared-memory overflow at D > 256, e.g. the paper's D = 768: recorded as
FLEX_KNOWN_FAILURE without compiling). An error in rollingq itself fails the test.
"""
import re
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from shapes import Inputs, Shape, make_inputs


class NotApplicable(Exception):
    """The backend does not support this shape (recorded as 'n/a: <reason>')."""


class PeerFailed(Exception):
    """A peer crashed on a shape it nominally supports (recorded as 'fails: <reason>')."""


@dataclass(frozen=True)
class Impl:
    name: str
    family: str  # rollingq | sdpa_flash | sdpa_cudnn | sdpa_efficient | flex | unfused
    direction: str  # fwd | fwdbwd
    stats: bool = True  # rollingq only: rotation + statistics on
    dense_rotation: bool = False  # rollingq only: a general rotation instead of the factored plane one
    dropout: float = 0.0  # rollingq only: attention dropout probability
    varlen: bool = False  # rollingq only: per-batch ids, rows padded at the end (see varlen_ids)
    mask: bool = False  # rollingq only: a bool attention mask [L, L] (see attn_mask_of)
    bias: bool = False  # rollingq only: a learned float bias [1, H, L, L] (see bias_of)


_IMPL_LIST = (
    Impl("rollingq_fwd", "rollingq", "fwd"),
    Impl("rollingq_fwd_nostats", "rollingq", "fwd", stats=False),
    Impl("rollingq_fwd_denserot", "rollingq", "fwd", dense_rotation=True),
    Impl("sdpa_flash_fwd", "sdpa_flash", "fwd"),
    Impl("sdpa_cudnn_fwd", "sdpa_cudnn", "fwd"),
    Impl("sdpa_efficient_fwd", "sdpa_efficient", "fwd"),
    Impl("flex_fwd", "flex", "fwd"),
    Impl("unfused_fwd", "unfused", "fwd"),
    Impl("rollingq_fwdbwd", "rollingq", "fwdbwd"),
    Impl("sdpa_flash_fwdbwd", "sdpa_flash", "fwdbwd"),
    Impl("sdpa_cudnn_fwdbwd", "sdpa_cudnn", "fwdbwd"),
    Impl("sdpa_efficient_fwdbwd", "sdpa_efficient", "fwdbwd"),
    Impl("flex_fwdbwd", "flex", "fwdbwd"),
)
_EXTRA_IMPL_LIST = (
    Impl("rollingq_dropout_fwd", "rollingq", "fwd", dropout=0.1),
    Impl("rollingq_dropout_fwdbwd", "rollingq", "fwdbwd", dropout=0.1),
    Impl("rollingq_varlen_fwd", "rollingq", "fwd", varlen=True),
    Impl("rollingq_varlen_fwdbwd", "rollingq", "fwdbwd", varlen=True),
    Impl("rollingq_mask_fwd", "rollingq", "fwd", mask=True),
    Impl("rollingq_mask_fwdbwd", "rollingq", "fwdbwd", mask=True),
    Impl("rollingq_bias_fwd", "rollingq", "fwd", bias=True),
    Impl("rollingq_bias_fwdbwd", "rollingq", "fwdbwd", bias=True),
)
IMPLS: Dict[str, Impl] = {i.name: i for i in _IMPL_LIST + _EXTRA_IMPL_LIST}
IMPL_ORDER = tuple(i.name for i in _IMPL_LIST)
EXTRA_IMPL_ORDER = tuple(i.name for i in _EXTRA_IMPL_LIST)
# The peers whose best defines "ratio to the best peer" (summarize.py keeps the same list).
PEER_FAMILIES = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex")
# Peak memory of fwd+bwd: ours against this peer (test_peak_memory; bench/launches.py precompiles ours).
MEMORY_IMPLS = ("rollingq_fwdbwd", "sdpa_flash_fwdbwd")
# FlexAttention's kernel cannot hold a head dim above 256 in an H100/H200's 227 KB of shared memory
# (docs/gpu.md: 512 KB at D 768). Recorded as that known failure without compiling it: the attempt
# costs a torch.compile on the clock of the GPU check and ends in the same error.
FLEX_MAX_HEAD_DIM = 256
FLEX_KNOWN_FAILURE = "fails: shared memory (known for D > 256, docs/gpu.md; not compiled)"


def _sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """One line for a record: the exception type and its most telling line (resource limits first)."""
    text = str(exc)
    match = re.search(r"[^\n]*(out of resource|shared memory)[^\n]*", text, flags=re.IGNORECASE)
    line = match.group(0) if match else next((ln for ln in text.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    reason = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _gqa_kwargs(q: torch.Tensor, k: torch.Tensor) -> dict:
    return {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}


# ---------------------------------------------------------------------------------------- rollingq
def _build_rollingq(inp: Inputs, impl: Impl) -> Callable[[], torch.Tensor]:
    import rollingq

    s = inp.shape
    rotation = (inp.dense_rotation if impl.dense_rotation else inp.rotation) if impl.stats else None
    rotate_rows = s.seq_len if impl.stats else None
    ids = varlen_ids(inp.modality_ids, s.batch) if impl.varlen else inp.modality_ids
    attn_mask = attn_mask_of(s.seq_len, inp.q.device) if impl.mask else None
    if impl.bias:
        attn_mask = bias_of(s.heads, s.seq_len, inp.q.dtype, inp.q.device, impl.direction == "fwdbwd")

    def forward() -> torch.Tensor:
        out, _ = rollingq.rollingq_attention(
            inp.q, inp.k, inp.v, ids, s.num_modalities, rotation=rotation, rotate_rows=rotate_rows,
            causal=s.causal, scale=None, stats=impl.stats, dropout_p=impl.dropout, attn_mask=attn_mask)
        return out

    return forward


def attn_mask_of(length: int, device) -> torch.Tensor:
    """bool [L, L], True = attend: query i skips key j when (i + j) % 10 == 9 (about 90% kept; the
    diagonal stays, so no row is empty). Built once, outside the timing."""
    i = torch.arange(length, device=device)
    return (i[:, None] + i[None, :]) % 10 != 9


def bias_of(heads: int, length: int, dtype: torch.dtype, device, requires_grad: bool) -> torch.Tensor:
    """A learned per-head bias [1, H, L, L] (normal, std 0.5; no -inf), as relative-position
    biases are. Built once, outside the timing; its .grad accumulates across timed runs, as in training."""
    gen = torch.Generator().manual_seed(0)
    bias = 0.5 * torch.randn(1, heads, length, length, generator=gen)
    return bias.to(device, dtype).requires_grad_(requires_grad)


def varlen_ids(modality_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[L] ids -> [B, L] ids whose row b is padded (-1) after L - floor(b * L / (2 * B)) keys."""
    L = modality_ids.shape[0]
    ids = modality_ids.expand(batch, L).clone()
    for b in range(batch):
        ids[b, L - (b * L) // (2 * batch):] = -1
    return ids


# -------------------------------------------------------------------------------------------- SDPA
def _build_sdpa(inp: Inputs, impl: Impl) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    backend = _sdpa_backends()[impl.family]
    extra = _gqa_kwargs(inp.q, inp.k)

    def forward() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(inp.q, inp.k, inp.v, is_causal=inp.shape.causal, **extra)

    return forward


# -------------------------------------------------------------------------------------------- flex
_COMPILED_FLEX = None


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _compiled_flex():
    """One compiled flex_attention for the session; dynamic=False gives one graph per shape."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch._dynamo

        from torch.nn.attention.flex_attention import flex_attention
        # 5 shapes x (inference, training) graphs exceed the default limit of 8 recompiles, past
        # which dynamo would silently run flex eagerly and time the unfused fallback.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
            torch._dynamo.config.fail_on_recompile_limit_hit = True
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _build_flex(inp: Inputs, impl: Impl, compile_flex: bool) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    s = inp.shape
    block_mask = None
    if s.causal:
        block_mask = create_block_mask(_causal_mod, B=None, H=None, Q_LEN=s.seq_len, KV_LEN=s.seq_len,
                                       device=inp.q.device)
    fn = _compiled_flex() if compile_flex else flex_attention
    extra = _gqa_kwargs(inp.q, inp.k)

    def forward() -> torch.Tensor:
        return fn(inp.q, inp.k, inp.v, block_mask=block_mask, **extra)

    return forward


# ----------------------------------------------------------------------------------------- unfused
def one_hot_values(modality_ids: torch.Tensor, num_modalities: int, batch: int, kv_heads: int,
                   width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, Hkv, Lk, width] SDPA values whose column m is 1 on the keys of modality m (width >= M).

    width = D so that every SDPA backend (flash needs equal q/k/v head dims) can run the mass pass.
    """
    if width < num_modalities:
        raise ValueError(f"width must be >= num_modalities ({num_modalities}), got {width}")
    ids = modality_ids.expand(batch, -1) if modality_ids.dim() == 1 else modality_ids
    cols = torch.arange(width, device=ids.device)
    vals = (ids.unsqueeze(-1) == cols).to(dtype)  # padding (-1) matches no column
    return vals.unsqueeze(1).expand(-1, kv_heads, -1, -1).contiguous()


def unfused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotation_t: torch.Tensor,
                      onehot_v: torch.Tensor, num_modalities: int, causal: bool):
    """The pipeline without the fused kernel, all rows rotated, inputs without padding keys.

    Args: q [B, H, L, D]; k, v [B, Hkv, L, D]; rotation_t [H, D, D] = rotation^T in q's dtype;
    onehot_v from `one_hot_values`. Returns out [B, H, L, D], attn_mass [B, H, L, M] float32,
    key_sum [B, Hkv, M, D] float32.
    """
    extra = _gqa_kwargs(q, k)
    qr = torch.matmul(q, rotation_t)  # q' = q @ R^T per head
    out = F.scaled_dot_product_attention(qr, k, v, is_causal=causal, **extra)
    mass = F.scaled_dot_product_attention(qr, k, onehot_v, is_causal=causal, **extra)
    mass = mass[..., :num_modalities].float()
    key_sum = torch.matmul(onehot_v[..., :num_modalities].transpose(-1, -2), k).float()
    return out, mass, key_sum


def _build_unfused(inp: Inputs, impl: Impl) -> Callable[[], torch.Tensor]:
    s = inp.shape
    # Depend only on the ids and the rotation: made once, outside the timed region.
    # The paper's code rotates with the dense matrix, whatever its structure.
    rotation_t = inp.rotation.dense(torch.float32).transpose(-1, -2).to(inp.q.dtype).contiguous()
    onehot_v = one_hot_values(inp.modality_ids, s.num_modalities, s.batch, s.num_kv_heads, s.head_dim,
                              inp.q.dtype)

    def forward() -> torch.Tensor:
        return unfused_attention(inp.q, inp.k, inp.v, rotation_t, onehot_v, s.num_modalities, s.causal)[0]

    return forward


# ------------------------------------------------------------------------------------------ driver
def _with_backward(forward: Callable[[], torch.Tensor], grad_out: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        out = forward()
        out.backward(grad_out)
        return out.detach()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(impl_name: str, inp: Inputs, compile_flex: bool = True) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running `impl_name` on `inp`, after one checked trial call.

    The trial call compiles / autotunes outside the timed region and sorts out the outcomes that are
    records rather than errors: NotApplicable (an SDPA backend declining the shape) and PeerFailed (a
    peer crashing or returning non-finite values). Errors of rollingq and of the unfused pipeline
    propagate unchanged. For fwd+bwd the inputs must require grad.
    """
    if impl_name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPL_ORDER}, got {impl_name!r}")
    impl = IMPLS[impl_name]
    if impl.direction == "fwdbwd" and not all(t.requires_grad for t in inp.leaves):
        raise ValueError(f"{impl_name}: fwd+bwd needs q, k, v with requires_grad=True")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if impl.family == "rollingq":
                forward = _build_rollingq(inp, impl)
            elif impl.family == "unfused":
                forward = _build_unfused(inp, impl)
            elif impl.family == "flex":
                forward = _build_flex(inp, impl, compile_flex)
            else:
                forward = _build_sdpa(inp, impl)
            step = _with_backward(forward, inp.grad_out) if impl.direction == "fwdbwd" else forward
            out = step()
            _sync(inp.q.device)
        except Exception as exc:
            if impl.family in ("rollingq", "unfused"):
                raise
            text = str(exc)
            if impl.family.startswith("sdpa") and ("No available kernel" in text or "No viable backend" in text):
                # SDPA explains the refusal in warnings ("Flash attention requires ..."), not in the error.
                notes = [str(w.message).splitlines()[0] for w in caught if "kernel not used" not in str(w.message)
                         and str(w.message).strip()]
                raise NotApplicable("; ".join(notes) or short_reason(exc)) from exc
            raise PeerFailed(short_reason(exc)) from exc
    for t in inp.leaves:
        t.grad = None
    if not bool(torch.isfinite(out).all()):
        if impl.family == "rollingq":
            raise AssertionError(f"{impl_name} returned non-finite values on {inp.shape.name}")
        raise PeerFailed("non-finite output")
    return step


# ------------------------------------------------------------------------------------------ timing
Timer = Callable[..., float]


def do_bench_ms(fn: Callable[[], object], grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median GPU time in ms by triton.testing.do_bench (warm-up, L2 flush between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                         return_mode="median"))


def wallclock_ms(fn: Callable[[], object], grad_to_none: Optional[Sequence[torch.Tensor]] = None,
                 repeats: int = 3) -> float:
    """Median wall time in ms of a few runs: the CPU stand-in for do_bench (dry runs, smoke test)."""
    times: List[float] = []
    for _ in range(repeats):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def env_info(device) -> Dict[str, str]:
    """Card and library versions stored with every record."""
    import triton

    device = torch.device(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"card": card, "device": device.type, "torch": torch.__version__, "triton": triton.__version__}


def measure_case(shape: Shape, impl_name: str, device, timer: Timer = do_bench_ms,
                 dtype: torch.dtype = torch.bfloat16, compile_flex: bool = True) -> Dict[str, object]:
    """Time one (shape, impl) and return its record: kind, shape, impl, direction, status, ms, tflops.

    status is "ok", "n/a: <reason>" or "fails: <reason>"; ms and tflops are None unless ok.
    """
    if impl_name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPL_ORDER}, got {impl_name!r}")
    impl = IMPLS[impl_name]
    record: Dict[str, object] = {"kind": "attention", "shape": shape.name, "impl": impl_name,
                                 "family": impl.family, "direction": impl.direction,
                                 "dtype": str(dtype).replace("torch.", ""), "status": "ok",
                                 "ms": None, "tflops": None, "flops": shape.flops(impl.direction)}
    record.update(env_info(device))
    if impl.family == "flex" and shape.head_dim > FLEX_MAX_HEAD_DIM:
        record["status"] = FLEX_KNOWN_FAILURE
        return record
    fwdbwd = impl.direction == "fwdbwd"
    inp = make_inputs(shape, device, dtype, requires_grad=fwdbwd)
    try:
        step = build(impl_name, inp, compile_flex=compile_flex)
    except NotApplicable as exc:
        record["status"] = f"n/a: {exc}"
        return record
    except PeerFailed as exc:
        record["status"] = f"fails: {exc}"
        return record
    ms = timer(step, grad_to_none=inp.leaves if fwdbwd else None)
    record["ms"] = ms
    record["tflops"] = shape.flops(impl.direction) / ms / 1e9
    return record


def peak_memory_bytes(step: Callable[[], object], leaves: Iterable[torch.Tensor], device) -> int:
    """Peak CUDA memory allocated by one call of `step` above what was allocated before it."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def _peak_of(name: str, shape: Shape, device, dtype: torch.dtype, record: Dict[str, object]) -> Optional[int]:
    inp = make_inputs(shape, device, dtype, requires_grad=True)
    try:
        step = build(name, inp)  # the trial call also autotunes, so tuning buffers are not counted
    except (NotApplicable, PeerFailed) as exc:
        record[f"{name}_status"] = f"{'n/a' if isinstance(exc, NotApplicable) else 'fails'}: {exc}"
        return None
    return peak_memory_bytes(step, inp.leaves, device)


def measure_peak_memory(shape: Shape, device, dtype: torch.dtype = torch.bfloat16,
                        impls: Sequence[str] = MEMORY_IMPLS) -> Dict[str, object]:
    """Peak-memory record of fwd+bwd: bytes per impl and the ratio impls[0] / impls[1] (None if n/a)."""
    record: Dict[str, object] = {"kind": "peak_memory", "shape": shape.name, "dtype": str(dtype).replace("torch.", "")}
    record.update(env_info(device))
    for name in impls:
        record[f"{name}_bytes"] = _peak_of(name, shape, device, dtype, record)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # the next impl starts from the same baseline
    ours, peer = (record[f"{n}_bytes"] for n in impls)
    record["ratio"] = ours / peer if ours is not None and peer else None
    record["impls"] = list(impls)
    return record
