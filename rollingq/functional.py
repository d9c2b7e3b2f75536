"""Public functional API: argument checks and dispatch to the fused kernel or the reference."""
import os
from typing import Optional, Tuple

import torch

from .ops import attention_fwd_op
from .reference import key_counts, rollingq_attention_reference
from .stats import AttentionStats
from .rotation import LowRankRotation
from .validation import SUPPORTED_DTYPES, Rotation, RotateRows, check_inputs, plain_scalars


_CPU_BACKENDS = ("auto", "reference", "interpreter")
# Devices the dispatch knows: anything else is refused rather than run on the O(L^2) reference.
_DEVICE_TYPES = ("cuda", "cpu", "meta")


def cpu_backend_from_env() -> str:
    """ROLLINGQ_CPU_BACKEND (unset or empty: "auto"), validated: a typo must not silently mean
    "auto"."""
    backend = os.environ.get("ROLLINGQ_CPU_BACKEND", "") or "auto"
    if backend not in _CPU_BACKENDS:
        raise ValueError(f"ROLLINGQ_CPU_BACKEND must be one of {_CPU_BACKENDS}, got {backend!r}")
    return backend


_cpu_backend = cpu_backend_from_env()


def set_cpu_backend(backend: str) -> str:
    """Choose what runs CPU tensors: "reference" (PyTorch), "interpreter" (the Triton kernels
    through TRITON_INTERPRET=1, slow, for testing them) or "auto" (the interpreter when
    TRITON_INTERPRET=1 is set, else the reference). Returns the previous setting."""
    global _cpu_backend
    if backend not in _CPU_BACKENDS:
        raise ValueError(f"backend must be one of {_CPU_BACKENDS}, got {backend!r}")
    previous, _cpu_backend = _cpu_backend, backend
    return previous


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def uses_kernel(device: torch.device) -> bool:
    """True where `rollingq_attention` runs the Triton kernels: CUDA, or CPU under the interpreter.
    False on CPU otherwise and on meta (PyTorch ops). Raises NotImplementedError for any other
    device type (mps, xpu, ...): design.md forbids a silent fall back to the slow reference."""
    if device.type not in _DEVICE_TYPES:
        raise NotImplementedError(
            f"q is on a {device.type!r} device: rollingq_attention runs on 'cuda' (the Triton kernels), "
            f"'cpu' (the PyTorch reference, or the Triton interpreter) and 'meta'; move q, k, v there, or call "
            f"rollingq.reference.rollingq_attention_reference (plain PyTorch, O(L^2) memory) explicitly")
    if device.type == "cuda":
        return True
    if device.type != "cpu" or _cpu_backend == "reference":
        return False
    if _cpu_backend == "interpreter" and not _interpreting():
        raise RuntimeError("set_cpu_backend('interpreter') needs TRITON_INTERPRET=1 set before Triton is imported")
    return _interpreting()


