"""What the autotuners key on and choose among: lengths by power-of-two bucket, so that training on
lengths that vary from batch to batch does not re-time every config at each new length; and one
fixed config per launch under torch.use_deterministic_algorithms, so that runs repeat bit for bit."""
import os
import sys

import pytest
import torch

from rollingq.kernels.common import tune_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def autotuned_launches(lq, lk, causal=False, head_dim=64, heads=4, kv_heads=2, dropout=0.0, dtype=torch.float16,
                       mask=None):
    """(autotuner, positional arguments by name, keyword arguments) of each autotuned launch of one
    forward and backward, recorded from the launchers on CPU tensors (bench/launches.py)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from launches import _problem, record
    finally:
        sys.path.pop(0)
    import triton

    p = _problem("keys", 2, heads, kv_heads, lq, lk, head_dim, causal, 3, per_batch=True, rotate_rows=5,
                 dropout=dropout, mask=mask)
    return [(launch.kernel, dict(zip(launch.kernel.arg_names, launch.args)), launch.kwargs)
            for launch in record(p, dtype) if isinstance(launch.kernel, triton.runtime.autotuner.Autotuner)]


def autotune_keys(lq, lk, causal=False, head_dim=64, heads=4, kv_heads=2, dropout=0.0, mask=None):
    """{kernel name: the key its autotuner would look up}, computed from the recorded launch
    arguments as `triton.runtime.autotuner.Autotuner.run` computes it."""
    keys = {}
    for at, named, kwargs in autotuned_launches(lq, lk, causal, head_dim, heads, kv_heads, dropout, mask=mask):
        args = dict(named, **kwargs)
        assert all(name in args for name in at.keys), f"{at.base_fn.__name__}: a key argument is not passed"
        key = [args[name] for name in at.keys] + [str(a.dtype) for a in args.values() if hasattr(a, "dtype")]
        keys[at.base_fn.__name__] = tuple(key)
    assert set(keys) == {"_rollingq_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    return keys


def test_tune_length_buckets():
    assert [tune_length(n) for n in (1, 15, 16, 17, 907, 1024, 1025, 8192)] == [16, 16, 16, 32, 1024, 1024,
                                                                                 2048, 8192]


@pytest.mark.parametrize("causal", [False, True])
def test_lengths_in_one_bucket_share_the_tuning(causal):
    a = autotune_keys(600, 600 if causal else 700, causal)
    b = autotune_keys(907, 907 if causal else 1000, causal)
    c = autotune_keys(1100, 1100 if causal else 1000, causal)
    assert a == b
    for name in a:
        assert a[name] != c[name], name


def test_forward_key_holds_the_descriptor_choice(monkeypatch):
    """The forward's pruner offers other configs with descriptor loads (e.g. D128 BN128): a launch
    without them must not reuse a choice made among those."""
    from rollingq.kernels import attention_fwd

    monkeypatch.setattr(attention_fwd, "USE_TMA", True)
    with_tma = autotune_keys(256, 256, head_dim=128)["_rollingq_fwd_kernel"]
    monkeypatch.setattr(attention_fwd, "USE_TMA", False)
    without = autotune_keys(256, 256, head_dim=128)["_rollingq_fwd_kernel"]
    assert with_tma != without


@pytest.mark.parametrize("head_dim", [64, 768])
def test_deterministic_mode_fixes_one_config(head_dim):
    """Among the configs a GPU would time (the full tables, planned for sm_90), the pruners keep
    several; launched under torch.use_deterministic_algorithms(True) exactly one, the class list's
    first. The mode is part of the autotune key, so a choice timed before it was set is not reused."""
    from rollingq.kernels import attention_bwd, attention_fwd
    from rollingq.kernels.common import planning_for

    every = {"_rollingq_fwd_kernel": attention_fwd._table_configs(),
             "_bwd_dkdv_kernel": attention_bwd.table_configs(attention_bwd._DKDV_TABLE),
             "_bwd_dq_kernel": attention_bwd.table_configs(attention_bwd._DQ_TABLE, attention_bwd._DQ_WIDE)}

    def pruned():
        return {at.base_fn.__name__: at.early_config_prune(every[at.base_fn.__name__], named, **kwargs)
                for at, named, kwargs in autotuned_launches(907, 907, head_dim=head_dim)}

    was = torch.are_deterministic_algorithms_enabled()
    with planning_for(90):
        free, free_keys = pruned(), autotune_keys(907, 907, head_dim=head_dim)
        torch.use_deterministic_algorithms(True)
        try:
            fixed, fixed_keys = pruned(), autotune_keys(907, 907, head_dim=head_dim)
        finally:
            torch.use_deterministic_algorithms(was)
    assert all(len(c) > 1 for c in free.values()), {k: len(c) for k, c in free.items()}
    for name, chosen in fixed.items():
        assert len(chosen) == 1 and chosen[0] in free[name], name
        assert not chosen[0].kwargs.get("WIDE"), name
        assert free_keys[name] != fixed_keys[name], name
    fwd_class = ("16bit", 64) if head_dim == 64 else ("16bit", "split")
    row = attention_fwd.FWD_CONFIGS_BY_ARCH[90][fwd_class][0]
    c = fixed["_rollingq_fwd_kernel"][0]
    assert (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) == row


def _every_config():
    from rollingq.kernels import attention_bwd, attention_fwd

    return {"_rollingq_fwd_kernel": attention_fwd._table_configs(),
            "_bwd_dkdv_kernel": attention_bwd.table_configs(attention_bwd._DKDV_TABLE),
            "_bwd_dq_kernel": attention_bwd.table_configs(attention_bwd._DQ_TABLE, attention_bwd._DQ_WIDE)}


@pytest.mark.parametrize("head_dim", [128, 256, 768])
def test_dropout_launches_skip_the_rows_that_spill_with_it(head_dim):
    """Dropout is in every key, and its launches are offered the class lists less the rows that
    spill registers with the Philox draw in the loop (sm_90, 16-bit: bench/inspect_kernels.py
    --only dropout), also when deterministic mode keeps one row."""
    from rollingq.kernels import attention_bwd, attention_fwd
    from rollingq.kernels.common import planning_for

    split = head_dim > 256
    fwd_cls = attention_fwd._d_class(head_dim, split, False)
    bwd_cls = "split" if split else head_dim
    spills = {"_rollingq_fwd_kernel": set(attention_fwd.FWD_DROPOUT_SPILLS[90].get(fwd_cls, [])
                                          + attention_fwd.FWD_DROPOUT_SPILLS[90].get(fwd_cls + ("tma",), [])),
              "_bwd_dkdv_kernel": set(attention_bwd._DKDV_DROPOUT_SPILLS[90].get(bwd_cls, [])),
              "_bwd_dq_kernel": set(attention_bwd._DQ_DROPOUT_SPILLS[90].get(bwd_cls, []))}
    every = _every_config()

    def pruned(dropout):
        return {at.base_fn.__name__: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                                      for c in at.early_config_prune(every[at.base_fn.__name__], named, **kwargs)]
                for at, named, kwargs in autotuned_launches(907, 907, head_dim=head_dim, dropout=dropout)}

    was = torch.are_deterministic_algorithms_enabled()
    with planning_for(90):
        plain, dropped = pruned(0.0), pruned(0.1)
        plain_keys, dropped_keys = autotune_keys(907, 907, head_dim=head_dim), \
            autotune_keys(907, 907, head_dim=head_dim, dropout=0.1)
        torch.use_deterministic_algorithms(True)
        try:
            fixed = pruned(0.1)
        finally:
            torch.use_deterministic_algorithms(was)
    excluded = 0
    for name in plain:
        assert plain_keys[name] != dropped_keys[name], name
        assert dropped[name] and dropped[name] == [r for r in plain[name] if r not in spills[name]], name
        excluded += len(set(plain[name]) - set(dropped[name]))
        assert len(fixed[name]) == 1 and fixed[name][0] in dropped[name], name
    assert excluded > 0  # each of these head dims has a row that spills with dropout


@pytest.mark.parametrize("arch, head_dim, dtype, kernel, row", [
    (80, 128, torch.float16, "_rollingq_fwd_kernel", (64, 16, 8, 2)),
    (90, 768, torch.float32, "_bwd_dkdv_kernel", (16, 16, 4, 2)),
    (80, 256, torch.float32, "_bwd_dkdv_kernel", (16, 16, 4, 2)),
])
def test_dropout_stand_in_rows(arch, head_dim, dtype, kernel, row):
    """Where dropout's draw spills every row of a class (sm_80's D128 forward, fp32's split dK/dV),
    dropout launches get the class's stand-in row, and only that."""
    from rollingq.kernels.common import planning_for

    every = _every_config()
    with planning_for(arch):
        for at, named, kwargs in autotuned_launches(907, 907, head_dim=head_dim, dropout=0.1, dtype=dtype):
            if at.base_fn.__name__ == kernel:
                chosen = at.early_config_prune(every[kernel], named, **kwargs)
                assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in chosen] == [row]
                return
    raise AssertionError(f"no {kernel} launch")


