"""The RollingQ policy (method.md): gather statistics from RollingQAttention layers, decide at the
end of an epoch (or every N steps) whether to rotate each head's fusion query, and update the
layers' rotation buffers."""
import json
import logging
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch

from .rotation import (air_from_cos, balanced_target, imbalance_sums, key_gap, plane_rotation, sample_mean_keys,
                       svd_rotation)
from .stats import AttentionStats

__all__ = ["RollingQ"]

_log = logging.getLogger("rollingq")

# Per-layer running sums, all float64. Names and shapes (H heads, Hkv kv heads, M modalities):
_SUM_SHAPES = {
    "key_mean_sum": lambda H, Hkv, M, D: (Hkv, M, D),  # sum over samples of per-sample mean keys
    "key_n": lambda H, Hkv, M, D: (M,),                # samples that have keys of modality m
    "query_sum": lambda H, Hkv, M, D: (H, D),          # sum of effective fusion queries
    "cos_sum": lambda H, Hkv, M, D: (H, M),            # sum of cos(q, per-sample mean key)
    "cos_n": lambda H, Hkv, M, D: (M,),                # samples counted in cos_sum[:, m]
    "mass_sum": lambda H, Hkv, M, D: (H, M + 1),       # fusion rows' attention mass, last = fusion
    "samples": lambda H, Hkv, M, D: (1,),              # samples observed
    # > 0: the head rotated (by the other accumulator's decision) after samples were summed here, so
    # its query and cosine sums mix two rotations and it does not rotate from them. A sum, so that
    # the all-reduce gives every rank the same answer even where only some ranks had samples.
    "stale": lambda H, Hkv, M, D: (H,),
}


def _to_list(t: torch.Tensor) -> Any:
    """Tensor -> nested lists of floats, NaN/inf -> None (valid JSON)."""
    def clean(v):
        if isinstance(v, list):
            return [clean(e) for e in v]
        return v if math.isfinite(v) else None
    return clean(t.detach().double().cpu().tolist())


