"""Small host-side helpers shared by the forward and backward launchers."""
import contextlib
import functools
import os
import threading
import zlib

# Every kernel launch holds this lock. Triton's Autotuner keeps each call's arguments on the kernel
# object (`self.nargs`) while it builds the key, prunes, times and pre-hooks a config, so two
# threads launching one kernel at once (nn.DataParallel replicas, autograd's per-device threads)
# read each other's arguments: a crash on None, or the dQ pre-hook zeroing the other call's bias
# gradient (triton-lang/triton#11494). Triton's interpreter, which patches triton.language while a
# kernel runs, is not thread-safe either.
LAUNCH_LOCK = threading.Lock()


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(x: int) -> int:
    return 1 << (max(1, x) - 1).bit_length()


def tune_length(n: int) -> int:
    """A sequence length as the autotuners key it (the kernels' TUNE_LQ / TUNE_LK arguments): the
    next power of two, at least 16. Keyed on exact lengths, training on lengths that vary from
    batch to batch would re-time every config at each new length (a dozen configs over forward and
    backward, ~0.1 s each with the autotuner's default timing); within a power-of-two bucket the
    work per tile, and so the best tile, barely moves."""
    return max(16, next_pow2(n))


def tune_device() -> int:
    """The kind of card the autotuners key on (the kernels' TUNE_DEV argument), so that a tile timed
    on one kind is reused only on that kind. Triton's key holds the arguments, not the device: in one
    process with two kinds of card (an A100 beside an RTX 4090, both on the Ampere plan, with 163 KB
    and 99 KB of shared memory) the A100's pick would be launched on the 4090 and could fail there
    with OutOfResources. A checksum of the card's properties, the same in every run (the on-disk
    autotune cache, TRITON_CACHE_AUTOTUNING=1, keys on it too); 0 off CUDA (the interpreter)."""
    import torch

    if interpreting() or not torch.cuda.is_available():
        return 0
    return _device_kind(torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_kind(index: int) -> int:
    import torch

    p = torch.cuda.get_device_properties(index)
    kind = (p.name, p.major, p.minor, getattr(p, "shared_memory_per_block_optin", None), p.multi_processor_count)
    return zlib.crc32(repr(kind).encode()) & 0x7FFFFFFF  # 31 bits: an i32 argument, as every other value


def deterministic() -> int:
    """1 under torch.use_deterministic_algorithms(True), else 0: the kernels' DETERMINISTIC argument,
    which the autotuners key on and prune by (one fixed config: timing may pick another tile from run
    to run, and the tiles set the summation order)."""
    import torch

    return int(torch.are_deterministic_algorithms_enabled())


def trims_padding(ids) -> bool:
    """Whether the forward and dQ key loops stop at each batch row's last live key (TRIM): for
    per-batch ids ([B, Lk], B > 1), where rows of different lengths are padded at the end. Shared
    ids (a stride-0 batch view: one layout for the whole batch) keep the plain loop over Lk, so
    fixed layouts (the benchmarks, the paper's layer) run the kernels as compiled without it."""
    return ids.shape[0] > 1 and ids.stride(0) != 0


def live_key_ends(ids):
    """int32 [B]: one past the last live key (id >= 0) of each batch row of the [B, Lk] ids, 0 for
    a row without one: where the TRIM key loops stop, so trailing padding (sequences of different
    lengths padded at the end) costs no key block. A stride-0 (shared) ids row is reduced once."""
    import torch

    rows = ids[:1] if ids.stride(0) == 0 else ids
    positions = torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=torch.int32)
    ends = torch.where(rows >= 0, positions, 0).amax(1) if ids.shape[1] else rows.new_zeros(rows.shape[0])
    return ends.to(torch.int32).expand(ids.shape[0]).contiguous()


def launch_extras(args) -> list:
    """The per-element work a launch adds to its loop, as the pruners' spill tables and stand-in
    rows name it: "dropout" (DROPOUT), "mask" (MASK), "mask_grad" (MASK_GRAD: dQ stores the bias's
    gradient), and also "mask+dropout" when both are on (rows that spill only with the two together),
    and "bias+dropout" when the mask is a float bias (MASK == 2), whose tile costs more registers."""
    names = [name for name, flag in (("dropout", "DROPOUT"), ("mask", "MASK"), ("mask_grad", "MASK_GRAD"))
             if args.get(flag)]
    if args.get("DROPOUT") and args.get("MASK"):
        names += ["mask+dropout"] + (["bias+dropout"] if args.get("MASK") == 2 else [])
    return names