def rollingq_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    modality_ids: torch.Tensor,
    num_modalities: int,
    rotation: Rotation = None,
    rotate_rows: RotateRows = None,
    causal: bool = False,
    scale: Optional[float] = None,
    stats: bool = True,
    dropout_p: float = 0.0,
    attn_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """Multimodal attention with RollingQ query rotation and per-modality statistics.

    Args:
        q: [B, H, Lq, D] queries; k, v: [B, Hkv, Lk, D] with H % Hkv == 0 (GQA). One dtype among
            float16, bfloat16, float32. Strided views are accepted as they are. D up to 1024
            where the kernels run (D above 256 through a split over D).
        modality_ids: int [Lk] (shared by the batch) or [B, Lk]: the modality 0..M-1 of each key,
            or -1 for padding (the key is ignored).
        num_modalities: M, 1..16.
        rotation: [H, D, D] per-head rotation, a `rollingq.rotation.LowRankRotation` (the same
            rotation as I + left @ right^T: what `RollingQAttention` passes after plane rotations,
            much cheaper at large D; above rank 64 it runs as the dense matrix), or None. Selected
            rows use q' = q @ rotation[h]^T. Treated as a constant (no gradient). In float16 the
            rotated rows must fit float16: a rotation keeps a row's norm but may gather it into
            one component, so a row of norm above 65504 can overflow there (the kernels rotate in
            float32 and round the rotated row).
        rotate_rows: which query rows are rotated: None (none), an int n (rows 0..n-1), or a bool
            mask [Lq] or [B, Lq].
        causal: query i sees keys 0..i; requires Lq == Lk.
        scale: softmax scale, default 1/sqrt(D); any real number up to 2.36e38 in magnitude.
            The scaled scores scale * (q . k) must stay within float32's range (3.4e38), or the
            row is NaN, as with SDPA.
        stats: a bool; False skips the statistics (plain fused attention) and returns None for them.
        dropout_p: attention dropout, in [0, 1): each attention probability is zeroed with this
            probability and the kept ones are scaled by 1 / (1 - dropout_p) (as in SDPA; pass 0
            in evaluation). The statistics are those of the attention without dropout. The masks
            come from a seed drawn from PyTorch's generator on q's device (`dropout_seed`).
        attn_mask: as SDPA's, broadcastable to [B, H, Lq, Lk]: bool (True = the query may attend
            the key) or float16/bfloat16/float32 (added to the scaled scores; -inf hides the key,
            NaN and +inf are refused). It applies on top of the padding ids and `causal`, and
            the statistics (`attn_mass`) are those of the masked attention. A float mask that
            requires grad (a learned bias: relative positions, ALiBi-style slopes) gets its
            gradient, summed over its broadcast dims: by float32 atomics into its own shape for a
            contiguous bias shared by batch and/or heads with whole [Lq, Lk] dims (run-to-run
            rounding differences), else (and in deterministic mode) through a dense
            [B, H, Lq, Lk] buffer, as SDPA's memory-efficient backward does (B * H * Lq * Lk
            elements of memory; kernels/attn_mask.grad_plan). Broadcast dims are read with
            stride 0, not copied; every score tile reads its part of the mask (no key block is
            skipped for it). A mask whose [Lq, Lk] slice spans 2^31 elements (dense [L, L] from
            L = 46341 on) is read with 64-bit offsets; a dense gradient buffer needs
            Lq * Lk < 2^31 (the kernels refuse larger ones).

    B, Lq and Lk may be 0 (H and D may not): the results are then empty, or for Lk = 0 zero rows
    (no row has a live key); `key_sum` still sums the keys when Lq = 0. Meta tensors give
    results of the right shapes and dtypes.

    Returns:
        out: [B, H, Lq, D] in v's dtype, differentiable in q, k, v.
        stats: `AttentionStats(attn_mass [B, H, Lq, M] float32, key_sum [B, Hkv, M, D] float32,
            key_count [B, M] int64)`, or None when stats=False. A row with no live key gets a zero
            output row and a zero mass row.
    """
    return attention(q, k, v, modality_ids, num_modalities, rotation, rotate_rows, causal, scale, stats,
                     dropout_p=dropout_p, attn_mask=attn_mask)


def dropout_seed(device) -> torch.Tensor:
    """The seed of one call's dropout masks, int64 [1] on `device`, drawn from PyTorch's generator
    there: no host sync, repeated by torch.manual_seed, redrawn at each CUDA graph replay.
    `rollingq.kernels.dropout.keep_mask(seed, ...)` rebuilds the masks from it."""
    return torch.randint(0, 2 ** 62, (1,), device=device, dtype=torch.int64)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, modality_ids: torch.Tensor, num_modalities: int,
              rotation: Rotation = None, rotate_rows: RotateRows = None, causal: bool = False,
              scale: Optional[float] = None, stats: bool = True,
              ids_in_range: bool = False, dropout_p: float = 0.0,
              attn_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
    """`rollingq_attention`, for callers that have checked the ids' values themselves
    (`ids_in_range=True`: RollingQAttention builds its ids from checked ones, so re-reading them
    would cost a second host sync per call)."""
    num_modalities, rotate_rows, causal, scale, stats = plain_scalars(
        num_modalities, rotate_rows, causal, scale, stats)
    # is_autocast_enabled raises for "meta" (torch.amp.is_autocast_available would say so, but
    # Dynamo in torch 2.11 cannot trace it)
    if all(isinstance(t, torch.Tensor) for t in (q, k, v)) and q.device.type != "meta" \
            and torch.is_autocast_enabled(q.device.type):
        # Like SDPA under autocast: run in the autocast dtype, statistics still in float32.
        dtype = torch.get_autocast_dtype(q.device.type)

        def cast(t: torch.Tensor) -> torch.Tensor:
            # Only what autocast itself casts (floating point, not float64, on its device): int or
            # float64 inputs reach check_inputs as they are and get its TypeError.
            eligible = t.is_floating_point() and t.dtype != torch.float64 and t.device.type == q.device.type
            return t.to(dtype) if eligible else t

        with torch.autocast(q.device.type, enabled=False):
            return attention(cast(q), cast(k), cast(v), modality_ids, num_modalities,
                             rotation, rotate_rows, causal, scale, stats, ids_in_range, dropout_p, attn_mask)
    check_inputs(q, k, v, modality_ids, num_modalities, rotation, rotate_rows, causal, scale,
                 allowed_dtypes=SUPPORTED_DTYPES, ids_in_range=ids_in_range, dropout_p=dropout_p, attn_mask=attn_mask,
                 stats=stats)
    if not isinstance(dropout_p, torch.SymFloat):  # a traced value stays symbolic (no recompile per value)
        dropout_p = float(dropout_p)
    kernel = uses_kernel(q.device)
    if kernel and q.shape[-1] > MAX_KERNEL_HEAD_DIM:
        raise ValueError(f"q's head dim must be at most {MAX_KERNEL_HEAD_DIM} where the kernels run, got "
                         f"{q.shape[-1]}: the D-split forward keeps every D chunk's state on chip, which outgrows "
                         f"the cards' shared memory above that (rollingq.reference computes any head dim)")
    if not kernel or q.numel() == 0 or k.shape[2] == 0:
        # Empty batch or sequences: no attention to compute (zero rows when Lk = 0; for Lq = 0
        # only the key statistics), so PyTorch ops give the result without a kernel launch.
        # 16-bit inputs compute in float32, as the kernels accumulate: in their own dtype q . k
        # overflows float16 (NaN) and bf16 scores lose ~8x the accuracy. Output dtypes unchanged.
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else None
        return rollingq_attention_reference(
            q, k, v, modality_ids, num_modalities, rotation, rotate_rows, causal, scale, stats, dropout_p,
            attn_mask=attn_mask, compute_dtype=compute_dtype)

    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # Triton 3.6's interpreter multiplies bf16 bit patterns in tl.dot (garbage, not an error).
        raise NotImplementedError("q, k, v in bfloat16 cannot run through Triton's CPU interpreter; use "
                                  "float16/float32, a CUDA device, or set_cpu_backend('reference')")

    D = q.shape[-1]
    ids, rot, rot_mask = kernel_arguments(q, k, modality_ids, rotation, rotate_rows)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
        attn_mask is not None and attn_mask.requires_grad))
    out, _, _, mass, key_sum = attention_fwd_op(
        q, k, v, ids, num_modalities, rot, rot_mask, causal, float(D ** -0.5 if scale is None else scale),
        stats, needs_grad and rot is not None, dropout_p, dropout_seed(q.device) if dropout_p > 0 else None,
        attn_mask)
    if not stats:
        return out, None
    return out, AttentionStats(mass, key_sum, key_counts(ids, num_modalities))


