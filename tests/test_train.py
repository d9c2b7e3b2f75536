"""The training program: tiny end-to-end runs of every method, the metrics log, checkpoints,
exact resume, .npz input, the CLI and the demo."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from rollingq import train
from rollingq.data import SyntheticSpec, make_synthetic, save_npz
from rollingq.train import TrainConfig, run

TINY = dict(n_train=96, n_test=16, dim=16, enc_layers=1, batch_size=32, threads=1, progress=False, quiet=True)

COMMON_KEYS = {"epoch", "method", "seed", "lr", "loss", "train_acc", "test_acc", "acc", "probe_acc",
               "probe_acc_subsets", "air", "c", "key_gap", "mass_train", "weights", "rotated", "rotations", "time"}
ATTENTION_KEYS = {"mass", "c_test", "air_test", "key_gap_test"}
SUBSETS = {"clean", "corrupt_0", "corrupt_1"}


def _numbers(v):
    if isinstance(v, dict):
        for x in v.values():
            yield from _numbers(x)
    elif isinstance(v, list):
        for x in v:
            yield from _numbers(x)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        yield v


def _read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", ["vanilla", "rollingq", "concat", "sum"])
def test_one_epoch_each_method_writes_a_complete_log(tmp_path, method):
    out = tmp_path / method
    history = run(TrainConfig(method=method, epochs=1, out=str(out), **TINY))
    log = _read_log(out / "metrics.jsonl")
    assert log == json.loads(json.dumps(history)) and len(log) == 1
    rec = log[0]
    attention = method in ("vanilla", "rollingq")
    assert COMMON_KEYS <= set(rec)
    assert (ATTENTION_KEYS <= set(rec)) == attention
    assert rec["method"] == method and rec["epoch"] == 1
    assert set(rec["acc"]) == SUBSETS and set(rec["probe_acc_subsets"]) == SUBSETS
    assert len(rec["probe_acc"]) == 2
    for v in _numbers(rec):
        assert math.isfinite(v)
    assert 0 <= rec["test_acc"] <= 1 and rec["loss"] > 0
    if attention:
        # Every attention field is defined; mass rows (2 modalities + the fusion token) sum to 1.
        assert None not in (rec["air"], rec["key_gap"]) and None not in rec["c"]
        assert set(rec["mass"]) == SUBSETS
        for row in rec["mass"].values():
            assert len(row) == 3 and abs(sum(row) - 1) < 1e-5
        assert abs(rec["air"] - (rec["c"][0] - rec["c"][1])) < 1e-9
        assert rec["rotations"] == (1 if method == "rollingq" else 0)
    else:
        assert rec["air"] is None and rec["key_gap"] is None and rec["rotations"] == 0

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "scheduler", "controller", "rng"}
    if attention:
        eye = torch.eye(16).expand(1, 16, 16)
        rotated = not torch.allclose(state["model"]["attn.rotation"], eye)
        assert rotated == (method == "rollingq")


def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path):
    cfg = dict(method="rollingq", epochs=3, **TINY)
    full = run(TrainConfig(out=str(tmp_path / "full"), **cfg))
    part = run(TrainConfig(out=str(tmp_path / "part"), stop_after=2, **cfg))
    assert len(part) == 2
    resumed = run(TrainConfig(out=str(tmp_path / "part"), resume=True, **cfg))
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert strip(_read_log(tmp_path / "part" / "metrics.jsonl")) == strip(full)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["controller"]["rotations"] == b["controller"]["rotations"] == [1]


@pytest.mark.cuda
def test_resume_on_cuda(tmp_path):
    """A CUDA run resumes (the checkpoint's RNG states reach the setters as CPU tensors) and
    carries on to the same number of epochs and rotations. Deterministic mode (warn_only: cuBLAS
    would want CUBLAS_WORKSPACE_CONFIG) gives each launch one fixed config, so the GPU check's time
    budget pays one compile per kernel instead of an autotuning sweep."""
    cfg = dict(method="rollingq", epochs=3, device="cuda", **TINY)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        part = run(TrainConfig(out=str(tmp_path / "part"), stop_after=2, **cfg))
        resumed = run(TrainConfig(out=str(tmp_path / "part"), resume=True, **cfg))
    finally:
        torch.use_deterministic_algorithms(False)
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in part] + [3]
    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert state["controller"]["rotations"] == [1]


def test_resume_refuses_a_missing_checkpoint_or_changed_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(TrainConfig(method="vanilla", epochs=1, out=str(tmp_path / "none"), resume=True, **TINY))
    run(TrainConfig(method="vanilla", epochs=1, out=str(tmp_path / "a"), **TINY))
    with pytest.raises(ValueError, match="lr"):
        run(TrainConfig(method="vanilla", epochs=1, lr=0.5, out=str(tmp_path / "a"), resume=True, **TINY))


def test_cuda_device_always_has_an_index(monkeypatch):
    """--device cuda / auto on a GPU: torch.cuda.set_device refuses a bare "cuda" (every GPU run
    failed there); the device passed on carries the current index, or the local rank's under
    torch.distributed. CUDA is faked (no GPU here); the index check is set_device's own."""
    from torch.cuda._utils import _get_device_index

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for name, distributed, want in (("auto", False, "cuda:0"), ("cuda", False, "cuda:0"),
                                    ("cuda:1", False, "cuda:1"), ("cuda", True, "cuda:3")):
        device = train._device_for(name, distributed, 3)
        assert device == torch.device(want) and _get_device_index(device) == device.index
    assert train._device_for("cpu", False, 0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train._device_for("auto", False, 0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        train._device_for("cuda", False, 0)


def test_full_pass_and_svd_rotation_and_npz_input(tmp_path, monkeypatch):
    """--full-pass: the controller observes only inside the epoch-end pass (the training steps run
    without statistics: no online window), and decides from it."""
    from rollingq.controller import RollingQ

    data = make_synthetic(SyntheticSpec(n_train=64, n_test=8, seed=5))
    path = tmp_path / "feat.npz"
    save_npz(data, path)
    cfg = {**TINY, "n_train": None, "n_test": None}
    seen, observe = [], RollingQ.observe
    monkeypatch.setattr(RollingQ, "observe", lambda self, *a: (seen.append(self.in_full_pass), observe(self, *a)))
    hist = run(TrainConfig(method="rollingq", data=str(path), epochs=1, full_pass=True, rotation="svd",
                           rotate="all", out=str(tmp_path / "r"), **cfg))
    rec = hist[0]
    assert rec["rotations"] == 1 and all(math.isfinite(v) for v in _numbers(rec))
    assert seen and all(seen), "a training step computed statistics with --full-pass"


def test_full_pass_with_every_n_steps_collects_only_the_step_windows(tmp_path, monkeypatch):
    """--full-pass with --every-n-steps: the training steps compute statistics only for the step
    decisions' windows, not for the epoch's last --window steps, which the pass replaces."""
    from rollingq.controller import RollingQ

    seen, observe = [], RollingQ.observe
    monkeypatch.setattr(RollingQ, "observe", lambda self, *a: (
        seen.append("pass" if self.in_full_pass else self.global_step), observe(self, *a)))
    # 96 samples in batches of 32: steps 1-3 and 4-6 (global_step 0-2 and 3-5 while they run); a
    # step decision after steps 2, 4 and 6, each reading the step before it. The first epoch's
    # last step (3) is in no step window.
    hist = run(TrainConfig(method="rollingq", epochs=2, full_pass=True, every_n_steps=2, window=1,
                           out=str(tmp_path / "r"), **TINY))
    assert [s for s in seen if s != "pass"] == [1, 3, 5]
    assert seen.count("pass") > 0 and len(hist) == 2


def test_cli_parses_and_rejects(tmp_path, capsys):
    out = tmp_path / "cli"
    assert train.main(["--method", "sum", "--epochs", "1", "--n-train", "64", "--n-test", "8", "--dim", "16",
                       "--enc-layers", "1", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    assert len(_read_log(out / "metrics.jsonl")) == 1
    assert "[sum] epoch   1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train.main(["--method", "bogus"])
    with pytest.raises(SystemExit):
        train.main(["--epochs", "0", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        train.main(["--rotation", "qr"])
    # A bad feature file or a missing checkpoint is a usage error with the reason, no traceback.
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "y")])
    assert "not a readable .npz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out", str(tmp_path / "nothing")])
    assert "no checkpoint" in capsys.readouterr().err
    # 16 modalities: the attention methods' fusion tokens would need a 17th class.
    save_npz(make_synthetic(SyntheticSpec(num_modalities=16, tokens=(2,), signal_tokens=(1,), n_train=8, n_test=1)),
             tmp_path / "m16.npz")
    with pytest.raises(SystemExit):
        train.main(["--data", str(tmp_path / "m16.npz"), "--out", str(tmp_path / "z")])
    assert "16 modalities; --method rollingq fuses at most 15" in capsys.readouterr().err
    # --help gives the defaults, the synthetic sizes included.
    with pytest.raises(SystemExit):
        train.main(["--help"])
    help_text = capsys.readouterr().out
    assert "(default 4000)" in help_text and "(default: rollingq)" in help_text and "default: None" not in help_text


def test_cosine_warmup_schedule():
    f = train.cosine_warmup(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_demo_end_to_end_on_a_tiny_task(tmp_path, capsys):
    folder = train.run_demo(out_root=str(tmp_path), epochs=1, progress=False,
                            spec=SyntheticSpec(n_train=64, n_test=8), dim=16, enc_layers=1, quiet=True)
    printed = capsys.readouterr().out
    assert "| metric | vanilla | rollingq |" in printed and "acc, favoured (audio) corrupted" in printed
    with open(os.path.join(folder, "metrics.json")) as f:
        metrics = json.load(f)
    assert set(metrics["runs"]) == {"vanilla", "rollingq"}
    assert metrics["runs"]["rollingq"][-1]["rotations"] == 1
    png = os.path.join(folder, "demo.png")
    if importlib.util.find_spec("matplotlib") is not None:
        assert os.path.getsize(png) > 1000
    else:  # the plot is optional: no matplotlib, no plot, no error
        assert not os.path.exists(png)


def test_experiment_quick_writes_tables_and_plot(tmp_path, capsys):
    from rollingq import experiment

    out = tmp_path / "exp"
    assert experiment.main(["--quick", "--seeds", "2", "--workers", "1", "--methods", "vanilla,rollingq,sum",
                            "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    for name in ("vanilla", "rollingq", "sum"):
        assert f"| {name} | " in md
    assert "| concat |" not in md and "Per epoch" in md
    with open(out / "results.json") as f:
        res = json.load(f)
    assert set(res["runs"]) == {"vanilla", "rollingq", "sum"}
    assert all(len(h) == 2 for r in res["runs"].values() for h in r.values())
    assert res["runs"]["rollingq"]["1"][-1]["rotations"] == 1 and res["runs"]["vanilla"]["0"][-1]["rotations"] == 0
    # Mean ± std over the two seeds, computed from the logged finals.
    accs = [res["runs"]["sum"][s][-1]["test_acc"] for s in ("0", "1")]
    assert f"| sum | {np.mean(accs):.3f} ± {np.std(accs):.3f} |" in md
    with pytest.raises(SystemExit):
        experiment.main(["--methods", "vanilla,bogus", "--out", str(tmp_path / "x")])


def test_three_modalities_and_two_heads(tmp_path):
    data = make_synthetic(SyntheticSpec(num_modalities=3, tokens=(4, 6, 3), features=(8, 8, 5),
                                        signal_tokens=(1, 6, 3), n_train=64, n_test=8, seed=1))
    cfg = {**TINY, "n_train": None, "n_test": None}
    hist, model = run(TrainConfig(method="rollingq", epochs=1, fusion_heads=2, out=str(tmp_path / "m3"), **cfg), data,
                      return_model=True)
    rec = hist[0]
    assert set(rec["acc"]) == {"clean", "corrupt_0", "corrupt_1", "corrupt_2"}
    assert len(rec["c"]) == 3 and len(rec["probe_acc"]) == 3 and rec["rotations"] == 1
    # AIR is max(c) - min(c) per head, then averaged: at least the spread of the head-averaged c.
    assert rec["air"] >= max(rec["c"]) - min(rec["c"]) - 1e-9 and rec["air"] > 0
    assert all(len(row) == 4 and abs(sum(row) - 1) < 1e-5 for row in rec["mass"].values())
    assert all(math.isfinite(v) for v in _numbers(rec))
    # The test AIR is the same measure: per head max(c) - min(c) over the subset, then the mean over
    # heads (not the spread of the head-averaged c), recomputed here from the model's statistics.
    model.eval()
    with torch.no_grad():
        xs, _, _ = data.dataset(1)[list(range(len(data.dataset(1))))]
        out = model(xs, need_stats=True)
        kbar = out.stats.key_sum[:, :, :3].double() / out.stats.key_count[:, None, :3, None].double()
        cos = torch.nn.functional.cosine_similarity(out.q_fusion.double()[:, :, None], kbar, dim=-1)  # [B, H, M]
    spread_of_mean = []
    for name, idx in data.subsets(1).items():
        c = cos[torch.as_tensor(idx)].mean(0)  # [H, M]
        assert rec["air_test"][name] == pytest.approx(float((c.amax(-1) - c.amin(-1)).mean()), abs=1e-9)
        assert rec["c_test"][name] == pytest.approx(c.mean(0).tolist(), abs=1e-9)
        spread_of_mean.append(float(c.mean(0).amax() - c.mean(0).amin()))
    assert any(abs(a - b) > 1e-4 for a, b in zip(rec["air_test"].values(), spread_of_mean)), "heads must disagree"


def test_attention_dropout_trains_and_resumes_exactly(tmp_path):
    """--attn-dropout reaches the fusion layer; its masks come from the saved generator state, so a
    resumed run repeats the uninterrupted one. A checkpoint written before the setting existed
    resumes as attn_dropout = 0."""
    cfg = dict(method="rollingq", epochs=2, attn_dropout=0.3, **TINY)
    full = run(TrainConfig(out=str(tmp_path / "full"), **cfg))
    plain = run(TrainConfig(out=str(tmp_path / "plain"), **dict(cfg, attn_dropout=0.0)))
    assert full[-1]["loss"] != plain[-1]["loss"]
    run(TrainConfig(out=str(tmp_path / "part"), stop_after=1, **cfg))
    resumed = run(TrainConfig(out=str(tmp_path / "part"), resume=True, **cfg))
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(full)
    with pytest.raises(ValueError, match="attn_dropout"):
        run(TrainConfig(out=str(tmp_path / "part"), resume=True, **dict(cfg, attn_dropout=0.1)))
    old = tmp_path / "plain" / "checkpoint.pt"
    state = torch.load(old, weights_only=True)
    del state["config"]["attn_dropout"]
    torch.save(state, old)
    assert strip(run(TrainConfig(out=str(tmp_path / "plain"), resume=True, **dict(cfg, attn_dropout=0.0)))) == strip(plain)
    with pytest.raises(SystemExit):
        train.main(["--attn-dropout", "1.0", "--out", str(tmp_path / "z")])
    with pytest.raises(ValueError, match="attention fusion"):
        TrainConfig(method="sum", attn_dropout=0.1).check()


def _fake_record(air, gap=0.5, acc=0.8):
    return {"test_acc": acc, "acc": {"clean": 1.0, "corrupt_0": acc, "corrupt_1": 0.9}, "probe_acc": [0.9, 0.6],
            "air": air, "key_gap": gap, "mass": {"clean": [0.6, 0.3, 0.1], "corrupt_0": [0.4, 0.5, 0.1]}}


def test_experiment_tables_average_over_missing_values():
    """A null AIR (an epoch without statistics) is left out of the means, "-" when every seed
    lacks it; the tables' std is the population std (ddof=0)."""
    from rollingq import experiment

    results = {"rollingq": {0: [_fake_record(None), _fake_record(0.2)],
                            1: [_fake_record(None), _fake_record(None, gap=None)],
                            2: [_fake_record(None), _fake_record(0.1, gap=0.7)]}}
    rows = experiment.epoch_table(results).splitlines()
    assert rows[2] == "| 1 | - | 0.500 | 0.500 | 0.800 |"
    assert rows[3] == "| 2 | +0.150 | 0.500 | 0.600 | 0.800 |"
    row = [r for r in experiment.summary_table(results).splitlines() if r.startswith("| rollingq |")][0]
    cells = [c.strip() for c in row.split("|")[2:-1]]
    labels = [label for _, label in experiment.COLUMNS]
    assert cells[labels.index("final abs(AIR)")] == f"0.150 ± {np.std([0.2, 0.1]):.3f}" == "0.150 ± 0.050"
    assert cells[labels.index("key gap")] == "0.600 ± 0.100"


def test_every_n_steps_decision_on_the_epochs_last_step_keeps_the_epoch_record(tmp_path):
    """3 steps per epoch and a step decision every 3 steps: the epoch-end record still reads the
    epoch's window. vanilla never rotates and collects on every step either way (window 5), so
    its records match a run without step decisions."""
    cfg = dict(method="vanilla", epochs=2, **TINY)
    plain = run(TrainConfig(out=str(tmp_path / "plain"), **cfg))
    stepped = run(TrainConfig(out=str(tmp_path / "step"), every_n_steps=3, **cfg))
    for a, b in zip(plain, stepped):
        assert b["air"] is not None and None not in b["c"]
        for key in ("air", "key_gap", "c", "mass_train", "test_acc"):
            assert a[key] == b[key], key


def test_resume_refuses_another_world_size(tmp_path):
    """The number of processes sets the shards and the steps per epoch: a resume must keep it.
    Older checkpoints (no saved world size) are checked by their step count."""
    cfg = dict(method="vanilla", epochs=2, **TINY)
    out = tmp_path / "w"
    run(TrainConfig(out=str(out), stop_after=1, **cfg))
    path = out / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert state["config"]["world_size"] == 1
    torch.save({**state, "config": {**state["config"], "world_size": 2}}, path)
    with pytest.raises(ValueError, match=r"settings differ.*'world_size': \(2, 1\)"):
        run(TrainConfig(out=str(out), resume=True, **cfg))
    old = {k: v for k, v in state["config"].items() if k != "world_size"}
    # An older checkpoint of 2 processes: 2 steps in its first epoch where this run makes 3.
    torch.save({**state, "config": old, "scheduler": {**state["scheduler"], "last_epoch": 2}}, path)
    with pytest.raises(ValueError, match=r"steps_per_epoch \(world_size\)': \(2, 3\)"):
        run(TrainConfig(out=str(out), resume=True, **cfg))
    torch.save({**state, "config": old}, path)  # an older checkpoint of one process resumes
    assert len(run(TrainConfig(out=str(out), resume=True, **cfg))) == 2


def test_demo_refuses_the_flags_it_does_not_honour(monkeypatch, capsys):
    """--demo fixes its own setting: a training flag given with it is an error naming the flag
    (also written as --flag=value or abbreviated, and also at its default value)."""
    calls = []
    monkeypatch.setattr(train, "run_demo", lambda **kw: calls.append(kw))
    for argv, named in ((["--demo", "--lr=0.5", "--method", "vanilla"], "not --lr, --method"),
                        (["--demo", "--epo", "1"], "not --epochs"),
                        (["--demo", "--epochs", "12", "--out", "x"], "not --epochs, --out"),
                        (["--demo", "--threads", "0"], "--threads must be >= 1, got 0")):
        with pytest.raises(SystemExit):
            train.main(argv)
        err = capsys.readouterr().err
        assert named in err, argv
        if "not --" in named:
            assert "--demo runs a fixed setting and takes only --threads, --seed and --no-progress" in err
    assert calls == []
    assert train.main(["--demo", "--seed", "3", "--threads", "1", "--no-progress"]) == 0
    assert calls == [{"threads": 1, "seed": 3, "progress": False}]


@pytest.mark.parametrize("argv, message", [
    (["--dim", "30"], "--dim must be a multiple of the encoders' 4 heads, got 30"),
    (["--dim", "32", "--fusion-heads", "3"], "--dim must be a multiple of --fusion-heads (3), got 32"),
    (["--n-train", "0"], "--n-train must be >= 1, got 0"),
    (["--n-test", "-1"], "--n-test must be >= 1, got -1"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--beta", "nan"], "--beta must be a finite number, got nan"),
    (["--sigma", "inf"], "--sigma must be a finite number, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number >= 0, got inf"),
])
def test_cli_refuses_bad_settings_before_creating_the_run_folder(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    with pytest.raises(SystemExit):
        train.main(argv + ["--out", str(out)])
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resume_with_step_decisions_keeps_the_step_window_across_epochs(tmp_path):
    """3 steps per epoch, a decision every 4 with window 5: the step window spans each epoch end,
    so its samples must travel in the checkpoint for the resumed run to decide as the whole one."""
    cfg = dict(method="rollingq", epochs=3, every_n_steps=4, max_rotations=3, **TINY)
    full = run(TrainConfig(out=str(tmp_path / "full"), **cfg))
    run(TrainConfig(out=str(tmp_path / "part"), stop_after=1, **cfg))
    state = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert int(state["controller"]["step_sums"][0]["samples"]) == 96  # steps 1..3, for the decision at 4
    resumed = run(TrainConfig(out=str(tmp_path / "part"), resume=True, **cfg))
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(resumed) == strip(full) and full[-1]["rotations"] == 3


def test_full_pass_shards_count_every_sample_once():
    """Over the ranks, the full pass sees each training sample exactly once (a DistributedSampler
    would repeat up to world - 1 of them to even out the shards), so its means are the dataset's."""
    class Positions(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, index):
            return torch.as_tensor(index)

    for world in (1, 3, 4, 12):
        seen = [int(i) for rank in range(world) for batch in train.full_pass_loader(Positions(), 3, world, rank)
                for i in batch]
        assert sorted(seen) == list(range(10)), world
    data = make_synthetic(SyntheticSpec(n_train=10, n_test=2), seed=0)
    (xs, y, corrupt), = list(train.full_pass_loader(data.dataset(0), 16, 1, 0))
    assert len(y) == 10 and all(x.shape[0] == 10 for x in xs)
