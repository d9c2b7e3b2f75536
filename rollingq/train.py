"""Training program: `python -m rollingq.train` (see docs/training.md).

Trains a multimodal Transformer with vanilla attention fusion, RollingQ, or the concat / sum
baselines on the embedded synthetic task or an .npz feature file, logs per-epoch metrics (accuracy
per test subset, per-modality probe accuracy, AIR and c, the fusion token's attention mass per
modality on clean and corrupted samples, key gap, rotations) to `<out>/metrics.jsonl`, checkpoints
every epoch (atomically; `--resume` continues bit-exactly), and runs data-parallel under torchrun.
`--demo` runs vanilla and RollingQ side by side on a quick setting and prints a table.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .controller import RollingQ
from .data import MultimodalData, SyntheticSpec, load_data, make_synthetic
from .models import MultimodalTransformer
from .modules import MAX_FUSED_MODALITIES
from .rotation import air_from_cos, key_gap, sample_mean_keys
from .validation import check_dropout

METHODS = ("vanilla", "rollingq", "concat", "sum")
ATTENTION_METHODS = ("vanilla", "rollingq")  # fuse through RollingQAttention
ENC_HEADS = 4  # attention heads of each modality encoder (MultimodalTransformer's enc_heads)
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Everything that defines a run (the CLI flags map one to one)."""

    method: str = "rollingq"
    data: str = "synthetic"
    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    seed: int = 0
    device: str = "auto"
    beta: float = 0.0
    sigma: float = 0.0
    max_rotations: int = 1
    window: int = 5
    every_n_steps: Optional[int] = None
    full_pass: bool = False
    rotate: str = "fusion"
    rotation: str = "plane"
    dim: int = 64
    enc_layers: int = 2
    fusion_heads: int = 1
    attn_dropout: float = 0.0
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    out: Optional[str] = None
    resume: bool = False
    progress: bool = True
    threads: Optional[int] = None
    stop_after: Optional[int] = None
    quiet: bool = False

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"--optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        for name in ("epochs", "batch_size", "window", "dim", "fusion_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.enc_layers < 0 or self.max_rotations < 0:
            raise ValueError("--enc-layers and --max-rotations must be >= 0")
        # The model splits --dim over the heads: refuse it here, before the run folder exists.
        if self.dim % ENC_HEADS:
            raise ValueError(f"--dim must be a multiple of the encoders' {ENC_HEADS} heads, got {self.dim}")
        if self.method in ATTENTION_METHODS and self.dim % self.fusion_heads:
            raise ValueError(f"--dim must be a multiple of --fusion-heads ({self.fusion_heads}), got {self.dim}")
        for name in ("n_train", "n_test", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        for name in ("beta", "sigma"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"--{name} must be a finite number, got {getattr(self, name)}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        check_dropout(self.attn_dropout, "--attn-dropout")
        if self.attn_dropout and self.method not in ATTENTION_METHODS:
            raise ValueError(f"--attn-dropout applies to attention fusion (vanilla, rollingq), not to "
                             f"--method {self.method}")
        if not (self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs)):
            raise ValueError(f"--warmup-epochs must be a finite number >= 0, got {self.warmup_epochs}")
        if self.rotate not in ("fusion", "all"):
            raise ValueError(f"--rotate must be 'fusion' or 'all', got {self.rotate!r}")
        if self.rotation not in ("plane", "svd"):
            raise ValueError(f"--rotation must be 'plane' or 'svd', got {self.rotation!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"--every-n-steps must be >= 1, got {self.every_n_steps}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {self.stop_after}")


# Settings that must match between a checkpoint and the run resuming it.
_RESUME_KEYS = ("method", "data", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "warmup_epochs",
                "seed", "beta", "sigma", "max_rotations", "window", "every_n_steps", "full_pass", "rotate", "rotation", "dim",
                "enc_layers", "fusion_heads", "attn_dropout", "n_train", "n_test")
# Keys added after checkpoints were first written: a checkpoint without one was made with this value.
_RESUME_DEFAULTS = {"attn_dropout": 0.0}
# Saved next to the config: the number of processes sets the shards, the steps per epoch and so the
# schedule, so a resume must keep it. Checkpoints without it are checked by their step count.
_WORLD_KEY = "world_size"


def _online_windows(cfg: TrainConfig) -> Tuple[int, int]:
    """The controller's (window, epoch_window): with --full-pass the epoch-end pass replaces the
    epoch's online window, so the training steps collect only for --every-n-steps decisions."""
    if not cfg.full_pass:
        return cfg.window, cfg.window
    return (0 if cfg.every_n_steps is None else cfg.window), 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in --help, except where it is None (the help text says what then)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d, spec = TrainConfig(), SyntheticSpec()
    p = argparse.ArgumentParser(prog="python -m rollingq.train", description=__doc__.splitlines()[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--demo", action="store_true", help="run vanilla and rollingq on a quick CPU setting and "
                   "print a side-by-side table (writes runs/demo-<time>/)")
    p.add_argument("--method", choices=METHODS, default=d.method, help="fusion method")
    p.add_argument("--data", default=d.data, help="'synthetic' or the path of an .npz feature file")
    p.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (cosine schedule with warm-up)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer, help="sgd: momentum 0.9")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="optimiser weight decay")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear warm-up, then cosine decay")
    p.add_argument("--seed", type=int, default=d.seed, help="seeds the model, the shuffling and the synthetic data")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--beta", type=float, default=d.beta,
                   help="rotate when max(c) - min(c) > beta (|AIR| for 2 modalities)")
    p.add_argument("--sigma", type=float, default=d.sigma,
                   help="target weights softmax(-2 sigma c): > 0 favours the less-attended modality")
    p.add_argument("--max-rotations", type=int, default=d.max_rotations,
                   help="rotations each fusion head may make in all")
    p.add_argument("--window", type=int, default=d.window, help="online estimate over the last N steps of an epoch")
    p.add_argument("--every-n-steps", type=int, default=None, help="also decide every N training steps "
                   "(statistics from the last --window steps before each decision)")
    p.add_argument("--full-pass", action="store_true", help="estimate with an eval pass over the training set "
                   "at each epoch end (the official way) instead of the online window")
    p.add_argument("--rotate", choices=("fusion", "all"), default=d.rotate, help="which queries the rotation turns")
    p.add_argument("--rotation", choices=("plane", "svd"), default=d.rotation,
                   help="plane: the minimal rotation; svd: the official construction")
    p.add_argument("--dim", type=int, default=d.dim, help="model width")
    p.add_argument("--enc-layers", type=int, default=d.enc_layers, help="Transformer layers per modality encoder")
    p.add_argument("--fusion-heads", type=int, default=d.fusion_heads, help="heads of the fusion attention")
    p.add_argument("--attn-dropout", type=float, default=d.attn_dropout,
                   help="attention dropout of the RollingQAttention fusion layer (training only)")
    p.add_argument("--n-train", type=int, default=None, help=f"synthetic: training samples (default {spec.n_train})")
    p.add_argument("--n-test", type=int, default=None,
                   help=f"synthetic: test samples per subset (default {spec.n_test})")
    p.add_argument("--out", default=None, help="run folder (default runs/<method>-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: cores / local processes)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # simulate an interruption
    return p


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig(
        method=ns.method, data=ns.data, epochs=ns.epochs, batch_size=ns.batch_size, lr=ns.lr,
        optimizer=ns.optimizer, weight_decay=ns.weight_decay, warmup_epochs=ns.warmup_epochs, seed=ns.seed,
        device=ns.device, beta=ns.beta, sigma=ns.sigma, max_rotations=ns.max_rotations, window=ns.window,
        every_n_steps=ns.every_n_steps,
        full_pass=ns.full_pass, rotate=ns.rotate, rotation=ns.rotation, dim=ns.dim, enc_layers=ns.enc_layers,
        fusion_heads=ns.fusion_heads, attn_dropout=ns.attn_dropout, n_train=ns.n_train, n_test=ns.n_test, out=ns.out, resume=ns.resume,
        progress=not ns.no_progress, threads=ns.threads, stop_after=ns.stop_after)
    cfg.check()
    return cfg


# ----------------------------------------------------------------------------- helpers
def _dist_info():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return world, rank, local, local_world


def _finite_or_none(v: Any) -> Any:
    """Recursively: tensors/np -> python, NaN/inf -> None (valid JSON)."""
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _finite_or_none(v.tolist())
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def cosine_warmup(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warm-up from ~0 to 1 over `warmup_steps`, then cosine to 0."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _rng_state(device: torch.device) -> Dict[str, Any]:
    # Tensors and plain lists only, so the checkpoint loads with weights_only=True.
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file next to `path`, then os.replace: a crash never leaves a
    half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _progress(iterable: Iterable, enabled: bool, desc: str, total: int):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, world: int, rank: int):
    """Batches of whole tensors: a DistributedSampler (also with one process, so the shuffle
    depends only on (seed, epoch): resume needs no sampler state) wrapped in a BatchSampler, and
    the dataset indexed by the list of positions."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle,
                                                  seed=seed, drop_last=False)
    batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=batches, num_workers=0)
    return loader, sampler


def full_pass_loader(dataset, batch_size: int, world: int, rank: int):
    """This rank's batches of the full pass: positions rank, rank + world, ..., so that over all ranks
    every sample counts exactly once and the pass's means are the dataset's (a DistributedSampler
    pads the shards to equal length with repeated samples). Ranks may get different batch counts:
    the pass's forwards are not collective; the controller sums over ranks afterwards."""
    positions = list(range(rank, len(dataset), world))
    batches = torch.utils.data.BatchSampler(positions, batch_size, drop_last=False)
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=batches, num_workers=0)