def spill_rows(tables: dict, extras: list, arch: int) -> dict:
    """{class: rows} that spill registers for a launch with `extras`: the union of
    tables[extra][arch] over its extras."""
    rows: dict = {}
    for extra in extras:
        for cls, lst in tables.get(extra, {}).get(arch, {}).items():
            rows.setdefault(cls, []).extend(lst)
    return rows


def lse_shape(B: int, H: int, Lq: int) -> tuple:
    """The forward's row statistics, [2, B, H, Lq] float32: (log2 l, m), each row's sum and max of
    2^(scaled scores in base 2), +inf and 0 on a row with no live key. The backward forms
    p = 2^(min(s - m, 0) - log2 l). One float32 m + log2 l, as FlashAttention keeps, loses log2 l
    once |m| is large (its ulp is 2^-7 at m ~ 1e5; at 1e10 m + log2 l rounds to m, p to 1, and a
    recomputed s a few ulps above m overflows exp2); the min keeps p <= 1 / l there."""
    return (2, B, H, Lq)


def lse_planes(lse):
    """The row statistics buffer (lse_shape) as the kernels' (LSE = log2 l, ROWMAX = m) arguments."""
    return lse[0], lse[1]


def on_device_of(t):
    """Triton launches on the current CUDA device: make it `t`'s (e.g. cuda:1 while the current
    device is cuda:0), as PyTorch's own ops do. A no-op for CPU tensors (the interpreter)."""
    import torch

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def new_buffer(shape, device, dtype, like=None):
    """Every buffer a kernel writes is allocated here, looked up at call time (`common.new_buffer`):
    tests swap in NaN-filled buffers, so an unwritten element fails them. With `like` (a tensor of
    that shape) the buffer takes its memory layout as torch.empty_like does: its strides when it is
    dense, else contiguous. Outputs and gradients follow q, k, v so: a [B, L, H, D] view's gradient
    lands in its own layout, where a contiguous one would cost autograd a copy."""
    import torch

    if like is not None:
        assert tuple(like.shape) == tuple(shape), (tuple(like.shape), tuple(shape))
        return torch.empty_like(like, dtype=dtype, device=device)
    return torch.empty(shape, device=device, dtype=dtype)


TARGET_ARCH = None  # set by ahead-of-time builds (bench/inspect_kernels.py) to plan for a card not here


# Hopper's plan (tiles up to 227 KB of shared memory, descriptors, wgmma) needs an H100/H200-class
# card; compute capability 9+ cards with less opt-in shared memory per block (sm_120: 99 KB) take
# the Ampere plan, which offers every launch class a tile within 99 KB (tests/test_aot_compile.py).
HOPPER_PLAN_MIN_SHARED = 200 * 1024


def target_arch() -> int:
    """The GPU generation the launchers plan for: 90 (compute capability 9 and up with Hopper's
    shared memory; also the CPU interpreter, so that its tests walk the Hopper plan) or 80 (Ampere's
    plan: the other cards from sm_80 on, A100 to RTX 40xx). Older cards are refused: the kernels
    need sm_80's bf16 tensor cores, asynchronous copies and shared memory."""
    if TARGET_ARCH is not None:
        return TARGET_ARCH
    import torch

    if interpreting() or not torch.cuda.is_available():
        return 90
    return _device_plan(torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_plan(index: int) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        raise NotImplementedError(f"rollingq's Triton kernels need a GPU of compute capability 8.0 or newer "
                                  f"(Ampere); cuda:{index} ({torch.cuda.get_device_name(index)}) is {major}.{minor}")
    shared = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    return 90 if major >= 9 and (shared is None or shared >= HOPPER_PLAN_MIN_SHARED) else 80


@contextlib.contextmanager
def planning_for(arch):
    """Within the block the launchers and pruners plan for `arch` (None: this machine's GPU)."""
    global TARGET_ARCH
    saved, TARGET_ARCH = TARGET_ARCH, arch
    try:
        yield
    finally:
        TARGET_ARCH = saved