def _pruned_rows(every, mask, dropout=0.0, head_dim=64, dtype=torch.float16):
    return {at.base_fn.__name__: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                                  for c in at.early_config_prune(every[at.base_fn.__name__], named, **kwargs)
                                  if not c.kwargs.get("WIDE")]
            for at, named, kwargs in autotuned_launches(907, 907, head_dim=head_dim, dropout=dropout, dtype=dtype,
                                                        mask=mask)}


@pytest.mark.parametrize("head_dim", [64, 128, 256, 768])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_mask_launches_skip_the_rows_that_spill_with_it(head_dim, kind):
    """The mask (either kind) is in every key, and its launches are offered the class lists less
    the rows that spill with a mask tile in the loop (sm_90, 16-bit: bench/inspect_kernels.py
    --only mask)."""
    from rollingq.kernels import attention_bwd, attention_fwd
    from rollingq.kernels.common import planning_for

    split = head_dim > 256
    fwd_cls = attention_fwd._d_class(head_dim, split, False)
    bwd_cls = "split" if split else head_dim
    masks = {"_rollingq_fwd_kernel": attention_fwd.FWD_MASK_SPILLS[90],
             "_bwd_dkdv_kernel": attention_bwd._DKDV_SPILLS["mask"][90],
             "_bwd_dq_kernel": attention_bwd._DQ_SPILLS["mask"][90]}
    spills = {name: set(t.get(bwd_cls, [])) for name, t in masks.items()}
    # the forward's class and its descriptor-only ("tma") rows
    spills["_rollingq_fwd_kernel"] = set(masks["_rollingq_fwd_kernel"].get(fwd_cls, [])
                                         + masks["_rollingq_fwd_kernel"].get(fwd_cls + ("tma",), []))
    every = _every_config()
    with planning_for(90):
        plain, masked = _pruned_rows(every, None, head_dim=head_dim), _pruned_rows(every, kind, head_dim=head_dim)
        plain_keys, mask_keys = autotune_keys(907, 907, head_dim=head_dim), \
            autotune_keys(907, 907, head_dim=head_dim, mask=kind)
    for name in plain:
        assert plain_keys[name] != mask_keys[name], name
        assert masked[name] and masked[name] == [r for r in plain[name] if r not in spills[name]], name
    assert sum(len(set(plain[n]) - set(masked[n])) for n in plain) > 0  # each has a row that spills with a mask
    with planning_for(90):
        assert autotune_keys(907, 907, mask="bool") != autotune_keys(907, 907, mask="float")


