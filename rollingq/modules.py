"""RollingQAttention: a multi-head attention layer for multimodal fusion with a RollingQ rotation."""
from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import functional
from .rotation import LowRankRotation, low_rank_rotation
from .stats import AttentionStats
from .validation import (MAX_MODALITIES, SUPPORTED_DTYPES, capturing_cuda_graph, check_dropout, check_values_always,
                         checked_values, readable, tensor_version, value_checks_enabled)

__all__ = ["RollingQAttention"]

# The layer's fusion tokens take one more of the kernel's statistics classes, their own.
MAX_FUSED_MODALITIES = MAX_MODALITIES - 1


def _recomputing() -> bool:
    """True while a forward runs inside a backward pass: activation checkpointing recomputing it.
    Such a rerun must not report the batch to the controller a second time. (Not asked while
    torch.compile traces: the tracer cannot follow the call.)"""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class RollingQAttention(nn.Module):
    """Multi-head self-attention over `[fusion tokens | modality tokens]` (batch_first), with a
    per-head rotation of the fusion queries (RollingQ, method.md) and per-modality statistics.

    Args:
        embed_dim: E, the token width; must be divisible by num_heads (head_dim = E / num_heads).
        num_heads: H query heads.
        num_modalities: M, 1..15 (the fusion tokens take class M in the kernel's statistics).
        num_fusion_tokens: nf >= 1, the leading tokens of every sequence (e.g. one CLS token).
        rotate: "fusion" rotates the queries of the fusion tokens only (the paper), "all" every query.
        kv_heads: key/value heads (GQA), must divide num_heads; default num_heads.
        bias: bias in the four projections.
        dropout: attention dropout probability in [0, 1), applied in training mode only (as
            nn.MultiheadAttention's `dropout`); the statistics are those without dropout.

    The rotation buffer `rotation` [H, D, D] float32 starts as the identity, is saved in the
    state_dict, is not trained (gradients flow through it into q_proj), and keeps float32 when the
    module is cast to another dtype. A `RollingQ` controller updates it.

    The kernel gets the rotation as `LowRankRotation` (I + left @ right^T) while R - I has rank
    at most head_dim // 8: every plane rotation adds 2, and the identity (rank 0) means no
    rotation at all. At the paper's head of 768 that turns rotating from a D x D matmul per query
    into a memory-bound pass. The factors are recomputed (an SVD on the CPU) only when the buffer's
    values change; a write to the buffer (its version counter) costs one comparison with the last
    factored values, a host sync on CUDA. DDP's default `broadcast_buffers=True` rewrites the buffer
    before every forward: since `RollingQ` rotates every rank identically, `broadcast_buffers=False`
    (as `rollingq.train` does, if no other buffer needs it) saves that sync and the broadcast.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_modalities: int, num_fusion_tokens: int = 1,
                 rotate: str = "fusion", kv_heads: Optional[int] = None, bias: bool = True,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()

        def positive_int(name, val, lo=1):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {val!r}")

        positive_int("embed_dim", embed_dim)
        positive_int("num_heads", num_heads)
        positive_int("num_fusion_tokens", num_fusion_tokens)
        kv_heads = num_heads if kv_heads is None else kv_heads
        positive_int("kv_heads", kv_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % kv_heads:
            raise ValueError(f"kv_heads ({kv_heads}) must divide num_heads ({num_heads})")
        if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) \
                or not 1 <= num_modalities <= MAX_FUSED_MODALITIES:
            raise ValueError(f"num_modalities must be an int in 1..{MAX_FUSED_MODALITIES} "
                             f"(the fusion tokens take one more class), got {num_modalities!r}")
        if rotate not in ("fusion", "all"):
            raise ValueError(f"rotate must be 'fusion' or 'all', got {rotate!r}")
        check_dropout(dropout, "dropout")

        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.kv_heads = kv_heads
        self.head_dim = embed_dim // num_heads
        self.num_modalities = num_modalities
        self.num_fusion_tokens = num_fusion_tokens
        self.rotate = rotate
        self.dropout = float(dropout)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_heads * self.head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_heads * self.head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * self.head_dim, embed_dim, bias=bias, **factory)
        self.register_buffer("rotation", torch.empty(num_heads, self.head_dim, self.head_dim, dtype=torch.float32,
                                                     device=device))
        self.controller = None  # set by RollingQ; a plain attribute (RollingQ is no nn.Module)
        # The nn.Linear layers initialised themselves; re-initialising them here would draw from
        # the generator twice and change every seeded model.
        self._reset_rotation()

    def reset_parameters(self) -> None:
        """Re-initialise what __init__ initialises: the four projections (nn.Linear's own init)
        and the rotation (the identity, in place: the buffer object stays). E.g. after
        `RollingQAttention(..., device="meta").to_empty(device=...)`, whose buffers hold garbage."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.reset_parameters()
        self._reset_rotation()

    def _reset_rotation(self) -> None:
        with torch.no_grad():
            self.rotation.copy_(torch.eye(self.head_dim, dtype=torch.float32, device=self.rotation.device))
        # (buffer, (version, data pointer), a copy of its values, the form passed on); dropped so no
        # factors of the old values survive.
        self._kernel_rotation = None

    def _apply(self, fn, *args, **kwargs):
        # Keep the rotation in float32 through .half()/.to(dtype): a low-precision rotation is no
        # longer orthogonal. Device moves still apply.
        saved = self.rotation
        out = super()._apply(fn, *args, **kwargs)
        if self.rotation.dtype != torch.float32:
            self.rotation = saved.to(device=self.rotation.device, dtype=torch.float32)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) (the meta-init idiom) replaces the buffer with the saved
        # tensor: a bf16 checkpoint would leave a bf16 rotation, which _apply never sees.
        if self.rotation.dtype != torch.float32:
            self.rotation = self.rotation.float()

    def _replicate_for_data_parallel(self):
        # nn.DataParallel's replicas share the controller but are not the layer it tracks: their
        # statistics would come from several threads into one set of sums, or be lost.
        if self.controller is not None:
            raise RuntimeError("RollingQAttention with a RollingQ controller attached does not run under "
                               "nn.DataParallel; use torch.nn.parallel.DistributedDataParallel (the controller "
                               "all-reduces its statistics across processes)")
        return super()._replicate_for_data_parallel()

    def __getstate__(self):
        # A pickled or deep-copied layer does not drag its controller (and its logger) along.
        state = self.__dict__.copy()
        state["controller"] = None
        state["_kernel_rotation"] = None
        return state

    def rotation_for_kernel(self) -> Union[torch.Tensor, LowRankRotation]:
        """The rotation as `forward` passes it on: a `LowRankRotation` while R - I has rank at most
        head_dim // 8 (rank 0: the identity, no rotation), else the dense buffer. While
        torch.compile traces or a CUDA graph is captured (and on the meta device), the dense
        buffer: the factor cache is Python-side state that a compiled graph or a graph replay would
        not see change, while the buffer is updated in place (`RollingQ` writes it with copy_), so
        replays use the current one. Write the buffer in place under `torch.no_grad()` (as
        `RollingQ` does) or assign a new tensor; a write through `rotation.data.copy_` (or a
        torch.distributed collective) keeps the version counter and would leave the factors stale,
        unless ROLLINGQ_CHECK_VALUES=always, which compares the values on every call."""
        R = self.rotation
        if torch.compiler.is_compiling() or capturing_cuda_graph(R.device) or R.is_meta \
                or not readable(R):  # batched by torch.func: no storage to key the cache on
            return R
        cache = self._kernel_rotation
        version = tensor_version(R)
        # The data pointer sees `rotation.data = X`, which leaves the version counter alone.
        version = None if version is None else (version, R.data_ptr())
        # ROLLINGQ_CHECK_VALUES=always: the escape hatch for writes the version does not see, so
        # the values are compared (below) on every call.
        if cache is not None and cache[0] is R and version is not None and cache[1] == version \
                and not check_values_always():
            return cache[3]
        with torch.no_grad():
            if cache is not None and cache[2].shape == R.shape and cache[2].device == R.device \
                    and torch.equal(cache[2], R):  # rewritten with the same values, e.g. a DDP buffer broadcast
                self._kernel_rotation = (R, version) + cache[2:]
                return cache[3]
            # A NaN or inf (a bad checkpoint, a diverged update): name the buffer, not an argument.
            if not bool(torch.isfinite(R.float()).all()):
                raise ValueError("rotation (the RollingQAttention buffer) must be finite in float32 (it holds "
                                 "NaN or inf, or values past float32's range)")
            factors = low_rank_rotation(R, max_rank=self.head_dim // 8)
            form = R if factors is None else factors
            self._kernel_rotation = (R, version, R.detach().clone(), form)
        return form

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kv_heads={self.kv_heads}, "
                f"num_modalities={self.num_modalities}, num_fusion_tokens={self.num_fusion_tokens}, "
                f"rotate={self.rotate!r}" + (f", dropout={self.dropout}" if self.dropout else ""))

    def _modality_ids(self, modality_ids, key_padding_mask, B: int, L: int, device) -> torch.Tensor:
        """-> [L] or [B, L] int64 ids over all tokens: fusion tokens = M, padding = -1."""
        nf, M = self.num_fusion_tokens, self.num_modalities
        Lm = L - nf
        if not isinstance(modality_ids, torch.Tensor):
            raise TypeError(f"modality_ids must be a torch.Tensor, got {type(modality_ids).__name__}")
        if modality_ids.dtype.is_floating_point or modality_ids.dtype == torch.bool or modality_ids.is_complex():
            raise TypeError(f"modality_ids must be an integer tensor, got {modality_ids.dtype}")
        if not ((modality_ids.dim() == 1 and modality_ids.shape[0] == Lm)
                or (modality_ids.dim() == 2 and tuple(modality_ids.shape) == (B, Lm))):
            raise ValueError(f"modality_ids must cover the modality tokens only: shape [L - num_fusion_tokens] = "
                             f"[{Lm}] or [B, {Lm}], got {tuple(modality_ids.shape)}")
        if modality_ids.numel() and value_checks_enabled(modality_ids.device) and readable(modality_ids):
            # Checked here, not by the op: there an id of M would pass silently as the fusion class.
            # On the tensor as passed (a CPU one costs no sync) and once per tensor version.
            lo, hi = checked_values.ids_range(modality_ids)
            if lo < -1 or hi >= M:
                raise ValueError(f"modality_ids must hold values in 0..{M - 1} (or -1 for padding), "
                                 f"got range {lo}..{hi}")
        ids = modality_ids.to(device=device, dtype=torch.int64)
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True = padding)")
            if tuple(key_padding_mask.shape) != (B, Lm):
                raise ValueError(f"key_padding_mask must have shape [B, L - num_fusion_tokens] = [{B}, {Lm}], "
                                 f"got {tuple(key_padding_mask.shape)}")
            ids = ids.expand(B, Lm).masked_fill(key_padding_mask.to(device), -1)
        # Shared ids stay [L]: the kernel broadcasts them over the batch without a copy.
        fusion = torch.full(ids.shape[:-1] + (nf,), M, dtype=ids.dtype, device=device)
        return torch.cat([fusion, ids], dim=-1)

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None,
                need_stats: bool = False,
                attn_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[AttentionStats]]:
        """
        Args:
            x: [B, L, E], the first `num_fusion_tokens` tokens are the fusion tokens.
            modality_ids: int [L - nf] or [B, L - nf]: modality 0..M-1 of each modality token.
            key_padding_mask: optional bool [B, L - nf], True = padding (ignored as a key).
            need_stats: return the statistics even when no controller is collecting.
            attn_mask: optional, as nn.MultiheadAttention's: bool, True = the query may NOT attend
                the key, or float (fp16/bf16/fp32), added to the scaled scores; [L, L] or
                broadcastable 4-D [B, H, L, L] (queries and keys both over all L tokens, fusion
                tokens first). It applies on top of key_padding_mask, and the statistics the
                controller sees are those of the masked attention.

        Returns:
            out: [B, L, E].
            stats: None unless requested (need_stats, or an attached controller collecting); then
                `AttentionStats` with M + 1 classes, the last (index M) being the fusion tokens:
                attn_mass [B, H, L, M + 1], key_sum [B, Hkv, M + 1, D], key_count [B, M + 1].
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape [B, L, embed_dim = {self.embed_dim}], got {shape}")
        B, L, _ = x.shape
        nf = self.num_fusion_tokens
        if L <= nf:
            raise ValueError(f"x must hold num_fusion_tokens ({nf}) fusion tokens and at least one modality "
                             f"token, got L = {L}")
        if not isinstance(need_stats, bool):  # as the op's `stats`: "no" or None must not mean yes or no
            raise TypeError(f"need_stats must be a bool, got {type(need_stats).__name__}")
        ids = self._modality_ids(modality_ids, key_padding_mask, B, L, x.device)
        H, Hkv, D = self.num_heads, self.kv_heads, self.head_dim
        if attn_mask is not None:
            if not isinstance(attn_mask, torch.Tensor):
                raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
            if attn_mask.dim() not in (2, 4):
                shape = tuple(attn_mask.shape)
                raise ValueError(f"attn_mask must be [L, L] or 4-D broadcastable to [B, H, L, L] = [{B}, {H}, {L}, {L}] "
                                 f"(nn.MultiheadAttention's [B * H, L, L]: pass it as .view(B, H, L, L)), got {shape}")
            if attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask  # nn.MultiheadAttention's True = masked -> the kernel's True = attend
        # [B, L, H, D] -> [B, H, L, D] views: the kernel reads strided inputs, no copies.
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, L, Hkv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, L, Hkv, D).transpose(1, 2)
        if q.dtype not in SUPPORTED_DTYPES:  # named here: the op's error would name a q the caller never passed
            raise TypeError(f"RollingQAttention computes in one of {SUPPORTED_DTYPES}; its projections of x gave "
                            f"{q.dtype} (x {x.dtype}, weights {self.q_proj.weight.dtype})")

        ctrl = self.controller
        report = ctrl is not None and bool(ctrl.collecting) \
            and (self.training or bool(getattr(ctrl, "in_full_pass", False))) and not _recomputing()
        want_stats = need_stats or report
        out, stats = functional.attention(
            q, k, v, ids, self.num_modalities + 1, rotation=self.rotation_for_kernel(),
            rotate_rows=nf if self.rotate == "fusion" else L, stats=want_stats, ids_in_range=True,
            dropout_p=self.dropout if self.training else 0.0, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, H * D))
        if report:
            # float32 even under autocast: the controller averages these over a whole epoch.
            with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                # Mean over the fusion tokens commutes with the linear rotation.
                q_mean = q[:, :, :nf].detach().float().mean(2)  # [B, H, D]
                q_fusion = torch.einsum("bhd,hed->bhe", q_mean, self.rotation.float())
            ctrl.observe(self, q_fusion, stats)
        return out, stats
