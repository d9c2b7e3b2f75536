"""Data-parallel training: two CPU processes (gloo on 127.0.0.1, torchrun's environment variables)
must end with identical rotations, equal to what one process with the same global batch computes,
and only rank 0 writes files."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from rollingq.train import TrainConfig, run

# DDP runs without buffer broadcasts (rollingq.train), so equal rotations on both ranks can only
# come from the all-reduced statistics; max_rotations=2 puts the last one at the very end.
CFG = dict(method="rollingq", epochs=2, max_rotations=2, n_train=96, n_test=16, dim=16, enc_layers=1, threads=1,
           progress=False, quiet=True, seed=3)

WORKER = textwrap.dedent("""
    import sys, torch
    from rollingq.train import TrainConfig, run
    out, dump, cfg = sys.argv[1], sys.argv[2], eval(sys.argv[3])
    history, model = run(TrainConfig(out=out, batch_size=32, **cfg), return_model=True)
    torch.save({"rotation": model.attn.rotation.clone(),
                "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                "history": history}, dump)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_rotations_identical_and_match_single_process(tmp_path):
    port = _free_port()
    out = tmp_path / "ddp"
    env_base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env_base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                    ROLLINGQ_CPU_BACKEND="reference", OMP_NUM_THREADS="1")
    procs = []
    for rank in range(2):
        env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(out), str(tmp_path / f"rank{rank}.pt"), repr(CFG)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log}"

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    eye = torch.eye(16).expand(1, 16, 16)
    assert not torch.allclose(r0["rotation"], eye, atol=1e-3), "no rotation was applied"
    # The controller all-reduces its sums, so both ranks apply the identical rotation.
    assert torch.equal(r0["rotation"], r1["rotation"])
    assert torch.equal(r0["params"], r1["params"])
    assert r0["history"][-1]["rotations"] == r1["history"][-1]["rotations"] == 2

    # Only rank 0 writes: one log line per epoch, not two.
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    # Resuming the 2-process run in one process would change the shards and the schedule: refused.
    with pytest.raises(ValueError, match=r"'world_size': \(2, 1\)"):
        run(TrainConfig(out=str(out), batch_size=32, resume=True, **CFG))

    # One process with the same global batch (2 x 32) sees the same samples per step and the same
    # statistics window, so it must land on the same rotation (up to float summation order; without the all-reduce they differ by ~0.04).
    single, model = run(TrainConfig(out=str(tmp_path / "single"), batch_size=64, **CFG), return_model=True)
    torch.testing.assert_close(r0["rotation"], model.attn.rotation, atol=1e-3, rtol=0)
    assert abs(single[-1]["air"] - r0["history"][-1]["air"]) < 1e-3
