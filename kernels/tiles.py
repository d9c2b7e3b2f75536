"""The pieces the kernels' wide splits share. A wide split holds a head as several fixed-width
column chunks (Triton has no arrays of tiles): masked loads and stores of one chunk of a
[rows, HEAD_D] slice, the chunk accumulators, and the host-side plan (chunks and programs)."""
import triton
import triton.language as tl


@triton.jit
def load_chunk(base, offs_r, r_ok, s_r, s_c, col0, offs_w, HEAD_D):
    """Rows offs_r, columns col0 + offs_w of a [rows, HEAD_D] slice (zero past its edges)."""
    cols = col0 + offs_w
    return tl.load(base + offs_r[:, None] * s_r + cols[None, :] * s_c,
                   mask=r_ok[:, None] & (cols < HEAD_D)[None, :], other=0.0)


@triton.jit
def store_chunk(base, offs_r, r_ok, s_r, s_c, col0, offs_w, HEAD_D, x):
    """Store x (cast to the slice's dtype) at rows offs_r, columns col0 + offs_w (inside the slice)."""
    cols = col0 + offs_w
    tl.store(base + offs_r[:, None] * s_r + cols[None, :] * s_c, x.to(base.dtype.element_ty),
             mask=r_ok[:, None] & (cols < HEAD_D)[None, :])


@triton.jit
def wide_accumulators(BLOCK_M: tl.constexpr, WC: tl.constexpr):
    """Three zeroed fp32 [BLOCK_M, WC] accumulators of a wide split (those a program never uses are
    dead code)."""
    return (tl.zeros([BLOCK_M, WC], tl.float32), tl.zeros([BLOCK_M, WC], tl.float32),
            tl.zeros([BLOCK_M, WC], tl.float32))


def wide_plan(head_d: int, chunk: int) -> tuple:
    """(chunks of the head, output chunks per program, programs) of a wide split: two programs
    share the head's output columns, each holding at most three chunk accumulators."""
    n = triton.cdiv(head_d, chunk)
    per_program = triton.cdiv(n, 2)
    return n, per_program, triton.cdiv(n, per_program)