@pytest.mark.parametrize("arch, head_dim, dtype, dropout, kind, kernel, rows", [
    (90, 128, torch.float32, 0.1, "bool", "_rollingq_fwd_kernel", [(32, 16, 8, 1)]),
    (80, 256, torch.float32, 0.0, "bool", "_bwd_dkdv_kernel", [(16, 16, 8, 2)]),
    (80, 768, torch.float32, 0.1, "bool", "_bwd_dq_kernel", [(16, 16, 8, 2), (16, 16, 8, 1)]),
    # a float mask with dropout ("bias+dropout"), with its gradient ("learned")
    (90, 128, torch.float16, 0.1, "learned", "_rollingq_fwd_kernel", [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 3)]),
    (80, 64, torch.float16, 0.1, "float", "_rollingq_fwd_kernel", [(64, 32, 8, 2), (128, 16, 8, 2)]),
    (80, 128, torch.float32, 0.1, "float", "_bwd_dkdv_kernel", [(16, 32, 4, 2), (16, 16, 8, 2)]),
    (80, 768, torch.float16, 0.1, "learned", "_bwd_dq_kernel", [(32, 16, 8, 2), (32, 16, 4, 2)]),
])
def test_mask_stand_in_rows(arch, head_dim, dtype, dropout, kind, kernel, rows):
    """Where a mask (with dropout) spills every row of a class, those launches get the stand-in rows."""
    from rollingq.kernels.common import planning_for

    with planning_for(arch):
        got = _pruned_rows(_every_config(), kind, dropout, head_dim, dtype)[kernel]
    assert sorted(got) == sorted(rows)


