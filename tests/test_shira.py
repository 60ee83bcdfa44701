import copy
import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from neodragon.adapters.shira import (
    DIT_TARGETS,
    STRATEGIES,
    MaskSpec,
    ShiraAdapter,
    ShiraLayer,
    add_shira,
    build_shira,
    calibration_gradients,
    find_targets,
    fuse_adapters,
    get_shira,
    orthogonality,
    overlap_stats,
    remove_shira,
    top_k_indices,
)
from neodragon.models.mmdit import PyramidMMDiT

TARGETS = ["lin", "twin_a", "twin_b", "conv1", "conv2", "conv3"]


class TinyNet(nn.Module):
    """Linear and Conv1d/2d/3d layers, two of them the same shape (their masks must differ)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 20)
        self.twin_a, self.twin_b = nn.Linear(20, 16), nn.Linear(20, 16)
        self.conv1 = nn.Conv1d(4, 6, 3)
        self.conv2 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv3 = nn.Conv3d(2, 3, (1, 3, 3))
        self.norm = nn.LayerNorm(16)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.lin(batch["lin"])
        outs = [self.norm(self.twin_a(h) + self.twin_b(h.tanh())), self.conv1(batch["c1"]), self.conv2(batch["c2"]),
                self.conv3(batch["c3"])]
        return torch.cat([o.flatten(1) for o in outs], dim=1)


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def net_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lin": torch.randn(3, 12, generator=g), "c1": torch.randn(3, 4, 10, generator=g),
            "c2": torch.randn(3, 3, 6, 6, generator=g), "c3": torch.randn(3, 2, 2, 5, 5, generator=g)}


def loss_fn(model, batch):
    return model(batch).pow(2).mean()


def tiny_dit(seed: int = 0, **overrides) -> PyramidMMDiT:
    torch.manual_seed(seed)
    config = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, pooled_projection_dim=24,
                  caption_projection_dim=32, joint_attention_dim=32, sample_size=16, pos_embed_max_size=32)
    return PyramidMMDiT(**{**config, **overrides}).eval()


def dit_inputs(seed: int = 0, batch: int = 2) -> dict:
    """Inputs of ``tiny_dit``: one 8x8 clip, 6 text tokens (the second sample's last two padded)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[1:, 4:] = 0
    return dict(sample=[[torch.randn(batch, 4, 1, 8, 8, generator=g)]], encoder_attention_mask=mask,
                encoder_hidden_states=torch.randn(batch, 6, 32, generator=g),
                pooled_projections=torch.randn(batch, 24, generator=g), timestep_ratio=torch.full((batch,), 500.0))


def randomized(adapter: ShiraAdapter, seed: int = 0) -> ShiraAdapter:
    g = torch.Generator().manual_seed(seed)
    values = {n: torch.randn(v.shape, generator=g) * 0.1 for n, v in adapter.values.items()}
    return ShiraAdapter(adapter.indices, values, adapter.shapes, adapter.metadata)


def build(model, strategy, seed=0, **budget):
    spec = MaskSpec(target_modules=TARGETS, strategy=strategy, seed=seed, **(budget or {"density": 0.05}))
    calib = dict(loss_fn=loss_fn, batches=[net_batch(1), net_batch(2)]) if strategy in ("grad", "snip") else {}
    return spec, build_shira(model, spec, **calib)


# ---------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("budget", [{"density": 0.05}, {"r": 1}])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_masks_meet_budget_exactly_and_are_deterministic(strategy, budget):
    model = tiny_net()
    spec, adapter = build(model, strategy, **budget)
    assert sorted(adapter.indices) == sorted(TARGETS)
    for name, idx in adapter.indices.items():
        shape = tuple(model.get_submodule(name).weight.shape)
        out, fan_in = shape[0], math.prod(shape[1:])
        expected = budget["r"] * (out + fan_in) if "r" in budget else round(0.05 * out * fan_in)
        assert idx.numel() == spec.budget(shape) == expected
        assert idx.dtype == torch.long and bool((idx[1:] > idx[:-1]).all()) and int(idx[-1]) < out * fan_in
        assert adapter.shapes[name] == shape and not adapter.values[name].any()
    _, again = build(model, strategy, **budget)
    assert all(torch.equal(again.indices[n], adapter.indices[n]) for n in TARGETS)
    # same-shaped layers do not share one mask
    assert not torch.equal(adapter.indices["twin_a"], adapter.indices["twin_b"])
    if strategy in ("random", "struct"):
        _, other_seed = build(model, strategy, seed=1, **budget)
        assert any(not torch.equal(other_seed.indices[n], adapter.indices[n]) for n in TARGETS)


def test_struct_mask_is_diagonal_plus_spread_lines():
    layer = nn.Linear(32, 32)
    for axis in ("rows", "cols"):
        spec = MaskSpec(target_modules=["0"], strategy="struct", density=0.2, struct_axis=axis, seed=3)
        idx = build_shira(nn.Sequential(layer), spec).indices["0"]
        mask = torch.zeros(32 * 32, dtype=torch.bool)
        mask[idx] = True
        mask = mask.view(32, 32) if axis == "rows" else mask.view(32, 32).T
        assert mask.diagonal().all()
        off_diagonal = mask & ~torch.eye(32, dtype=torch.bool)
        line_counts = off_diagonal.sum(1)
        full = (line_counts == 31).nonzero().squeeze(1)
        assert len(full) >= 5 and len(set(torch.diff(full).tolist())) == 1  # an even stride
        assert int(((line_counts > 0) & (line_counts < 31)).sum()) <= 1  # one partial line meets the budget


def test_struct_for_conv_and_wide_layers_keeps_budget():
    for layer in (nn.Linear(64, 8), nn.Linear(8, 64), nn.Conv2d(3, 4, 3)):
        spec = MaskSpec(target_modules=["0"], strategy="struct", density=0.3)
        assert build_shira(nn.Sequential(layer), spec).indices["0"].numel() == spec.budget(layer.weight.shape)


def test_score_masks_pick_the_top_scores():
    model = tiny_net()
    _, wm = build(model, "wm")
    weight = model.twin_a.weight.detach()
    k = wm.indices["twin_a"].numel()
    assert torch.equal(wm.indices["twin_a"], weight.abs().flatten().topk(k).indices.sort().values)

    batches = [net_batch(1), net_batch(2)]
    manual = torch.zeros_like(weight)
    for batch in batches:
        grad, = torch.autograd.grad(loss_fn(model, batch), model.twin_a.weight)
        manual += grad.abs()
    _, grad_mask = build(model, "grad")
    _, snip_mask = build(model, "snip")
    assert torch.equal(grad_mask.indices["twin_a"], manual.flatten().topk(k).indices.sort().values)
    assert torch.equal(snip_mask.indices["twin_a"], (manual * weight.abs()).flatten().topk(k).indices.sort().values)


def test_calibration_leaves_the_model_untouched():
    model = tiny_net()
    model.lin.weight.requires_grad_(False)
    sums = calibration_gradients(model, find_targets(model, ["twin_a", "lin"]), loss_fn, [net_batch(1)])
    assert sums["twin_a"].abs().sum() > 0 and sums["lin"].abs().sum() > 0
    assert not model.lin.weight.requires_grad and model.twin_b.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_ties_go_to_the_lowest_indices():
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    assert top_k_indices(scores, 3).tolist() == [1, 2, 3]


def test_exclude_gives_non_overlapping_adapters():
    model = tiny_net()
    _, first = build(model, "wm")
    second = build_shira(model, MaskSpec(target_modules=TARGETS, strategy="wm", density=0.05), exclude=first)
    for name in TARGETS:
        assert not torch.isin(second.indices[name], first.indices[name]).any()
        assert second.indices[name].numel() == first.indices[name].numel()
    taken = build_shira(model, MaskSpec(target_modules=["lin"], density=0.6))
    with pytest.raises(ValueError, match="lower the budget"):
        build_shira(model, MaskSpec(target_modules=["lin"], density=0.6), exclude=taken)


# ---------------------------------------------------------------------------------------------- training


def test_gradients_reach_only_the_sparse_values():
    model = tiny_dit()
    inputs = dit_inputs()
    adapter = build_shira(model, MaskSpec(strategy="random", density=0.02))
    assert len(adapter.indices) == 21  # (8 attention + 4 feed-forward) + (7 + 2) in the last block
    original = copy.deepcopy(model.state_dict())
    add_shira(model, adapter)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.values" for n in adapter.indices}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        model(**inputs)[0].pow(2).mean().backward()
        assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())
        optimizer.step()
        optimizer.zero_grad()
    trained = remove_shira(model, merge=True)
    unused = {"transformer_blocks.1.attn.add_q_proj"}  # the last block discards its text queries
    assert all(bool(trained.values[n].any()) != (n in unused) for n in trained.indices)
    for key, value in model.state_dict().items():
        changed = (value != original[key]).flatten().nonzero().squeeze(1)
        name = key.removesuffix(".weight")
        if name in trained.indices:
            assert torch.isin(changed, trained.indices[name]).all()  # only masked entries moved
        else:
            assert changed.numel() == 0, key


