"""The pieces the kernels' wide splits share. A wide split holds a head as several fixed-width
column chunks (Triton has no arrays of tiles): masked loads and stores of one chunk of a
[rows, HEAD_D] slice, the chunk accumulators, and the host-side plan (chunks and programs)."""
import triton
import triton.language as tl

WIDE_CHUNK = 128  # columns per chunk (the kernels' launchers read their own module's copy: tests lower it)
WIDE_MAX_D = 6 * WIDE_CHUNK  # six chunks: what the kernels unroll (a Q tile each in the forward)


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


@triton.jit
def chunked_products(a_base, s_ar, s_ad, b_base, s_br, s_bd, c_base, s_cr, s_cd, d_base, s_dr, s_dd,
                     rows_ac, ok_ac, rows_bd, ok_bd, offs_d, HEAD_D, NUM_DC, BLOCK_D: tl.constexpr,
                     prec: tl.constexpr):
    """(sum_c A_c B_c^T, sum_c C_c D_c^T) over NUM_DC chunks of BLOCK_D columns of the head: the
    full-D products of the D-split paths, where A and C share rows rows_ac, B and D rows rows_bd.
    B and D chunks are loaded transposed by address, so both dots take plain operands."""
    x = tl.zeros([rows_ac.shape[0], rows_bd.shape[0]], tl.float32)
    y = tl.zeros([rows_ac.shape[0], rows_bd.shape[0]], tl.float32)
    for c in range(NUM_DC):
        offs_c = c * BLOCK_D + offs_d
        c_ok = offs_c < HEAD_D
        a = tl.load(a_base + rows_ac[:, None] * s_ar + offs_c[None, :] * s_ad,
                    mask=ok_ac[:, None] & c_ok[None, :], other=0.0)
        bt = tl.load(b_base + rows_bd[None, :] * s_br + offs_c[:, None] * s_bd,
                     mask=ok_bd[None, :] & c_ok[:, None], other=0.0)
        x = tl.dot(a, bt, x, input_precision=prec)
        cc = tl.load(c_base + rows_ac[:, None] * s_cr + offs_c[None, :] * s_cd,
                     mask=ok_ac[:, None] & c_ok[None, :], other=0.0)
        dt = tl.load(d_base + rows_bd[None, :] * s_dr + offs_c[:, None] * s_dd,
                     mask=ok_bd[None, :] & c_ok[:, None], other=0.0)
        y = tl.dot(cc, dt, y, input_precision=prec)
    return x, y


def wide_plan(head_d: int, chunk: int) -> tuple:
    """(chunks of the head, output chunks per program, programs) of a wide split: two programs
    share the head's output columns, each holding at most three chunk accumulators."""
    n = triton.cdiv(head_d, chunk)
    per_program = triton.cdiv(n, 2)
    return n, per_program, triton.cdiv(n, per_program)