@pytest.mark.parametrize("head_dim", [64, 128, 768])
def test_learned_bias_launches_skip_the_rows_that_spill_with_its_gradient(head_dim):
    """A bias that requires grad changes only dQ (which stores its gradient): dQ's key differs from
    the float mask's, and its rows are the float mask's less those that spill storing ds (sm_90)."""
    from rollingq.kernels import attention_bwd
    from rollingq.kernels.common import planning_for

    every = _every_config()
    with planning_for(90):
        float_keys, learned_keys = (autotune_keys(907, 907, head_dim=head_dim, mask=kind) for kind in ("float", "learned"))
        by_float, learned = (_pruned_rows(every, kind, head_dim=head_dim) for kind in ("float", "learned"))
    assert {n for n in float_keys if float_keys[n] != learned_keys[n]} == {"_bwd_dq_kernel"}
    spills = attention_bwd._DQ_SPILLS["mask_grad"][90]["split" if head_dim > 256 else head_dim]
    assert learned["_bwd_dq_kernel"] == [r for r in by_float["_bwd_dq_kernel"] if r not in spills]
    assert learned["_bwd_dq_kernel"] != by_float["_bwd_dq_kernel"]
    assert learned["_rollingq_fwd_kernel"] == by_float["_rollingq_fwd_kernel"]


def test_wide_rows_that_spill_are_left_out():
    """dQ's wide-split rows go through the spill tables too ("wide"): a learned bias with dropout
    spills the 64 x 64 wide tile (sm_90)."""
    from rollingq.kernels.common import planning_for

    every = _every_config()

    def wide_rows(mask, dropout):
        for at, named, kwargs in autotuned_launches(907, 907, head_dim=768, dropout=dropout, mask=mask):
            if at.base_fn.__name__ == "_bwd_dq_kernel":
                return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                        for c in at.early_config_prune(every["_bwd_dq_kernel"], named, **kwargs) if c.kwargs["WIDE"]}

    with planning_for(90):
        plain, learned = wide_rows(None, 0.0), wide_rows("learned", 0.1)
    assert (64, 64, 8, 2) in plain and learned == plain - {(64, 64, 8, 2)}


@pytest.mark.parametrize("cap, shared, plan", [
    ((9, 0), 227 * 1024, 90),   # H100 / H200
    ((10, 0), 227 * 1024, 90),  # B200
    ((12, 0), 99 * 1024, 80),   # RTX 50xx: Hopper's tiles would not fit its shared memory
    ((8, 0), 163 * 1024, 80),   # A100
    ((8, 9), 99 * 1024, 80),    # RTX 40xx / L40S: the Ampere plan, each class with a row within 99 KB
    ((7, 5), 64 * 1024, None),  # T4: refused by name
])
def test_plan_follows_the_card(monkeypatch, cap, shared, plan):
    from types import SimpleNamespace

    from rollingq.kernels import common

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter plans for Hopper whatever card is here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "a fake card")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i=None: SimpleNamespace(shared_memory_per_block_optin=shared))
    common._device_plan.cache_clear()
    try:
        if plan is None:
            with pytest.raises(NotImplementedError, match=r"compute capability 8.0 or newer.*a fake card\) is 7.5"):
                common.target_arch()
        else:
            assert common.target_arch() == plan
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors through the interpreter run on any machine
        assert common.target_arch() == 90
    finally:
        common._device_plan.cache_clear()


def test_a_pick_is_reused_only_on_its_kind_of_card(monkeypatch):
    """Triton's autotune key holds the arguments, not the device: in a process with an A100 and an
    RTX 4090 (one plan, 163 KB and 99 KB of shared memory) a tile timed on the first must not be
    launched on the second. Two cards of one kind share their picks."""
    from types import SimpleNamespace

    from rollingq.kernels import common

    cards = [((8, 0), "NVIDIA A100-SXM4-80GB", 163 * 1024, 108), ((8, 9), "NVIDIA GeForce RTX 4090", 99 * 1024, 128),
             ((8, 0), "NVIDIA A100-SXM4-80GB", 163 * 1024, 108)]
    current = [0]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cards[current[0] if i is None else i][0])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=None: SimpleNamespace(
        name=cards[i][1], major=cards[i][0][0], minor=cards[i][0][1], shared_memory_per_block_optin=cards[i][2],
        multi_processor_count=cards[i][3]))
    common._device_kind.cache_clear()
    common._device_plan.cache_clear()
    try:
        keys = []
        for index in range(3):
            current[0] = index
            keys.append(autotune_keys(256, 256))
        for name in keys[0]:
            assert keys[0][name] != keys[1][name], name
            assert keys[0][name] == keys[2][name], name
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert common.tune_device() == 0
    finally:
        common._device_kind.cache_clear()
        common._device_plan.cache_clear()
