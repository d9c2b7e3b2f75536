"""Data-parallel RollingQ: two CPU processes (gloo) that observe different scripted statistics end
with identical rotations, equal to those of one process that observes all the data."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rollingq.controller import RollingQ
from rollingq.modules import RollingQAttention
from rollingq.stats import AttentionStats

WORLD = 2
N_BATCHES = 4


def make_layers():
    # Layer 0: MHA, two modalities; layer 1: GQA, three modalities, two fusion tokens.
    return [RollingQAttention(16, 2, 2), RollingQAttention(32, 4, 3, num_fusion_tokens=2, kv_heads=2)]


def batch(layer, epoch, i):
    """Deterministic scripted statistics for (epoch, batch i), skewed toward modality 0."""
    gen = torch.Generator().manual_seed(1000 * epoch + i)
    H, Hkv, M, D, nf = layer.num_heads, layer.kv_heads, layer.num_modalities, layer.head_dim, layer.num_fusion_tokens
    B = 2 + i  # ranks see different batch sizes
    direction = torch.randn(Hkv, D, generator=gen)
    key_count = torch.randint(1, 4, (B, M + 1), generator=gen)
    key_count[:, M] = nf
    mean_keys = torch.randn(B, Hkv, M + 1, D, generator=gen)
    mean_keys[:, :, 0] += 2 * direction
    q = torch.randn(B, H, D, generator=gen) + 3 * direction.repeat_interleave(H // Hkv, 0)
    mass = torch.softmax(torch.randn(B, H, 5, M + 1, generator=gen), -1)
    return q, AttentionStats(mass, (mean_keys * key_count[:, None, :, None]).float(), key_count)


def run_epochs(rank, world):
    """Two epochs (max_rotations=2, so the second composes onto the first). Rank r observes
    batches r, r + world, ...; layer 1 is fed by rank 0 only (rank 1 contributes zeros)."""
    torch.manual_seed(0)
    layers = make_layers()
    records = []
    ctrl = RollingQ(layers, max_rotations=2, sigma=0.5, logger=records.append)
    for epoch in range(2):
        for i in range(rank, N_BATCHES, world):
            ctrl.observe(layers[0], *batch(layers[0], epoch, i))
        if rank == 0:
            for i in range(N_BATCHES):
                ctrl.observe(layers[1], *batch(layers[1], epoch, i))
        ctrl.epoch_end()
    return [layer.rotation.clone() for layer in layers], records, ctrl.rotations


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        rotations, records, counts = run_epochs(rank, WORLD)
        torch.save({"rotations": rotations, "records": records, "counts": counts},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_two_ranks_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single_rot, single_rec, single_counts = run_epochs(0, 1)

    assert single_counts == [2, 2]
    for r in range(1, WORLD):  # every rank applied the identical rotation, bit for bit
        for a, b in zip(results[0]["rotations"], results[r]["rotations"]):
            assert torch.equal(a, b)
        assert results[r]["records"] == results[0]["records"]
    eye = [torch.eye(layer.head_dim).expand_as(layer.rotation) for layer in make_layers()]
    for a, b, e in zip(results[0]["rotations"], single_rot, eye):
        assert torch.allclose(a, b, atol=1e-6)
        assert not torch.allclose(a, e, atol=1e-2)
    assert results[0]["counts"] == single_counts
    for rec_d, rec_s in zip(results[0]["records"], single_rec):
        for ld, ls in zip(rec_d["layers"], rec_s["layers"]):
            assert ld["samples"] == ls["samples"] and ld["rotated"] == ls["rotated"]
            for key in ("c", "air", "weights", "key_gap", "mass"):
                assert torch.allclose(torch.tensor(ld[key]), torch.tensor(ls[key]), atol=1e-9), key
