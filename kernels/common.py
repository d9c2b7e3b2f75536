"""Small host-side helpers shared by the forward and backward launchers."""
import contextlib
import os


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


def deterministic() -> int:
    """1 under torch.use_deterministic_algorithms(True), else 0: the kernels' DETERMINISTIC argument,
    which the autotuners key on and prune by (one fixed config: timing may pick another tile from run
    to run, and the tiles set the summation order)."""
    import torch

    return int(torch.are_deterministic_algorithms_enabled())


def new_buffer(shape, device, dtype):
    """Every buffer a kernel writes is allocated here, looked up at call time (`common.new_buffer`):
    tests swap in NaN-filled buffers, so an unwritten element fails them."""
    import torch

    return torch.empty(shape, device=device, dtype=dtype)


TARGET_ARCH = None  # set by ahead-of-time builds (bench/inspect_kernels.py) to plan for a card not here


def target_arch() -> int:
    """The GPU generation the launchers plan for: 90 (Hopper and newer; also the CPU interpreter, so
    that its tests walk the Hopper plan) or 80 (Ampere's plan, used for every pre-Hopper card)."""
    if TARGET_ARCH is not None:
        return TARGET_ARCH
    import torch

    if torch.cuda.is_available():
        return 90 if torch.cuda.get_device_capability()[0] >= 9 else 80
    return 90


@contextlib.contextmanager
def planning_for(arch):
    """Within the block the launchers and pruners plan for `arch` (None: this machine's GPU)."""
    global TARGET_ARCH
    saved, TARGET_ARCH = TARGET_ARCH, arch
    try:
        yield
    finally:
        TARGET_ARCH = saved