# The D-split forward holds every D chunk's state on chip: its sm_90 builds need 144 KB of shared
# memory at D 1024 (no spill), 208-224 KB with spills at 1536, and over the card's 227 KB at 2048.
MAX_KERNEL_HEAD_DIM = 1024

# Above this rank the factored form goes to the launchers as the dense matrix it stands for: the
# factored rotate kernel holds [rows, r] and [D, r] tiles on chip (r = 768 at D 768 needs 397 KB of
# shared memory on sm_90, past the card's 227 KB; r <= 64 builds without spills on sm_90 and sm_80),
# and from r ~ D / 2 on the dense product is the cheaper one anyway.
MAX_FACTORED_RANK = 64


def kernel_arguments(q: torch.Tensor, k: torch.Tensor, modality_ids: torch.Tensor,
                     rotation: Rotation, rotate_rows: RotateRows):
    """What the kernel path hands the fused op, from validated arguments: int32 ids [B, Lk] (shared
    ids as a stride-0 batch view, no copy), the rotation in float32 (dense [H, D, D], or a
    LowRankRotation packed as [H, 2, D, r] = (left, right)) and a uint8 row mask [B, Lq] (both None
    when no row is rotated or the rotation is the identity, r = 0; the mask alone None when every
    row is, which the launchers know without reading it). bench/launches.py drives the kernels
    through it too."""
    B, _, Lq, _ = q.shape
    if modality_ids.dim() == 2 and modality_ids.stride(0) == 0:
        modality_ids = modality_ids[0]  # a shared layout passed as a batch view stays shared after the cast
    ids = modality_ids.to(torch.int32).expand(B, k.shape[2])
    if rotation is None or rotate_rows is None or (isinstance(rotate_rows, int) and rotate_rows == 0):
        return ids, None, None
    if isinstance(rotation, LowRankRotation):
        if rotation.rank == 0:
            return ids, None, None
        if rotation.rank > MAX_FACTORED_RANK:
            rot = rotation.dense(torch.float32).detach()
        else:
            rot = torch.stack([rotation.left.detach(), rotation.right.detach()], 1).float()
    else:
        rot = rotation.detach().float()
    if isinstance(rotate_rows, int) and rotate_rows == Lq:
        return ids, rot, None
    # Cast, not a bool -> uint8 dtype view: Inductor (torch 2.11) cannot lower that view. A shared
    # [Lq] mask stays a stride-0 batch view; a [B, Lq] one is copied (B * Lq bytes).
    mask = rotate_rows if isinstance(rotate_rows, torch.Tensor) else torch.arange(Lq, device=q.device) < rotate_rows
    return ids, rot, mask.to(torch.uint8).expand(B, Lq)
