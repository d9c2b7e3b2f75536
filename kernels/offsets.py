"""64-bit offsets for slices that span 2^31 elements.

The kernels address a (batch, head) slice as base + row * row_stride + col * col_stride, with the
slice's base in 64 bits (batch and head indices are int64) and the in-slice products in 32 bits:
Triton passes a stride below 2^31 as int32, and 32-bit offsets cost fewer registers per element.
A slice whose last element lies 2^31 elements or more past its first would wrap. That takes a huge
row stride, e.g. a [B, L, H, D] view with L·H·D >= 2^31 or a sequence-first [L, B, H, D] view with
L·B·H·D >= 2^31, or a dense [L, L] attention mask from L = 46341 on. Such a launch passes OFFS64=True and the kernel casts its strides to int64 first;
every other launch compiles exactly as without the flag.
"""
import triton
import triton.language as tl


def int64_offsets(*tensors) -> bool:
    """The kernels' OFFS64 argument: whether some tensor's [rows, D] slice spans 2^31 elements."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[-2:], t.stride()[-2:])) >= 2 ** 31
               for t in tensors if t.numel())


@triton.jit
def widen(a, b, c, d):
    """Four strides as int64 (a stride of 1 arrives as a constexpr; tl.cast takes both)."""
    return tl.cast(a, tl.int64), tl.cast(b, tl.int64), tl.cast(c, tl.int64), tl.cast(d, tl.int64)


@triton.jit
def widen2(a, b):
    return tl.cast(a, tl.int64), tl.cast(b, tl.int64)
