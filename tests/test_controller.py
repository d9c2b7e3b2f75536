"""RollingQ controller on scripted statistics (AttentionStats built by hand, observe called directly)."""
import io
import json

import pytest
import torch

from rollingq.controller import RollingQ
from rollingq.modules import RollingQAttention
from rollingq.rotation import plane_rotation
from rollingq.stats import AttentionStats


def make_layer(H=2, Hkv=None, M=2, D=8, nf=1):
    return RollingQAttention(H * D, H, M, num_fusion_tokens=nf, kv_heads=Hkv)


def scripted_batch(layer, B, gen, skew=1.0, L=6):
    """One batch of fake statistics with M + 1 classes (the last one is the fusion tokens).
    `skew` pushes the fusion queries toward modality 0's keys, so AIR > 0."""
    H, Hkv, M, D, nf = layer.num_heads, layer.kv_heads, layer.num_modalities, layer.head_dim, layer.num_fusion_tokens
    direction = torch.randn(Hkv, D, generator=gen)
    key_count = torch.randint(1, 5, (B, M + 1), generator=gen)
    key_count[:, M] = nf
    key_count[0, M - 1] = 0  # one sample lacks the last modality
    mean_keys = torch.randn(B, Hkv, M + 1, D, generator=gen)
    mean_keys[:, :, 0] += 2 * direction
    key_sum = mean_keys * key_count[:, None, :, None]
    q = torch.randn(B, H, D, generator=gen) + skew * 3 * direction.repeat_interleave(H // Hkv, 0)
    mass = torch.softmax(torch.randn(B, H, L, M + 1, generator=gen), -1)
    return q, AttentionStats(mass, key_sum.float(), key_count)


def expected_decision(layer, batches, sigma):
    """Explicit loops over samples: qbar, dataset-mean keys, c and the balanced target per head."""
    H, Hkv, M, D, nf = layer.num_heads, layer.kv_heads, layer.num_modalities, layer.head_dim, layer.num_fusion_tokens
    g = H // Hkv
    qs, kbars, presents, masses = [], [], [], []
    for q, st in batches:
        for b in range(q.shape[0]):
            qs.append(q[b].double())
            cnt = st.key_count[b, :M]
            presents.append(cnt > 0)
            kbars.append(st.key_sum[b, :, :M].double() / cnt.clamp(min=1)[None, :, None].double())
            masses.append(st.attn_mass[b, :, :nf].double().mean(1))
    n = len(qs)
    qbar = sum(qs) / n
    c = torch.zeros(H, M, dtype=torch.float64)
    kbar = torch.zeros(Hkv, M, D, dtype=torch.float64)
    for m in range(M):
        idx = [i for i in range(n) if presents[i][m]]
        kbar[:, m] = sum(kbars[i][:, m] for i in idx) / len(idx)
        for h in range(H):
            c[h, m] = sum(torch.nn.functional.cosine_similarity(qs[i][h], kbars[i][h // g, m], dim=0)
                          for i in idx) / len(idx)
    w = torch.softmax(-2 * sigma * c, -1)
    t = torch.stack([sum(w[h, m] * kbar[h // g, m] / kbar[h // g, m].norm() for m in range(M)) for h in range(H)])
    t = t / t.norm(dim=-1, keepdim=True) * qbar.norm(dim=-1, keepdim=True)
    return dict(qbar=qbar, c=c, w=w, t=t, kbar=kbar, mass=sum(masses) / n)


def feed(ctrl, layer, batches):
    for q, st in batches:
        ctrl.observe(layer, q, st)


def cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.mark.parametrize("rotation", ["plane", "svd"])
@pytest.mark.parametrize("H,Hkv,M", [(2, 2, 2), (4, 2, 3)])
def test_rotation_points_mean_query_at_balanced_target(rotation, H, Hkv, M):
    gen = torch.Generator().manual_seed(H + M)
    layer = make_layer(H=H, Hkv=Hkv, M=M)
    records = []
    ctrl = RollingQ(layer, sigma=0.7, rotation=rotation, logger=records.append)
    batches = [scripted_batch(layer, 4, gen) for _ in range(3)]
    feed(ctrl, layer, batches)
    rec = ctrl.epoch_end()
    exp = expected_decision(layer, batches, sigma=0.7)
    assert records == [rec] and json.loads(json.dumps(rec)) == rec
    lr = rec["layers"][0]
    assert lr["rotated"] and lr["rotations"] == 1 and lr["samples"] == 12
    assert torch.allclose(torch.tensor(lr["c"], dtype=torch.float64), exp["c"], atol=1e-6)
    assert torch.allclose(torch.tensor(lr["weights"], dtype=torch.float64), exp["w"], atol=1e-6)
    assert torch.allclose(torch.tensor(lr["mass"], dtype=torch.float64), exp["mass"][:, :M], atol=1e-6)
    k = exp["kbar"]
    pairs = [(i, j) for i in range(M) for j in range(i + 1, M)]
    gap = sum(1 - cos(k[:, i], k[:, j]) for i, j in pairs) / len(pairs)
    assert torch.allclose(torch.tensor(lr["key_gap"], dtype=torch.float64), gap, atol=1e-6)
    air = exp["c"][:, 0] - exp["c"][:, 1] if M == 2 else exp["c"].amax(-1) - exp["c"].amin(-1)
    assert torch.allclose(torch.tensor(lr["air"], dtype=torch.float64), air, atol=1e-6)
    R = layer.rotation.double()
    assert R.dtype == torch.float64 and layer.rotation.dtype == torch.float32
    rq = (R @ exp["qbar"][..., None])[..., 0]
    assert (cos(rq, exp["t"]) > 1 - 1e-6).all()
    # The mean query started elsewhere: the test would fail without a rotation.
    assert (cos(exp["qbar"], exp["t"]) < 0.99).all()
    if rotation == "plane":
        assert torch.allclose(R, plane_rotation(exp["qbar"], exp["t"]), atol=1e-6)


def test_alpha_for_two_modalities_in_record():
    gen = torch.Generator().manual_seed(11)
    layer = make_layer()
    sigma = 2.0
    ctrl = RollingQ(layer, sigma=sigma, logger=lambda r: None)
    feed(ctrl, layer, [scripted_batch(layer, 6, gen)])
    lr = ctrl.epoch_end()["layers"][0]
    air = torch.tensor(lr["air"], dtype=torch.float64)
    w = torch.tensor(lr["weights"], dtype=torch.float64)
    assert (air.abs() > 0.05).all()
    assert torch.allclose(w[:, 0], (1 + torch.tanh(-sigma * air)) / 2, atol=1e-12)


def test_no_rotation_while_imbalance_within_beta():
    gen = torch.Generator().manual_seed(12)
    layer = make_layer(H=2)
    batches = [scripted_batch(layer, 5, gen)]
    exp = expected_decision(layer, batches, sigma=0.0)
    spread = (exp["c"][:, 0] - exp["c"][:, 1]).abs()
    eye = torch.eye(layer.head_dim).expand(2, -1, -1)

    ctrl = RollingQ(layer, beta=float(spread.max()) + 1e-3, max_rotations=5, logger=lambda r: None)
    for _ in range(3):
        feed(ctrl, layer, batches)
        assert not ctrl.epoch_end()["layers"][0]["rotated"]
    assert torch.equal(layer.rotation, eye) and ctrl.rotations == [0]

    # beta between the two heads' |AIR|: only the more imbalanced head turns.
    lo, hi = float(spread.min()), float(spread.max())
    assert hi - lo > 1e-3
    ctrl.beta = (lo + hi) / 2
    feed(ctrl, layer, batches)
    lr = ctrl.epoch_end()["layers"][0]
    big = int(spread.argmax())
    assert lr["rotated"] and lr["rotated_heads"] == [h == big for h in range(2)]
    assert torch.equal(layer.rotation[1 - big], eye[0])
    assert not torch.allclose(layer.rotation[big], eye[0], atol=1e-3)


def test_at_most_max_rotations():
    gen = torch.Generator().manual_seed(13)
    layer = make_layer()
    ctrl = RollingQ(layer, max_rotations=1, logger=lambda r: None)
    feed(ctrl, layer, [scripted_batch(layer, 4, gen)])
    assert ctrl.epoch_end()["layers"][0]["rotated"]
    after_first = layer.rotation.clone()
    for _ in range(2):
        feed(ctrl, layer, [scripted_batch(layer, 4, gen)])
        assert not ctrl.epoch_end()["layers"][0]["rotated"]
    assert torch.equal(layer.rotation, after_first) and ctrl.rotations == [1]


def test_max_rotations_counts_each_head():
    """Each head has its own budget: a head that stayed under beta may rotate later although its
    neighbour spent the budget; the counts survive state_dict, and an older state (no per-head
    counts) gives every head its layer's count."""
    gen = torch.Generator().manual_seed(18)
    layer = make_layer(H=2)
    batches = [scripted_batch(layer, 5, gen)]
    exp = expected_decision(layer, batches, sigma=0.0)
    spread = (exp["c"][:, 0] - exp["c"][:, 1]).abs()
    lo, hi, big = float(spread.min()), float(spread.max()), int(spread.argmax())
    assert hi - lo > 1e-3 and lo > 1e-3
    ctrl = RollingQ(layer, beta=(lo + hi) / 2, max_rotations=1, logger=lambda r: None)
    feed(ctrl, layer, batches)
    lr = ctrl.epoch_end()["layers"][0]
    assert lr["rotated_heads"] == [h == big for h in range(2)] and lr["head_rotations"] == lr["rotated_heads"]
    after_first = layer.rotation.clone()
    ctrl.beta = 0.0  # now both heads are over beta; only the one with budget left turns
    feed(ctrl, layer, batches)
    lr = ctrl.epoch_end()["layers"][0]
    assert lr["rotated_heads"] == [h != big for h in range(2)] and lr["head_rotations"] == [1, 1]
    assert torch.equal(layer.rotation[big], after_first[big])
    assert not torch.allclose(layer.rotation[1 - big], after_first[1 - big], atol=1e-3)
    feed(ctrl, layer, batches)
    assert not ctrl.epoch_end()["layers"][0]["rotated"]
    assert ctrl.rotations == [2] and ctrl.head_rotations == [[1, 1]]

    state = ctrl.state_dict()
    again = RollingQ(layer, max_rotations=1, logger=lambda r: None)
    again.load_state_dict(state)
    assert again.head_rotations == [[1, 1]]
    old = {k: v for k, v in state.items() if k != "head_rotations"}
    old["rotations"] = [1]
    again = RollingQ(layer, max_rotations=2, logger=lambda r: None)
    again.load_state_dict(old)
    assert again.head_rotations == [[1, 1]]
    with pytest.raises(ValueError, match="head_rotations"):
        again.load_state_dict({**state, "head_rotations": [[1, 1, 1]]})


def test_composition_order():
    gen = torch.Generator().manual_seed(14)
    layer = make_layer(H=2)
    ctrl = RollingQ(layer, max_rotations=2, sigma=0.5, logger=lambda r: None)
    first = [scripted_batch(layer, 4, gen)]
    feed(ctrl, layer, first)
    ctrl.epoch_end()
    e1 = expected_decision(layer, first, 0.5)
    R1 = plane_rotation(e1["qbar"], e1["t"])
    second = [scripted_batch(layer, 4, gen, skew=-1.0)]
    feed(ctrl, layer, second)
    assert ctrl.epoch_end()["layers"][0]["rotations"] == 2
    e2 = expected_decision(layer, second, 0.5)
    R2 = plane_rotation(e2["qbar"], e2["t"])
    R = layer.rotation.double()
    assert torch.allclose(R, R2 @ R1, atol=1e-5)
    assert not torch.allclose(R, R1 @ R2, atol=1e-2), "the data must tell the two orders apart"


def test_window_zero_collects_only_in_the_full_pass():
    """window=0 (what --full-pass uses): no training step computes statistics, the full pass does,
    and the epoch end decides from it; every_n_steps, which has no pass, is refused with it."""
    layer = make_layer()
    ctrl = RollingQ(layer, window=0, logger=lambda r: None)
    for steps in (10, None):
        ctrl.begin_epoch(steps)
        flags = []
        for _ in range(4):
            flags.append(ctrl.collecting)
            ctrl.step()
        assert flags == [False] * 4
    gen = torch.Generator().manual_seed(16)
    batches = [scripted_batch(layer, 2, gen) for _ in range(3)]
    ctrl.full_pass(torch.nn.Identity(), batches, lambda m, b: feed(ctrl, layer, [b]))
    assert ctrl.epoch_end()["layers"][0]["samples"] == 6
    with pytest.raises(ValueError, match="window=0"):
        RollingQ(layer, window=0, every_n_steps=4)


def test_epoch_window_apart_from_the_step_window():
    """epoch_window=0 with every_n_steps (what --full-pass --every-n-steps uses): the steps collect
    only in the step windows, into the step accumulator; the epoch end reads the full pass alone."""
    layer = make_layer()
    ctrl = RollingQ(layer, window=2, epoch_window=0, every_n_steps=5, max_rotations=0, logger=lambda r: None)
    gen = torch.Generator().manual_seed(17)
    ctrl.begin_epoch(7)
    flags, step_samples = [], []
    for _ in range(7):
        flags.append(ctrl.collecting)
        if ctrl.collecting:
            feed(ctrl, layer, [scripted_batch(layer, 2, gen)])
        rec = ctrl.step()
        if rec is not None:
            step_samples.append(rec["layers"][0]["samples"])
    assert flags == [False, False, False, True, True, False, False]  # not the epoch's last two steps
    assert step_samples == [4]
    assert ctrl.state_dict()["sums"] == [None]
    batches = [scripted_batch(layer, 3, gen) for _ in range(2)]
    ctrl.full_pass(torch.nn.Identity(), batches, lambda m, b: feed(ctrl, layer, [b]))
    assert ctrl.epoch_end()["layers"][0]["samples"] == 6
    # The default follows window; a bad value is named.
    assert RollingQ(layer, window=3).epoch_window == 3 and RollingQ(layer, window=None).epoch_window is None
    for bad in (-1, 1.5, True, "all"):
        with pytest.raises(ValueError, match="epoch_window"):
            RollingQ(layer, epoch_window=bad)


def test_collecting_schedule_and_every_n_steps():
    layer = make_layer()
    ctrl = RollingQ(layer, window=3, logger=lambda r: None)
    ctrl.begin_epoch(10)
    flags = []
    for _ in range(10):
        flags.append(ctrl.collecting)
        assert ctrl.step() is None
    assert flags == [False] * 7 + [True] * 3
    assert not ctrl.collecting  # after the epoch's last step (e.g. validation)

    gen = torch.Generator().manual_seed(15)
    ctrl = RollingQ(layer, window=2, every_n_steps=4, max_rotations=3, logger=lambda r: None)
    ctrl.begin_epoch(100)
    flags, decided = [], []
    for s in range(8):
        flags.append(ctrl.collecting)
        if ctrl.collecting:
            feed(ctrl, layer, [scripted_batch(layer, 2, gen)])
        rec = ctrl.step()
        decided.append(rec is not None)
        if rec is not None:
            assert rec["layers"][0]["samples"] == 4
            assert (rec["epoch"], rec["decision"]) == (0, len([d for d in decided if d]) - 1)
    assert flags == [False, False, True, True] * 2
    assert decided == [False, False, False, True] * 2
    assert ctrl.rotations == [2]
    # Every-N decisions do not count as epochs; the epoch's own decision is the third.
    assert (ctrl.epoch_end()["epoch"], ctrl.epoch, ctrl.decisions) == (0, 1, 3)


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(16)
    layer = make_layer(H=2)
    ctrl = RollingQ(layer, max_rotations=3, logger=lambda r: None)
    ctrl.begin_epoch(20)
    feed(ctrl, layer, [scripted_batch(layer, 4, gen)])
    ctrl.epoch_end()
    for _ in range(3):
        ctrl.step()
    feed(ctrl, layer, [scripted_batch(layer, 4, gen)])
    state = ctrl.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    layer2 = make_layer(H=2)
    layer2.load_state_dict(layer.state_dict())
    ctrl2 = RollingQ(layer2, max_rotations=3, logger=lambda r: None)
    ctrl2.load_state_dict(loaded)
    s1, s2 = ctrl.state_dict(), ctrl2.state_dict()
    assert {k: v for k, v in s1.items() if k != "sums"} == {k: v for k, v in s2.items() if k != "sums"}
    assert s2["rotations"] == [1] and s2["global_step"] == 3 and s2["epoch_step"] == 3 and s2["epoch"] == 1
    for a, b in zip(s1["sums"], s2["sums"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The restored controller reaches the identical decision.
    ctrl.epoch_end()
    ctrl2.epoch_end()
    assert torch.equal(layer.rotation, layer2.rotation)
    with pytest.raises(ValueError, match="layers"):
        RollingQ([make_layer(), make_layer()]).load_state_dict(loaded)


def test_observe_checks_and_layers_argument():
    layer = make_layer(H=2)
    ctrl = RollingQ(layer, logger=lambda r: None)
    assert layer.controller is ctrl and "controller" not in dict(layer.named_modules())
    gen = torch.Generator().manual_seed(17)
    q, st = scripted_batch(layer, 3, gen)
    with pytest.raises(ValueError, match="q_fusion"):
        ctrl.observe(layer, q[:, :1], st)
    with pytest.raises(ValueError, match="key_sum"):
        ctrl.observe(layer, q, st._replace(key_sum=st.key_sum[:, :, :2]))
    with pytest.raises(ValueError, match="not attached"):
        ctrl.observe(make_layer(H=2), q, st)
    with pytest.raises(TypeError, match="layers"):
        RollingQ([layer, torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="rotation"):
        RollingQ(layer, rotation="qr")
    with pytest.raises(ValueError, match="num_modalities"):
        RollingQ(make_layer(M=1))
    # Nothing observed: a record, no rotation, no NaN.
    rec = ctrl.epoch_end()
    assert rec["layers"][0]["samples"] == 0 and not rec["layers"][0]["rotated"]


class _Fusion(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.attn = layer
        self.seen = []

    def forward(self, batch):
        x, ids = batch
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.attn(x, ids)[0]


def test_full_pass_collects_everything_in_eval_mode():
    torch.manual_seed(18)
    layer = make_layer(H=2, D=8)
    model = _Fusion(layer).train()
    ctrl = RollingQ(layer, window=1, logger=lambda r: None)
    ctrl.begin_epoch(100)  # step 0 of 100: online estimation is not collecting
    ids = torch.tensor([0, 0, 1, 1, 1])
    loader = [(torch.randn(3, 6, 16), ids) for _ in range(4)]
    model(loader[0])  # a training step outside the window: not collected
    ctrl.full_pass(model, loader, lambda m, b: m(b))
    assert model.training
    assert model.seen[1:] == [(False, False)] * 4
    model.eval()
    model(loader[0])  # eval outside full_pass (validation) is never collected
    lr = ctrl.epoch_end()["layers"][0]
    assert lr["samples"] == 12 and lr["rotated"]
    assert abs(sum(lr["mass"][0]) + lr["mass_fusion"][0] - 1) < 1e-5


def _decision_from(layer, batches):
    """The record of a fresh controller (no rotation) that observed exactly `batches`."""
    ref = RollingQ(layer, max_rotations=0, logger=lambda r: None)
    feed(ref, layer, batches)
    rec = ref.decide()["layers"][0]
    layer.controller = None
    return rec


def _same_record(a, b):
    assert a["samples"] == b["samples"]
    for key in ("c", "air", "key_gap", "mass"):
        assert torch.allclose(torch.tensor(a[key], dtype=torch.float64), torch.tensor(b[key], dtype=torch.float64),
                              atol=1e-12), key


@pytest.mark.parametrize("every,window", [(10, 2), (9, 2), (9, 3), (4, 6), (3, None)])
def test_step_decisions_keep_the_epoch_end_samples(every, window):
    """A step decision reads the `window` steps before it (every step since the last one when
    window=None); the epoch end still reads the epoch's last `window` steps (every step when
    None), also when a step decision falls on the epoch's last step or inside its window."""
    gen = torch.Generator().manual_seed(20)
    layer = make_layer()
    steps = 10
    # Batch sizes 1..steps: the sample counts tell which steps were read.
    batches = [scripted_batch(layer, g + 1, gen) for g in range(2 * steps)]
    ctrl = RollingQ(layer, max_rotations=0, window=window, every_n_steps=every, logger=lambda r: None)
    step_recs, epoch_recs, last_step_decision = [], [], 0
    for epoch in range(2):
        ctrl.begin_epoch(steps)
        for s in range(steps):
            g = epoch * steps + s
            if ctrl.collecting:
                feed(ctrl, layer, [batches[g]])
            rec = ctrl.step()
            if rec is not None:
                # Capped by the previous step decision, which reset the step accumulator.
                lo = last_step_decision if window is None else max(last_step_decision, g + 1 - window)
                step_recs.append((rec["layers"][0], batches[lo:g + 1]))
                last_step_decision = g + 1
        lo = epoch * steps if window is None else (epoch + 1) * steps - window
        epoch_recs.append((ctrl.epoch_end()["layers"][0], batches[lo:(epoch + 1) * steps]))
    assert len(step_recs) == 2 * steps // every and len(epoch_recs) == 2
    for rec, seen in step_recs + epoch_recs:
        _same_record(rec, _decision_from(make_layer(), seen))


def test_state_dict_keeps_both_accumulators_and_loads_older_states():
    gen = torch.Generator().manual_seed(21)
    layer = make_layer()
    ctrl = RollingQ(layer, max_rotations=0, window=3, every_n_steps=5, logger=lambda r: None)
    ctrl.begin_epoch(6)
    for _ in range(4):  # steps 1..4: step window from step 3, epoch window from step 4
        if ctrl.collecting:
            feed(ctrl, layer, [scripted_batch(layer, 2, gen)])
        ctrl.step()
    state = ctrl.state_dict()
    assert int(state["sums"][0]["samples"]) == 2 and int(state["step_sums"][0]["samples"]) == 4
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    layer2 = make_layer()
    ctrl2 = RollingQ(layer2, max_rotations=0, window=3, every_n_steps=5, logger=lambda r: None)
    ctrl2.load_state_dict(loaded)
    for key in ("sums", "step_sums"):
        assert all(torch.equal(ctrl.state_dict()[key][0][k], ctrl2.state_dict()[key][0][k])
                   for k in state[key][0]), key
    # The next step decides from the step accumulator on both.
    q, st = scripted_batch(layer, 2, gen)
    for c, lay in ((ctrl, layer), (ctrl2, layer2)):
        c.observe(lay, q, st)
        assert c.step()["layers"][0]["samples"] == 6
    # A state written before the step accumulator existed: its sums are the epoch accumulator.
    old = {k: v for k, v in loaded.items() if k != "step_sums"}
    ctrl3 = RollingQ(make_layer(), max_rotations=0, window=3, every_n_steps=5, logger=lambda r: None)
    ctrl3.load_state_dict(old)
    assert int(ctrl3.state_dict()["sums"][0]["samples"]) == 2 and ctrl3.state_dict()["step_sums"] == [None]
    bad = dict(loaded, step_sums=[{k: v[..., :1] for k, v in loaded["step_sums"][0].items()}])
    with pytest.raises(ValueError, match="step_sums"):
        ctrl3.load_state_dict(bad)


def test_full_pass_leaves_the_step_accumulator_alone():
    torch.manual_seed(22)
    layer = make_layer(H=2, D=8)
    model = _Fusion(layer).train()
    ctrl = RollingQ(layer, window=2, every_n_steps=3, max_rotations=0, logger=lambda r: None)
    ctrl.begin_epoch(100)
    ids = torch.tensor([0, 0, 1, 1, 1])
    loader = [(torch.randn(3, 6, 16), ids) for _ in range(2)]
    ctrl.step()
    ctrl.step()  # step 3, the decision's, is in the step window
    model(loader[0])
    ctrl.full_pass(model, loader, lambda m, b: m(b))
    assert ctrl.step()["layers"][0]["samples"] == 3  # the training batch only
    assert ctrl.epoch_end()["layers"][0]["samples"] == 6  # the full pass only


def test_unknown_epoch_length_collects_every_step_for_the_epoch_end():
    gen = torch.Generator().manual_seed(23)
    layer = make_layer()
    ctrl = RollingQ(layer, window=2, every_n_steps=4, max_rotations=0, logger=lambda r: None)
    ctrl.begin_epoch(None)
    step_samples = []
    for _ in range(6):
        assert ctrl.collecting
        feed(ctrl, layer, [scripted_batch(layer, 2, gen)])
        rec = ctrl.step()
        if rec is not None:
            step_samples.append(rec["layers"][0]["samples"])
    assert step_samples == [4] and ctrl.epoch_end()["layers"][0]["samples"] == 12
    # Never beginning an epoch, with step decisions only: statistics on their windows alone (no
    # epoch accumulator filled for an epoch_end that never comes); kept across state_dict.
    ctrl = RollingQ(layer, window=2, every_n_steps=4, max_rotations=0, logger=lambda r: None)
    flags = []
    for _ in range(8):
        flags.append(ctrl.collecting)
        ctrl.step()
    assert flags == [False, False, True, True] * 2
    again = RollingQ(layer, window=2, every_n_steps=4, max_rotations=0, logger=lambda r: None)
    again.load_state_dict(ctrl.state_dict())
    assert not again.collecting and (again.step(), again.step(), again.collecting)[2]


def test_a_head_rotated_by_one_decision_does_not_rotate_from_the_other_accumulators_older_samples():
    """The step decision at step 4 rotates; the epoch accumulator holds the same steps' queries as
    they were before that rotation, so epoch_end must not rotate from them again (with a budget
    left it did: the same turn twice). Samples summed after the rotation rotate as before."""
    gen = torch.Generator().manual_seed(31)
    layer = make_layer(H=2)
    records = []
    ctrl = RollingQ(layer, window=2, every_n_steps=4, max_rotations=3, logger=records.append)
    ctrl.begin_epoch(4)
    for _ in range(4):
        if ctrl.collecting:
            feed(ctrl, layer, [scripted_batch(layer, 3, gen)])
        ctrl.step()
    assert records[-1]["layers"][0]["rotated_heads"] == [True, True]
    after_step = layer.rotation.clone()
    rec = ctrl.epoch_end()["layers"][0]
    assert rec["samples"] == 6 and rec["stale_heads"] == [True, True]
    assert not rec["rotated"] and rec["head_rotations"] == [1, 1]
    assert torch.equal(layer.rotation, after_step)
    # epoch_end reset the epoch accumulator: new samples decide again.
    feed(ctrl, layer, [scripted_batch(layer, 3, gen)])
    rec = ctrl.epoch_end()["layers"][0]
    assert rec["stale_heads"] == [False, False] and rec["rotated_heads"] == [True, True]
    assert rec["head_rotations"] == [2, 2]


def test_a_modality_whose_mean_key_is_zero_gives_no_target():
    gen = torch.Generator().manual_seed(32)
    layer = make_layer(H=2)
    ctrl = RollingQ(layer, max_rotations=1, logger=lambda r: None)
    q, st = scripted_batch(layer, 4, gen)
    st.key_sum[:, :, 1] = 0  # modality 1 present, its keys' sum exactly zero
    feed(ctrl, layer, [(q, st)])
    rec = ctrl.epoch_end()["layers"][0]
    assert not rec["rotated"] and rec["head_rotations"] == [0, 0]
    assert torch.equal(layer.rotation, torch.eye(8).expand(2, 8, 8))


def test_a_state_saved_before_stale_heads_were_tracked_loads():
    gen = torch.Generator().manual_seed(33)
    layer = make_layer(H=2)
    ctrl = RollingQ(layer, max_rotations=1, logger=lambda r: None)
    feed(ctrl, layer, [scripted_batch(layer, 4, gen)])
    state = ctrl.state_dict()
    state["sums"] = [{k: v for k, v in state["sums"][0].items() if k != "stale"}]
    layer2 = make_layer(H=2)
    ctrl2 = RollingQ(layer2, max_rotations=1, logger=lambda r: None)
    ctrl2.load_state_dict(state)
    heads = [c.epoch_end()["layers"][0]["rotated_heads"] for c in (ctrl, ctrl2)]
    assert heads == [[True, True], [True, True]]