class RollingQ:
    """Rotates the fusion query of RollingQAttention layers toward a balanced key direction.

    Args:
        layers: one RollingQAttention or a sequence of them. Each gets `layer.controller = self`.
        beta: trigger threshold; a head rotates when max(c) - min(c) > beta (|AIR| for M = 2).
        sigma: sharpness of the balanced target's weights softmax(-2 sigma c): sigma > 0 gives the
            less-attended modality (lower c) more weight, sigma < 0 the favoured one; 0 = equal weights.
        max_rotations: how many times each head may rotate in total (each head of each layer
            keeps its own count, as each has its own fusion query; the paper's single head: the
            layer's).
        window: online estimation collects over the last `window` steps of each epoch (for
            `epoch_end`) and, with `every_n_steps`, over the `window` steps before each step
            decision; None collects on every step (for a step decision: every step since the last).
            0 collects nothing online: with `full_pass` before each `epoch_end`, the training steps
            then run without statistics (not with `every_n_steps`, which has no pass of its own).
        epoch_window: the epoch accumulator's own window, when it differs from `window` (default
            "window": the same). 0 with `full_pass` plus `every_n_steps`: the steps collect only for the step
            decisions, since `full_pass` replaces the epoch's online window anyway.
        rotation: "plane" (minimal rotation, default) or "svd" (the official construction).
        every_n_steps: if set, `step()` also decides every N steps.
        logger: callable receiving each decision record (a JSON-serialisable dict); default:
            the "rollingq" python logger at INFO level.

    Use: call `begin_epoch(steps_per_epoch)` at the start of each epoch, `step()` after each
    optimiser step, and `epoch_end()` at the end of the epoch. For the official estimate (a pass
    over the training set in eval mode), call `full_pass(model, loader)` before `epoch_end()`.
    Under torch.distributed the sums are all-reduced in `epoch_end()` (and in each `every_n_steps`
    decision), so every rank must call it and every rank applies the identical rotation.

    Two accumulators keep the two decisions apart: the epoch one (the epoch's last `epoch_window`
    steps, or `full_pass`), read and reset by `epoch_end()`, and the step one (the `window` steps before
    each `every_n_steps` decision), read and reset by that decision. A batch in both windows counts
    in both, so a step decision never takes the samples of the epoch-end decision. A head that one
    decision rotates does not rotate again from the other accumulator's samples summed before that
    rotation (the record lists it in `stale_heads`): they hold its queries as they were before.
    """

    def __init__(self, layers, beta: float = 0.0, sigma: float = 0.0, max_rotations: int = 1,
                 window: Optional[int] = 5, rotation: str = "plane", every_n_steps: Optional[int] = None,
                 logger: Optional[Callable[[Dict[str, Any]], None]] = None,
                 epoch_window: Union[int, None, str] = "window") -> None:
        from .modules import RollingQAttention  # modules imports nothing from here at import time

        if isinstance(layers, RollingQAttention):
            layers = [layers]
        try:
            layers = list(layers)
        except TypeError:
            raise TypeError(f"layers must be a RollingQAttention or a sequence of them, got {type(layers).__name__}") from None
        if not layers:
            raise ValueError("layers must hold at least one RollingQAttention")
        for i, layer in enumerate(layers):
            if not isinstance(layer, RollingQAttention):
                raise TypeError(f"layers[{i}] must be a RollingQAttention, got {type(layer).__name__}")
            if layer.num_modalities < 2:
                raise ValueError(f"layers[{i}] has num_modalities = {layer.num_modalities}; RollingQ needs >= 2")
        if len({id(layer) for layer in layers}) != len(layers):
            raise ValueError("layers must not hold the same layer twice")
        for name, val in (("beta", beta), ("sigma", sigma)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                raise ValueError(f"{name} must be a finite number, got {val!r}")
        if isinstance(max_rotations, bool) or not isinstance(max_rotations, int) or max_rotations < 0:
            raise ValueError(f"max_rotations must be an int >= 0, got {max_rotations!r}")
        if epoch_window == "window":
            epoch_window = window
        for name, val in (("window", window), ("epoch_window", epoch_window)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {val!r}")
        if rotation not in ("plane", "svd"):
            raise ValueError(f"rotation must be 'plane' or 'svd', got {rotation!r}")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an int >= 1 or None, got {every_n_steps!r}")
        if window == 0 and every_n_steps is not None:
            raise ValueError("window=0 collects no statistics online, so every_n_steps decisions would see none; "
                             "pass window >= 1 or None with every_n_steps")
        if logger is not None and not callable(logger):
            raise TypeError(f"logger must be callable or None, got {type(logger).__name__}")

        self.layers: List[Any] = layers
        self.beta = float(beta)
        self.sigma = float(sigma)
        self.max_rotations = max_rotations
        self.window = window
        self.epoch_window = epoch_window
        self.rotation = rotation
        self.every_n_steps = every_n_steps
        self.logger = logger

        self.rotations: List[int] = [0] * len(layers)  # decisions that rotated some head, per layer
        self.head_rotations: List[List[int]] = [[0] * layer.num_heads for layer in layers]  # per head
        self.global_step = 0
        self.epoch_step = 0
        self.steps_per_epoch: Optional[int] = None
        self._epochs_declared = False  # begin_epoch was called: the caller runs epochs (epoch_end)
        self.epoch = 0  # number of epoch_end() calls made
        self.decisions = 0  # number of decide() calls made (epoch_end's and every_n_steps')
        self._in_full_pass = False
        self._index = {id(layer): i for i, layer in enumerate(layers)}
        # Epoch accumulator (epoch_end / decide) and step accumulator (every_n_steps decisions).
        self._sums: List[Optional[Dict[str, torch.Tensor]]] = [None] * len(layers)
        self._step_sums: List[Optional[Dict[str, torch.Tensor]]] = [None] * len(layers)
        for layer in layers:
            layer.controller = self  # the module keeps it as a plain attribute, not a submodule

    # ----------------------------------------------------------------------------- schedule
    def begin_epoch(self, steps_per_epoch: Optional[int] = None) -> None:
        """Start an epoch of `steps_per_epoch` training steps (None: unknown, collect every step)."""
        if steps_per_epoch is not None and (isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int)
                                            or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be an int >= 1 or None, got {steps_per_epoch!r}")
        self.steps_per_epoch = steps_per_epoch
        self.epoch_step = 0
        self._epochs_declared = True

    @property
    def in_full_pass(self) -> bool:
        """True inside `full_pass` (layers then report even in eval mode)."""
        return self._in_full_pass

    def _epoch_window(self) -> bool:
        """The current step feeds the epoch accumulator: inside `full_pass`, with epoch_window=None or an
        unknown epoch length, or during the epoch's last `epoch_window` training steps (none for 0)."""
        if self._in_full_pass or self.epoch_window is None:
            return True
        if self.epoch_window == 0:
            return False
        if self.steps_per_epoch is None:
            # Epochs of unknown length (begin_epoch(None)): every step, for epoch_end. A caller that
            # never began an epoch and decides every_n_steps runs step decisions only: no cost here.
            return self._epochs_declared or self.every_n_steps is None
        # epoch_step == steps_per_epoch: the epoch's training steps are done (e.g. validation).
        return self.steps_per_epoch - self.epoch_window <= self.epoch_step < self.steps_per_epoch

    def _step_window(self) -> bool:
        """The current step feeds the step accumulator: with `every_n_steps`, during the `window`
        steps before the next decision (every step with window=None); never inside `full_pass`."""
        if self.every_n_steps is None or self._in_full_pass:
            return False
        if self.window is None:
            return True
        # global_step counts the steps done, so the running step is global_step + 1.
        return self.global_step % self.every_n_steps >= self.every_n_steps - self.window

    @property
    def collecting(self) -> bool:
        """Whether the layers should compute and report statistics on the current step: when the
        epoch window (always inside `full_pass` or with window=None; otherwise the last `window`
        steps of the epoch, every step when the epoch length is unknown) or, with `every_n_steps`,
        the step window (the last `window` steps before each decision) is active. Layers in eval
        mode report only inside `full_pass`, so validation batches never leak into the sums."""
        return self._epoch_window() or self._step_window()

    def step(self) -> Optional[Dict[str, Any]]:
        """Call once per training step, after the optimiser step. Returns the decision record on
        the steps where `every_n_steps` triggers a decision, else None."""
        self.global_step += 1
        self.epoch_step += 1
        if self.every_n_steps is not None and self.global_step % self.every_n_steps == 0:
            return self._decide(step=True)
        return None

    # ----------------------------------------------------------------------------- collection
    def reset(self) -> None:
        """Drop the accumulated statistics (both accumulators)."""
        self._sums = [None] * len(self.layers)
        self._step_sums = [None] * len(self.layers)

    def _zero_sums(self, layer, device) -> Dict[str, torch.Tensor]:
        dims = (layer.num_heads, layer.kv_heads, layer.num_modalities, layer.head_dim)
        return {name: torch.zeros(shape(*dims), dtype=torch.float64, device=device)
                for name, shape in _SUM_SHAPES.items()}

    def observe(self, layer, q_fusion: torch.Tensor, stats: AttentionStats) -> None:
        """Accumulate one batch of statistics from `layer` (called by RollingQAttention) into each
        accumulator whose window is active; a batch observed outside both windows (a direct call)
        goes to the epoch accumulator, as it did when there was only one.

        Args:
            layer: an attached RollingQAttention.
            q_fusion: [B, H, D] effective (rotated) fusion query per sample, mean over the layer's
                fusion tokens.
            stats: the layer's AttentionStats, with M + 1 classes (the last is the fusion tokens):
                attn_mass [B, H, L, M + 1], key_sum [B, Hkv, M + 1, D], key_count [B, M + 1].
        """
        i = self._index.get(id(layer))
        if i is None:
            raise ValueError("layer is not attached to this RollingQ controller")
        H, Hkv, M, D = layer.num_heads, layer.kv_heads, layer.num_modalities, layer.head_dim
        nf = layer.num_fusion_tokens
        if q_fusion.dim() != 3 or tuple(q_fusion.shape[1:]) != (H, D):
            raise ValueError(f"q_fusion must have shape [B, {H}, {D}], got {tuple(q_fusion.shape)}")
        B = q_fusion.shape[0]
        if tuple(stats.key_sum.shape) != (B, Hkv, M + 1, D):
            raise ValueError(f"stats.key_sum must have shape [{B}, {Hkv}, {M + 1}, {D}], got {tuple(stats.key_sum.shape)}")
        if tuple(stats.key_count.shape) != (B, M + 1):
            raise ValueError(f"stats.key_count must have shape [{B}, {M + 1}], got {tuple(stats.key_count.shape)}")
        if stats.attn_mass.dim() != 4 or tuple(stats.attn_mass.shape[:2]) != (B, H) \
                or stats.attn_mass.shape[3] != M + 1 or stats.attn_mass.shape[2] < nf:
            raise ValueError(f"stats.attn_mass must have shape [{B}, {H}, L >= {nf}, {M + 1}], "
                             f"got {tuple(stats.attn_mass.shape)}")
        with torch.no_grad():
            # The batch's contributions, computed once whatever the number of accumulators.
            key_sum, key_count = stats.key_sum[:, :, :M], stats.key_count[:, :M]
            kbar, present = sample_mean_keys(key_sum, key_count)
            cos_sum, cos_n = imbalance_sums(q_fusion, key_sum, key_count)
            mass = stats.attn_mass[:, :, :nf].detach().double().mean(2)  # [B, H, M + 1]
            add = {
                "key_mean_sum": (kbar * present[:, None, :, None]).sum(0),
                "key_n": present.sum(0).double(),
                "query_sum": q_fusion.detach().double().sum(0),
                "cos_sum": cos_sum,
                "cos_n": cos_n,
                "mass_sum": mass.sum(0),
            }
            epoch_w, step_w = self._epoch_window(), self._step_window()
            targets = ([self._sums] if epoch_w or not step_w else []) + ([self._step_sums] if step_w else [])
            for acc in targets:
                if acc[i] is None:
                    acc[i] = self._zero_sums(layer, q_fusion.device)
                s = acc[i]
                for name, t in add.items():
                    s[name] += t.to(s[name].device)
                s["samples"] += B

    def full_pass(self, model: torch.nn.Module, loader: Iterable,
                  forward_fn: Optional[Callable[[torch.nn.Module, Any], Any]] = None) -> None:
        """The official estimate: reset the epoch accumulator, then run `forward_fn(model, batch)`
        (default `model(batch)`) over the whole loader in eval mode without gradients, collecting
        every batch into it (the step accumulator is left alone). The model's train/eval mode is
        restored afterwards. Call `epoch_end()` next."""
        if forward_fn is None:
            forward_fn = lambda m, batch: m(batch)  # noqa: E731
        was_training = model.training
        self._sums = [None] * len(self.layers)
        model.eval()
        self._in_full_pass = True
        try:
            with torch.no_grad():
                for batch in loader:
                    forward_fn(model, batch)
        finally:
            self._in_full_pass = False
            model.train(was_training)

    # ----------------------------------------------------------------------------- decision
    def _reduced_sums(self, acc: List[Optional[Dict[str, torch.Tensor]]]) -> List[Dict[str, torch.Tensor]]:
        """Every layer's sums in accumulator `acc` (zeros where nothing was observed), summed over
        ranks when a process group is up: one flat all-reduce for all layers."""
        sums = []
        for layer, s in zip(self.layers, acc):
            sums.append(s if s is not None else self._zero_sums(layer, layer.rotation.device))
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            device = sums[0]["samples"].device
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            flat = torch.cat([t.reshape(-1).to(device) for s in sums for t in s.values()])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            out, offset = [], 0
            for s in sums:
                r = {}
                for name, t in s.items():
                    r[name] = flat[offset:offset + t.numel()].view(t.shape).to(t.device)
                    offset += t.numel()
                out.append(r)
            sums = out
        return sums

    def epoch_end(self) -> Dict[str, Any]:
        """Decide and rotate at the end of an epoch from the epoch accumulator; see `decide`."""
        record = self.decide()
        self.epoch += 1
        return record

    def decide(self) -> Dict[str, Any]:
        """Decide now from the epoch accumulator (the sums `epoch_end` reads: the epoch's window or
        the full pass), without counting an epoch; `every_n_steps` decisions read the step
        accumulator instead. All-reduce the sums (under torch.distributed), compute per layer and
        head c [H, M], AIR, the target weights, the key gap and the fusion rows' attention mass;
        rotate the heads where max(c) - min(c) > beta that have rotated fewer than
        `max_rotations` times (R <- R_new @ R, R_new mapping the mean effective query onto the
        balanced target); reset that accumulator only; log and return the JSON-serialisable record."""
        return self._decide(step=False)

    def _decide(self, step: bool) -> Dict[str, Any]:
        acc = self._step_sums if step else self._sums
        sums = self._reduced_sums(acc)
        # "epoch": the epoch the decision falls in (epoch_end calls before it), "decision": its index.
        record: Dict[str, Any] = {"epoch": self.epoch, "decision": self.decisions, "step": self.global_step,
                                  "layers": []}
        other = self._sums if step else self._step_sums
        for i, (layer, s) in enumerate(zip(self.layers, sums)):
            rec = self._decide_layer(i, layer, s)
            record["layers"].append(rec)
            if rec["rotated"] and other[i] is not None:
                stale = other[i]["stale"]
                stale += torch.tensor(rec["rotated_heads"], dtype=stale.dtype, device=stale.device)
        self.decisions += 1
        # Only the accumulator just read: the other window's samples stay for its own decision.
        if step:
            self._step_sums = [None] * len(self.layers)
        else:
            self._sums = [None] * len(self.layers)
        if self.logger is not None:
            self.logger(record)
        else:
            _log.info("rollingq %s", json.dumps(record))
        return record

    def _decide_layer(self, i: int, layer, s: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        H, Hkv = layer.num_heads, layer.kv_heads
        samples = int(s["samples"].item())
        stale = s["stale"] > 0  # [H]: rotated since these sums began (see _SUM_SHAPES)
        rec: Dict[str, Any] = {"layer": i, "samples": samples, "rotated": False,
                               "rotated_heads": [False] * H, "rotations": self.rotations[i],
                               "head_rotations": list(self.head_rotations[i]), "stale_heads": stale.tolist()}
        if samples == 0:
            return rec
        c = s["cos_sum"] / s["cos_n"]  # [H, M]; NaN for a modality never seen
        spread = c.amax(-1) - c.amin(-1)
        kbar = s["key_mean_sum"] / s["key_n"][:, None]  # [Hkv, M, D]
        qbar = s["query_sum"] / samples  # [H, D]
        kbar_h = kbar.repeat_interleave(H // Hkv, dim=0)  # [H, M, D]
        # A modality whose mean key is exactly 0 has no direction to balance toward.
        finite = (torch.isfinite(c).all(-1) & torch.isfinite(kbar_h).all(-1).all(-1)
                  & (torch.linalg.vector_norm(kbar_h, dim=-1) > 0).all(-1))
        c_safe = torch.where(finite[:, None], c, torch.zeros_like(c))
        t, w = balanced_target(torch.where(finite[:, None, None], kbar_h, torch.zeros_like(kbar_h)),
                               qbar, c_safe, self.sigma)
        rec.update(
            c=_to_list(c), air=_to_list(air_from_cos(c)),
            weights=_to_list(torch.where(finite[:, None], w, torch.full_like(w, float("nan")))),
            key_gap=_to_list(key_gap(kbar)),
            mass=_to_list(s["mass_sum"][:, :-1] / samples),
            mass_fusion=_to_list(s["mass_sum"][:, -1] / samples),
        )
        # A head needs a defined imbalance, a nonzero mean query and a defined target to rotate.
        qn = torch.linalg.vector_norm(qbar, dim=-1)
        tn = torch.linalg.vector_norm(t, dim=-1)
        left = torch.tensor([n < self.max_rotations for n in self.head_rotations[i]], device=qn.device)
        heads = finite & (spread > self.beta) & (qn > 0) & (tn > 0) & left & ~stale.to(qn.device)
        if not bool(heads.any()):
            return rec
        make = plane_rotation if self.rotation == "plane" else svd_rotation
        eye = torch.eye(layer.head_dim, dtype=torch.float64, device=qbar.device).expand(H, -1, -1)
        # Skipped heads get a harmless stand-in pair so the batched call never sees a zero vector.
        qs = torch.where(heads[:, None], qbar, eye[:, 0])
        ts = torch.where(heads[:, None], t, eye[:, 0])
        R_new = torch.where(heads[:, None, None], make(qs, ts), eye)
        with torch.no_grad():
            R = layer.rotation
            R.copy_((R_new.to(R.device) @ R.double()).to(R.dtype))
        self.rotations[i] += 1
        turned = [bool(h) for h in heads.tolist()]
        self.head_rotations[i] = [n + t for n, t in zip(self.head_rotations[i], turned)]
        rec.update(rotated=True, rotated_heads=turned, rotations=self.rotations[i],
                   head_rotations=list(self.head_rotations[i]))
        return rec

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Rotation counts, step counters and both accumulators (cloned tensors): "sums" is the
        epoch accumulator, "step_sums" the `every_n_steps` one."""
        return {
            "rotations": list(self.rotations),
            "head_rotations": [list(h) for h in self.head_rotations],
            "global_step": self.global_step,
            "epoch_step": self.epoch_step,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch": self.epoch,
            "decisions": self.decisions,
            "epochs_declared": self._epochs_declared,
            "sums": [None if s is None else {k: v.clone() for k, v in s.items()} for s in self._sums],
            "step_sums": [None if s is None else {k: v.clone() for k, v in s.items()} for s in self._step_sums],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what `state_dict()` returned (the controller must wrap the same layers). A state
        saved before the step accumulator existed (only "sums") restores that as the epoch
        accumulator, with an empty step accumulator; one saved before the per-head counts gives every
        head its layer's count (the most any of its heads had rotated), so none rotates more."""
        missing = {"rotations", "global_step", "epoch_step", "steps_per_epoch", "epoch", "sums"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}")
        n = len(self.layers)
        step_state = state.get("step_sums")
        if step_state is None:
            step_state = [None] * n
        if len(state["rotations"]) != n or len(state["sums"]) != n or len(step_state) != n:
            raise ValueError(f"state was saved for {len(state['rotations'])} layers, this controller has {n}")

        def restore(saved, key):
            sums: List[Optional[Dict[str, torch.Tensor]]] = []
            for layer, s in zip(self.layers, saved):
                if s is None:
                    sums.append(None)
                    continue
                ref = self._zero_sums(layer, layer.rotation.device)
                s = dict(s)
                s.setdefault("stale", ref["stale"])  # saved before stale heads were tracked
                if set(s) != set(ref) or any(tuple(s[k].shape) != tuple(ref[k].shape) for k in ref):
                    raise ValueError(f"state['{key}'] does not match the layers' shapes")
                sums.append({k: s[k].detach().to(device=ref[k].device, dtype=torch.float64).clone() for k in ref})
            return sums

        sums, step_sums = restore(state["sums"], "sums"), restore(step_state, "step_sums")
        head_state = state.get("head_rotations")
        if head_state is None:
            head_state = [[int(r)] * layer.num_heads for r, layer in zip(state["rotations"], self.layers)]
        if len(head_state) != n or any(len(h) != layer.num_heads for h, layer in zip(head_state, self.layers)):
            raise ValueError("state['head_rotations'] does not match the layers' head counts")
        self.rotations = [int(r) for r in state["rotations"]]
        self.head_rotations = [[int(x) for x in h] for h in head_state]
        self.global_step = int(state["global_step"])
        self.epoch_step = int(state["epoch_step"])
        self.steps_per_epoch = state["steps_per_epoch"]
        self.epoch = int(state["epoch"])
        self.decisions = int(state.get("decisions", state["epoch"]))  # older states counted decisions as epochs
        self._epochs_declared = bool(state.get("epochs_declared",
                                               state["steps_per_epoch"] is not None or int(state["epoch"]) > 0))
        self._sums = sums
        self._step_sums = step_sums
