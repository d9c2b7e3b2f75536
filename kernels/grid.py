"""Launch grids: (query or key blocks x D chunks, heads, batch).

CUDA caps grid dimensions 1 and 2 at 65535. A (blocks, batch * heads, D chunks) grid fails to
launch once batch * heads passes that (e.g. 4096 short sequences x 16 heads), so heads and batch
get a dimension each and the D chunks share dimension 0 with the blocks (chunks fastest: the
programs of one query block run side by side and share its Q rows and the head's K/V in L2).
Block indices read from the grid are special registers the compiler can re-read anywhere, so
this costs no register across the key loop (a flat 1-D grid unflattened by division did, and
tipped configs at 255 registers into spills).
"""
import triton
import triton.language as tl

MAX_GRID_YZ = 65535


def launch_grid(blocks: int, chunks: int, heads: int, batch: int) -> tuple:
    """The grid of a kernel that reads its ids with `program_ids`."""
    if heads > MAX_GRID_YZ or batch > MAX_GRID_YZ:
        raise ValueError(f"batch ({batch}) and heads ({heads}) must each be at most {MAX_GRID_YZ} "
                         "(CUDA's grid limit); split the batch")
    return (blocks * chunks, heads, batch)


@triton.jit
def program_ids(N_CHUNKS: tl.constexpr):
    """(block, D chunk, head, batch) of this program in a `launch_grid(blocks, N_CHUNKS, heads, batch)`."""
    pid = tl.program_id(0)
    return pid // N_CHUNKS, pid % N_CHUNKS, tl.program_id(1), tl.program_id(2).to(tl.int64)