def _to(batch, device):
    xs, y, corrupt = batch
    return tuple(x.to(device, non_blocking=True) for x in xs), y.to(device), corrupt


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: MultimodalTransformer, data: MultimodalData, device: torch.device,
             batch_size: int = 256) -> Dict[str, Any]:
    """Test-set metrics: accuracy overall and per subset (clean, corrupt_<m>), probe accuracy per
    modality, and for attention fusion, per subset: the fusion token's attention mass per modality
    (last entry: the fusion tokens themselves), c per modality, AIR, key gap. Heads are averaged."""
    was_training = model.training
    model.eval()
    ds = data.dataset(1)
    M = data.num_modalities
    attention = model.fusion == "attention"
    preds, probes = [], [[] for _ in range(M)]
    mass, cos_sum, kmean, present_n = [], [], [], []
    for start in range(0, len(ds), batch_size):
        xs, y, _ = _to(ds[list(range(start, min(start + batch_size, len(ds))))], device)
        out = model(xs, need_stats=attention)
        preds.append(out.logits.argmax(-1).cpu())
        for m in range(M):
            probes[m].append(out.probe_logits[m].argmax(-1).cpu())
        if attention:
            s, nf = out.stats, model.attn.num_fusion_tokens
            mass.append(s.attn_mass[:, :, :nf].double().mean(2).mean(1).cpu())  # [B, M + 1]
            ks, kc = s.key_sum[:, :, :M], s.key_count[:, :M]
            # Per-sample cosines, kept per sample so they can be averaged over any subset.
            kbar, present = sample_mean_keys(ks, kc)  # [B, Hkv, M, D]
            H = out.q_fusion.shape[1]
            kh = kbar.repeat_interleave(H // kbar.shape[1], dim=1)
            q = out.q_fusion.double()[:, :, None, :]
            cos = (q * kh).sum(-1) / (q.norm(dim=-1) * kh.norm(dim=-1)).clamp_min(1e-30)  # [B, H, M]
            cos_sum.append((cos * present[:, None, :]).cpu())  # [B, H, M]: AIR is taken per head
            kmean.append((kbar * present[:, None, :, None]).cpu())
            present_n.append(present.double().cpu())  # counts both the cosines and the mean keys
    pred = torch.cat(preds)
    y = ds.y
    res: Dict[str, Any] = {"test_acc": float((pred == y).double().mean())}
    subsets = {k: torch.as_tensor(v) for k, v in data.subsets(1).items()}
    res["acc"] = {k: float((pred[i] == y[i]).double().mean()) for k, i in subsets.items()}
    probe = [torch.cat(p) for p in probes]
    res["probe_acc"] = [float((p == y).double().mean()) for p in probe]
    res["probe_acc_subsets"] = {k: [float((p[i] == y[i]).double().mean()) for p in probe] for k, i in subsets.items()}
    if attention:
        mass_all, cs, km, n = torch.cat(mass), torch.cat(cos_sum), torch.cat(kmean), torch.cat(present_n)
        res["mass"], res["c_test"], res["air_test"], res["key_gap_test"] = {}, {}, {}, {}
        for k, i in subsets.items():
            res["mass"][k] = mass_all[i].mean(0).tolist()
            c = cs[i].sum(0) / n[i].sum(0)  # [H, M]
            res["c_test"][k] = c.mean(0).tolist()  # head-averaged c
            # As training's `air`: per head (c0 - c1, or max - min for M > 2), then the mean over heads.
            res["air_test"][k] = float(air_from_cos(c).mean())
            kb = km[i].sum(0) / n[i].sum(0)[None, :, None]  # [Hkv, M, D]
            res["key_gap_test"][k] = float(key_gap(kb).mean())
    model.train(was_training)
    return res


# ----------------------------------------------------------------------------- training
def _nan_for_none(v: Any) -> Any:
    if isinstance(v, list):
        return [_nan_for_none(x) for x in v]
    return float("nan") if v is None else v


def _summarise_controller(rec: Optional[Dict[str, Any]], M: int) -> Dict[str, Any]:
    """Controller record (one fusion layer) -> head-averaged c [M], AIR, weights, key gap, mass."""
    out = {"air": None, "c": [None] * M, "key_gap": None, "mass_train": [None] * M, "weights": [None] * M,
           "rotated": False, "rotations": 0}
    if rec is None:
        return out
    layer = rec["layers"][0]
    out["rotated"], out["rotations"] = bool(layer["rotated"]), int(layer["rotations"])

    def mean(rows):  # per-head values [H] or [H, M] (None = undefined) -> mean over heads
        t = torch.tensor(_nan_for_none(rows), dtype=torch.float64).mean(0)
        return float(t) if t.dim() == 0 else t.tolist()

    if "c" in layer:
        out["c"] = mean(layer["c"])
        out["air"] = mean(layer["air"])
        out["key_gap"] = mean(layer["key_gap"])
        out["mass_train"] = mean(layer["mass"])
        out["weights"] = mean(layer["weights"])
    return out


def _device_for(name: str, distributed: bool, local_rank: int) -> torch.device:
    """--device as a torch.device; a CUDA one always with its index (torch.cuda.set_device refuses
    a bare "cuda"): the local rank's under torch.distributed, else the current device."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA device is available")
        if distributed:
            device = torch.device("cuda", local_rank)
        elif device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def run(cfg: TrainConfig, data: Optional[MultimodalData] = None, return_model: bool = False):
    """Train with `cfg`; returns the per-epoch records (the lines of metrics.jsonl), or
    `(records, model)` with return_model. `data` overrides `cfg.data` (the experiment and the
    demo pass their own synthetic task)."""
    cfg.check()
    world, rank, local_rank, local_world = _dist_info()
    distributed = world > 1
    device = _device_for(cfg.device, distributed, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    owns_group = False
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
        owns_group = True
    main_proc = rank == 0
    log = (lambda *a: print(*a, flush=True)) if main_proc and not cfg.quiet else (lambda *a: None)
    try:
        history, model = _train(cfg, data, device, world, rank, main_proc, log)
        return (history, model) if return_model else history
    finally:
        torch.set_num_threads(previous_threads)
        if owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, data: Optional[MultimodalData], device: torch.device, world: int, rank: int,
           main_proc: bool, log) -> List[Dict[str, Any]]:
    out_dir = cfg.out or os.path.join("runs", f"{cfg.method}-s{cfg.seed}")
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    metrics_path = os.path.join(out_dir, METRICS)
    if main_proc:
        os.makedirs(out_dir, exist_ok=True)

    if data is None:
        spec = None
        if cfg.data == "synthetic":
            over = {k: v for k, v in (("n_train", cfg.n_train), ("n_test", cfg.n_test)) if v is not None}
            spec = SyntheticSpec(seed=cfg.seed, **over)
        data = load_data(cfg.data, seed=cfg.seed, synthetic=spec)
    M = data.num_modalities
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    fusion = "attention" if cfg.method in ATTENTION_METHODS else cfg.method
    model = MultimodalTransformer(data.features, data.tokens, data.num_classes, fusion=fusion, dim=cfg.dim,
                                  enc_layers=cfg.enc_layers, enc_heads=ENC_HEADS, fusion_heads=cfg.fusion_heads,
                                  rotate=cfg.rotate,
                                  attn_dropout=cfg.attn_dropout).to(device)
    controller = None
    if fusion == "attention":
        # vanilla gets the same controller with max_rotations=0: it measures AIR, c, mass and key
        # gap the same way but never rotates.
        window, epoch_window = _online_windows(cfg)
        controller = RollingQ(model.attention_layers(), beta=cfg.beta, sigma=cfg.sigma,
                              max_rotations=cfg.max_rotations if cfg.method == "rollingq" else 0,
                              window=window, epoch_window=epoch_window, rotation=cfg.rotation,
                              every_n_steps=cfg.every_n_steps,
                              logger=lambda rec: None)
    train_set = data.dataset(0)
    loader, sampler = make_loader(train_set, cfg.batch_size, True, cfg.seed, world, rank)
    steps = len(loader)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_warmup(cfg.epochs * steps, int(round(cfg.warmup_epochs * steps))))
    ddp = model
    if world > 1:
        # No buffer broadcast: the model's buffers are the rotation, which every rank updates
        # identically from all-reduced statistics, and constant ids. A broadcast would cost a
        # collective per step and rewrite the rotation, which makes RollingQAttention compare it
        # with its factored copy (a host sync) on every step.
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    history: List[Dict[str, Any]] = []
    start_epoch = 0
    if cfg.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        # On the CPU: the RNG setters take CPU ByteTensors only; the model, optimizer and
        # controller move their own tensors to their devices as they load.
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = state["config"]
        saved = {**_RESUME_DEFAULTS, **saved}
        diff = {k: (saved.get(k), getattr(cfg, k)) for k in _RESUME_KEYS if saved.get(k) != getattr(cfg, k)}
        if _WORLD_KEY in saved:
            if saved[_WORLD_KEY] != world:
                diff[_WORLD_KEY] = (saved[_WORLD_KEY], world)
        elif int(state["scheduler"]["last_epoch"]) != int(state["epoch"]) * steps:
            # An older checkpoint: a different world size shows as a different step count.
            diff["steps_per_epoch (world_size)"] = (int(state["scheduler"]["last_epoch"]) // max(1, int(state["epoch"])),
                                                    steps)
        if diff:
            raise ValueError(f"--resume: settings differ from the checkpoint's (saved, given): {diff}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if controller is not None:
            controller.load_state_dict(state["controller"])
        _set_rng_state(state["rng"], device)
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
        log(f"resumed from {ckpt_path} at epoch {start_epoch}")
    if main_proc:
        # Rewrite the log from the checkpoint's history: lines written after it are dropped.
        with open(metrics_path, "w") as f:
            for rec in history:
                f.write(json.dumps(rec) + "\n")

    show = cfg.progress and main_proc and not cfg.quiet
    stop = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, stop):
        t0 = time.time()
        sampler.set_epoch(epoch)
        model.train()
        if controller is not None:
            controller.begin_epoch(steps)
        loss_sum = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
        for batch in _progress(loader, show, f"epoch {epoch + 1}/{cfg.epochs}", steps):
            xs, y, _ = _to(batch, device)
            out = ddp(xs)
            loss = F.cross_entropy(out.logits, y)
            # The probes read detached features: their loss trains the probes only.
            total = loss + sum(F.cross_entropy(p, y) for p in out.probe_logits)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            if controller is not None:
                controller.step()
            with torch.no_grad():
                loss_sum += torch.stack([loss.detach().double() * len(y),
                                         (out.logits.argmax(-1) == y).sum().double(),
                                         torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
        if world > 1:
            dist.all_reduce(loss_sum)
        ctrl_rec = None
        if controller is not None:
            if cfg.full_pass:
                eval_loader = full_pass_loader(train_set, 256, world, rank)
                controller.full_pass(model, eval_loader, lambda m, b: m(_to(b, device)[0]))
            ctrl_rec = controller.epoch_end()
        ev = evaluate(model, data, device)
        rec: Dict[str, Any] = {"epoch": epoch + 1, "method": cfg.method, "seed": cfg.seed,
                               "lr": opt.param_groups[0]["lr"],
                               "loss": float(loss_sum[0] / loss_sum[2]), "train_acc": float(loss_sum[1] / loss_sum[2])}
        rec.update(ev)
        rec.update(_summarise_controller(ctrl_rec, M))
        rec["time"] = time.time() - t0
        rec = _finite_or_none(rec)
        history.append(rec)
        if main_proc:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(),
                     "controller": controller.state_dict() if controller is not None else None,
                     "rng": _rng_state(device), "config": {**asdict(cfg), _WORLD_KEY: world},
                     "history": json.dumps(history)}
            atomic_save(state, ckpt_path)
        log(format_epoch(rec, M))
    if world > 1:
        dist.barrier()
    return history, model


def format_epoch(rec: Dict[str, Any], M: int) -> str:
    """One console line per epoch."""
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)
    parts = [f"[{rec['method']}] epoch {rec['epoch']:3d}", f"loss {f(rec['loss'])}", f"test {f(rec['test_acc'])}"]
    parts += [f"{k} {f(v)}" for k, v in rec["acc"].items()]
    parts.append("probe " + "/".join(f(v) for v in rec["probe_acc"]))
    if rec.get("air") is not None:
        parts.append(f"AIR {rec['air']:+.3f}")
        parts.append("c " + "/".join(f(v) for v in rec["c"]))
        for k, v in rec.get("mass", {}).items():
            parts.append(f"mass[{k}] " + "/".join(f(x, "{:.2f}") for x in v[:M]))
        parts.append(f"gap {f(rec['key_gap'])}")
        parts.append(f"rot {rec['rotations']}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------- demo
DEMO_EPOCHS = 12


def run_demo(out_root: str = "runs", epochs: int = DEMO_EPOCHS, threads: Optional[int] = None,
             seed: int = 0, progress: bool = True, spec: Optional[SyntheticSpec] = None,
             **train_overrides) -> str:
    """Vanilla vs RollingQ on the synthetic task (CPU, quick): prints a side-by-side table, writes
    metrics.json and demo.png into runs/demo-<time>/ and returns that folder. `spec` and
    `train_overrides` (TrainConfig fields) shrink it for tests."""
    folder = os.path.join(out_root, time.strftime("demo-%Y%m%d-%H%M%S"))
    n = 1
    while os.path.exists(folder):  # two demos in one second get distinct folders
        folder = os.path.join(out_root, time.strftime("demo-%Y%m%d-%H%M%S") + f"-{n}")
        n += 1
    os.makedirs(folder)
    # Small matrices: one thread avoids OpenMP spin-waits that cost more than they gain.
    threads = threads or 1
    data = make_synthetic(spec if spec is not None else SyntheticSpec(seed=seed))
    results = {}
    t0 = time.time()
    for method in ("vanilla", "rollingq"):
        cfg = TrainConfig(method=method, epochs=epochs, seed=seed, device="cpu", out=os.path.join(folder, method),
                          progress=progress, threads=threads, **train_overrides)
        results[method] = run(cfg, data)
    wall = time.time() - t0
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"epochs": epochs, "seed": seed, "wall_s": wall, "runs": results}, f, indent=1)
    print()
    print(demo_table({k: v[-1] for k, v in results.items()}))
    try:
        from .plots import plot_histories
        png = plot_histories({k: [v] for k, v in results.items()}, os.path.join(folder, "demo.png"))
        if png:
            print(f"plot: {png}")
    except ImportError:
        pass
    print(f"run folder: {folder}  ({wall:.0f} s)")
    return folder


def demo_table(final: Dict[str, Dict[str, Any]]) -> str:
    """Markdown table of the final epoch of each method (favoured modality = 0, the easy one)."""
    def f(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)
    rows = [
        ("test accuracy", lambda r: f(r["test_acc"])),
        ("acc, clean samples", lambda r: f(r["acc"].get("clean"))),
        ("acc, favoured (audio) corrupted", lambda r: f(r["acc"].get("corrupt_0"))),
        ("acc, visual corrupted", lambda r: f(r["acc"].get("corrupt_1"))),
        ("probe acc audio / visual", lambda r: "/".join(f(v) for v in r["probe_acc"])),
        ("AIR (train, last epoch)", lambda r: f(r["air"], "{:+.3f}")),
        ("mass audio/visual, clean", lambda r: "/".join(f(v, "{:.2f}") for v in r["mass"]["clean"][:2])
         if r.get("mass") else "-"),
        ("mass audio/visual, audio corrupted", lambda r: "/".join(f(v, "{:.2f}") for v in r["mass"]["corrupt_0"][:2])
         if r.get("mass") else "-"),
        ("key gap", lambda r: f(r["key_gap"])),
        ("rotations applied", lambda r: str(r["rotations"])),
    ]
    names = list(final)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(final[n]) for n in names) + " |")
    return "\n".join(lines)


# The flags run_demo honours; the demo fixes every other setting itself.
DEMO_FLAGS = ("demo", "threads", "seed", "no_progress")


def _given_flags(argv: Optional[Sequence[str]]) -> List[str]:
    """The options present on the command line (as written in --help), whatever their values:
    the same parser with every default suppressed leaves only the given ones in its namespace."""
    p = build_parser()
    names = {}
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            action.default = argparse.SUPPRESS
            names[action.dest] = max(action.option_strings, key=len)
    return [names[d] for d in vars(p.parse_args(argv)) if d in names and d not in DEMO_FLAGS]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.demo:
        extra = _given_flags(argv)
        if extra:
            parser.error(f"--demo runs a fixed setting and takes only --threads, --seed and --no-progress; "
                         f"not {', '.join(extra)}")
        if ns.threads is not None and ns.threads < 1:
            parser.error(f"--threads must be >= 1, got {ns.threads}")
        run_demo(threads=ns.threads, seed=ns.seed, progress=not ns.no_progress)
        return 0
    try:
        cfg = config_from_args(ns)
    except ValueError as e:
        parser.error(str(e))
    data = None
    if cfg.data != "synthetic":
        # A bad feature file is a usage error: report it without a traceback.
        try:
            data = load_data(cfg.data, seed=cfg.seed)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        if cfg.method in ATTENTION_METHODS and data.num_modalities > MAX_FUSED_MODALITIES:
            parser.error(f"{cfg.data} has {data.num_modalities} modalities; --method {cfg.method} fuses at most "
                         f"{MAX_FUSED_MODALITIES} (RollingQAttention's fusion tokens take one more of the kernel's "
                         f"classes)")
    if cfg.resume:
        path = os.path.join(cfg.out or os.path.join("runs", f"{cfg.method}-s{cfg.seed}"), CHECKPOINT)
        if not os.path.isfile(path):
            parser.error(f"--resume: no checkpoint at {path}")
    run(cfg, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