def test_conv_layers_train_and_unwrap():
    model = tiny_net()
    batch = net_batch()
    before = model(batch)
    _, adapter = build(model, "random")
    layers = add_shira(model, randomized(adapter))
    assert isinstance(model.conv3, ShiraLayer) and set(layers) == set(TARGETS)
    out = model(batch)
    out.sum().backward()
    assert model.conv3.values.grad is not None and model.conv3.base_layer.weight.grad is None
    assert not torch.allclose(out, before)
    got = get_shira(model, {"note": "x"})
    assert got.metadata == {"note": "x"} and torch.equal(got.values["conv2"], randomized(adapter).values["conv2"])
    remove_shira(model)
    assert isinstance(model.conv3, nn.Conv3d)
    assert torch.equal(model(batch), before)


# ---------------------------------------------------------------------------------------------- files, PEFT


def test_save_load_round_trip_is_small(tmp_path):
    model = tiny_net()
    _, adapter = build(model, "snip")
    adapter = randomized(adapter)
    path = adapter.save(tmp_path / "a.safetensors")
    loaded = ShiraAdapter.load(path)
    assert loaded.metadata == adapter.metadata and loaded.shapes == adapter.shapes
    for name in TARGETS:
        assert torch.equal(loaded.indices[name], adapter.indices[name])
        assert torch.equal(loaded.values[name], adapter.values[name])
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size - header == 8 * adapter.num_params  # int32 index + float32 value per entry
    assert not list(tmp_path.glob(".*"))  # atomic write left no temporary file
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file's permissions, not mkstemp's 0600
    half = ShiraAdapter.load(adapter.save(tmp_path / "half.safetensors", dtype=torch.float16))
    for name in TARGETS:
        assert half.values[name].dtype == torch.float16
        torch.testing.assert_close(half.values[name].float(), adapter.values[name], rtol=1e-3, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # raised inside PEFT's SHiRA layer
def test_peft_interop_both_ways_identical_outputs(tmp_path):
    from peft import PeftModel, ShiraConfig, get_peft_model

    inputs = dit_inputs()
    # ours -> PEFT
    model = tiny_dit()
    masks = build_shira(model, MaskSpec(strategy="snip", r=1), loss_fn=lambda m, b: m(**b)[0].pow(2).mean(),
                        batches=[dit_inputs(5)])
    adapter = randomized(masks)
    add_shira(model, adapter, trainable=False)
    with torch.no_grad():
        ours = model(**inputs)[0]
    adapter.to_peft(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SHIRA" and config["r"] == 1
    peft_model = PeftModel.from_pretrained(tiny_dit(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(peft_model(**inputs)[0], ours)
    # PEFT -> ours
    base = tiny_dit()
    peft_model = get_peft_model(tiny_dit(), ShiraConfig(r=2, target_modules=DIT_TARGETS, init_weights=False,
                                                        random_seed=7))
    peft_model.save_pretrained(tmp_path / "trained")
    loaded = ShiraAdapter.from_peft(tmp_path / "trained", base)
    assert loaded.num_params == sum(p.numel() for n, p in peft_model.named_parameters() if "shira_weight" in n)
    add_shira(base, loaded, trainable=False)
    with torch.no_grad():
        assert torch.equal(base(**inputs)[0], peft_model(**inputs)[0])


# ---------------------------------------------------------------------------------------------- errors


def test_clear_errors_for_mismatched_adapters(tmp_path):
    model = tiny_dit()
    adapter = build_shira(model, MaskSpec(density=0.02))
    wider = tiny_dit(attention_head_dim=24)
    with pytest.raises(ValueError, match="different model configuration"):
        add_shira(wider, adapter)
    with pytest.raises(ValueError, match="does not have"):
        add_shira(tiny_net(), adapter)
    add_shira(model, adapter)
    with pytest.raises(TypeError, match="already wrapped"):
        add_shira(model, adapter)
    with pytest.raises(ValueError, match="matched no module"):
        build_shira(tiny_net(), MaskSpec(target_modules=["to_q"]))
    with pytest.raises(TypeError, match="Linear and nn.Conv1d/2d/3d only"):
        build_shira(tiny_net(), MaskSpec(target_modules=["norm", "lin"]))
    with pytest.raises(ValueError, match=r"MaskSpec\(r=...\)"):
        adapter.to_peft(tmp_path / "p")
    _, conv = build(tiny_net(), "random", r=1)
    with pytest.raises(ValueError, match="Linear only"):
        conv.to_peft(tmp_path / "p")
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a neodragon SHiRA adapter"):
        ShiraAdapter.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="budget"):
        MaskSpec(target_modules=["lin"], r=50).budget((20, 12))
    with pytest.raises(ValueError, match="not both"):
        MaskSpec(density=0.01, r=1)
    with pytest.raises(ValueError, match="calibration"):
        build_shira(tiny_net(), MaskSpec(target_modules=TARGETS, strategy="snip"))


# ---------------------------------------------------------------------------------------------- fusion


def test_fusion_is_the_weighted_sum_of_deltas():
    model = tiny_net()
    a = randomized(build(model, "random", seed=1)[1], seed=1)
    b = randomized(build(model, "random", seed=2)[1], seed=2)
    fused = fuse_adapters([a, b], [1.0, 0.5])
    for name in TARGETS:
        expected = a.delta(name).to_dense() + 0.5 * b.delta(name).to_dense()
        torch.testing.assert_close(fused.delta(name).to_dense(), expected, rtol=0, atol=1e-7)
    stats = overlap_stats(a, b, metrics=True)["twin_a"]
    union = fused.indices["twin_a"].numel()
    assert stats["shared"] == stats["nnz_a"] + stats["nnz_b"] - union
    assert stats["jaccard"] == pytest.approx(stats["shared"] / union)


def test_awom_awor_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    d1 = torch.randn(6, 5, generator=g) * (torch.rand(6, 5, generator=g) < 0.3)
    d2 = torch.randn(6, 5, generator=g) * (torch.rand(6, 5, generator=g) < 0.3)
    product = d1.T.double() @ d2.double()
    awom, awor = orthogonality(d1.to_sparse(), d2)
    assert awom == pytest.approx(torch.linalg.svdvals(product)[0].item())
    assert awor == pytest.approx(1 - int((product != 0).sum()) / 25)
    # disjoint row supports (SHiRA-Struct, Lemma 4.5) are exactly orthogonal: A1^T A2 = 0
    rows_1, rows_2 = torch.zeros(6, 5), torch.zeros(6, 5)
    rows_1[::2], rows_2[1::2] = 1.0, 2.0
    assert orthogonality(rows_1, rows_2) == (0.0, 1.0)
