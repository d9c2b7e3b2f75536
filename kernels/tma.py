"""Host side of the tensor-descriptor (TMA) loads: which layouts qualify, and the scratch memory.

On Hopper the kernels fetch whole [rows, D] tiles of a (batch, head) slice through descriptors
built in the kernel (`tl.make_tensor_descriptor`); the copy engine then does the address work and
zero-fills past the tensor's edges. A descriptor needs a unit innermost stride and 16-byte aligned
base and strides; any other layout takes the kernels' pointer path.
"""
import os

import torch
import triton


def enabled_by_default() -> bool:
    """ROLLINGQ_TMA=0 turns the descriptor path off (an A/B switch for benchmarks; no effect on results)."""
    return os.environ.get("ROLLINGQ_TMA", "1") != "0"


def tma_ready(*tensors: torch.Tensor) -> bool:
    """True when every tensor's (batch, head) slices can be described by a tensor descriptor."""
    for t in tensors:
        e = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((st * e) % 16 for st in t.stride()[:-1]):
            return False
        # A broadcast row dim (stride 0, e.g. the gradient of out.mean(2)): a descriptor is built
        # per slice with the row stride, and the copy engine's behaviour at stride 0 is undocumented.
        if t.stride(-2) == 0 and t.shape[-2] > 1:
            return False
    return True


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Descriptors built in a kernel live in a per-launch global scratch buffer that Triton asks an
    allocator for. Install one backed by PyTorch's caching allocator, unless the caller has set
    their own (Triton keeps it per thread: autograd's worker threads start without one)."""
    from triton.runtime import _allocation  # Triton 3.6: no public getter for the allocator

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)
