import copy
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_shira import dit_inputs, tiny_dit
from torch import nn

from neodragon.adapters.foura import GATES, TRANSFORMS, FouraConfig, FouraConv2d, FouraLinear, frequency_basis
from neodragon.adapters.shira import DIT_TARGETS


def mlp(width: int = 24) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, width), nn.GELU(), nn.Linear(width, 8))


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(seed))


def foura(model: nn.Module, **kwargs) -> nn.Module:
    return get_peft_model(model, FouraConfig(**{"r": 4, "target_modules": ["0", "2"], "init_weights": False, **kwargs}))


@pytest.mark.parametrize("n", [7, 8])
@pytest.mark.parametrize("kind", TRANSFORMS)
def test_bases_are_orthonormal_transforms(kind, n):
    basis = frequency_basis(kind, n, dtype=torch.float64)
    torch.testing.assert_close(basis @ basis.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(n, dtype=torch.float64)
    if kind == "dct":
        k, i = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None, :]
        scale = torch.full((n, 1), math.sqrt(2 / n), dtype=torch.float64)
        scale[0] = math.sqrt(1 / n)
        expected = (scale * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))) @ x
    else:
        spectrum = torch.fft.rfft(x, norm="ortho")
        pairs = torch.stack([spectrum.real[1:(n + 1) // 2], spectrum.imag[1:(n + 1) // 2]], 1).flatten() * math.sqrt(2)
        expected = torch.cat([spectrum.real[:1], pairs, spectrum.real[n // 2:] if n % 2 == 0 else pairs[:0]])
    torch.testing.assert_close(basis @ x, expected, rtol=0, atol=1e-12)


def test_get_peft_model_wraps_linears_and_starts_as_a_no_op():
    x = tokens()
    base = mlp()(x)
    model = get_peft_model(mlp(), FouraConfig(r=4, target_modules=["0", "2"]))
    assert isinstance(model.base_model.model[0], FouraLinear)
    assert model.peft_config["default"].peft_type == "FOURA"
    assert torch.equal(model(x), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{i}.foura_{ab}.default" for i in (0, 2) for ab in "AB"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (16 + 24) + 4 * (24 + 8)


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("gate", ["none", "frozen"])
def test_merge_matches_unmerged_outputs(kind, gate):
    x = tokens()
    model = foura(mlp(), transform=kind, gate=gate, token_transform=True)
    if gate == "frozen":
        model.base_model.model[0].foura_mask["default"] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    unmerged = model(x)
    weight = model.base_model.model[0].base_layer.weight.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model[0].base_layer.weight, weight, rtol=0, atol=1e-6)
    plain = model.merge_and_unload()
    assert isinstance(plain[0], nn.Linear)
    torch.testing.assert_close(plain(x), unmerged, rtol=0, atol=1e-5)


def test_frozen_mask_removes_rank_components():
    x = tokens()
    masked = foura(mlp(), gate="frozen")
    dropped = copy.deepcopy(masked)
    masked.base_model.model[0].foura_mask["default"] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        dropped.base_model.model[0].foura_A["default"][1] = 0.0  # the same as switching component 1 off
    torch.testing.assert_close(masked(x), dropped(x), rtol=0, atol=1e-6)


def test_adaptive_gate_is_hard_trains_by_straight_through_and_stays_unmerged():
    x = tokens()
    model = foura(mlp(), gate="adaptive", token_transform=True)
    layer = model.base_model.model[0]
    plain = foura(mlp(), gate="none", token_transform=True)
    plain.load_state_dict(model.state_dict(), strict=False)  # the same A and B, no gate
    # all gates start on, so the output equals the ungated adapter (the token transforms cancel)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)
    # a gate driven to "off" removes its component exactly, in training and in eval
    with torch.no_grad():
        layer.foura_gate["default"][2].bias[1] = -5.0
        plain.base_model.model[0].foura_A["default"][1] = 0.0
    for mode in (model.train, model.eval):
        mode()
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-6)
    model.train()
    model(x).pow(2).mean().backward()
    gate_grads = [p.grad for n, p in model.named_parameters() if "foura_gate" in n and n.endswith("2.weight")]
    assert gate_grads and all(g is not None and g.abs().sum() > 0 for g in gate_grads)
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)
    with pytest.raises(ValueError, match="input-adaptive gate"):
        model.merge_adapter()
    assert not layer.merged


def test_gate_usage_and_freezing_make_the_adapter_mergeable(tmp_path):
    x = tokens()
    model = foura(mlp(), gate="adaptive")
    with torch.no_grad():
        model.base_model.model[2].foura_gate["default"][2].bias[3] = -5.0
    expected = model(x)
    with model.base_model.gate_usage() as usage:
        model(x)
    assert usage["2"].tolist() == [1.0, 1.0, 1.0, 0.0] and usage["0"].tolist() == [1.0] * 4
    model.base_model.freeze_gates("default", usage)
    layer = model.base_model.model[2]
    assert layer.gate_mode["default"] == "frozen" and "default" not in layer.foura_gate
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(mlp(), tmp_path)
    torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-6)
    model.merge_adapter()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("gate", GATES)
def test_save_load_round_trip(gate, tmp_path):
    x = tokens()
    model = foura(mlp(), gate=gate, transform="rfft")
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(mlp(), tmp_path)
    assert reloaded.peft_config["default"].gate == gate
    assert torch.equal(reloaded(x), model(x))


def test_composition_with_strengths(tmp_path):
    x = tokens()
    for name, seed in (("a", 1), ("b", 2)):
        single = foura(mlp())
        torch.manual_seed(seed)
        with torch.no_grad():
            for param in (p for p in single.parameters() if p.requires_grad):
                param.add_(torch.randn_like(param))
        single.save_pretrained(tmp_path / name)
    model = PeftModel.from_pretrained(mlp(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    model.base_model.set_adapter(["a", "b"])
    model.base_model.set_strengths({"a": 1.0, "b": 0.5})
    singles = {n: PeftModel.from_pretrained(mlp(), tmp_path / n).base_model.model[0] for n in "ab"}
    layer = model.base_model.model[0]
    branch = {n: singles[n].adapter_output("default", x) for n in "ab"}
    expected = layer.base_layer(x) + branch["a"] + 0.5 * branch["b"]
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    model.base_model.set_adapter("b")
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 0.5 * branch["b"], rtol=0, atol=1e-6)


def test_gradients_reach_only_adapter_params_on_the_dit():
    model = get_peft_model(tiny_dit(), FouraConfig(r=2, target_modules=DIT_TARGETS, gate="adaptive"))
    model(**dit_inputs())[0].pow(2).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".foura_" in n for n in with_grad)
    assert {n for n, p in model.named_parameters() if p.requires_grad} >= with_grad


def test_clear_errors(tmp_path):
    get_peft_model(tiny_dit(), FouraConfig(r=2, target_modules=DIT_TARGETS)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="another model configuration"):
        PeftModel.from_pretrained(tiny_dit(attention_head_dim=24), tmp_path)
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d layers only"):
        get_peft_model(nn.Sequential(nn.Conv1d(3, 3, 1)), FouraConfig(target_modules=["0"]))
    with pytest.raises(TypeError, match="plain convolutions"):
        get_peft_model(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), FouraConfig(target_modules=["0"]))
    with pytest.raises(ValueError, match="does not apply to Conv2d"):
        get_peft_model(convnet(), FouraConfig(target_modules=["0"], token_transform=True))
    for bad in ({"gate": "soft"}, {"transform": "wavelet"}, {"r": 0}):
        with pytest.raises(ValueError):
            FouraConfig(target_modules=["0"], **bad)


def convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(6, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 5, 3, stride=2, padding=2,
                                                                            dilation=2))


def test_conv_adapter_is_lora_sized_and_equals_its_definition():
    """On a Conv2d, A is a conv with the base kernel in the input-channel frequency basis and B a 1 x 1 conv in
    the output one: the output equals that formula computed by hand."""
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(1))
    model = foura(convnet(), r=3, transform="rfft")
    layer = model.base_model.model[2]
    assert isinstance(model.base_model.model[0], FouraConv2d) and isinstance(layer, FouraConv2d)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3 * (6 * 9 + 12) + 3 * (12 * 9 + 5)  # PEFT's conv LoRA count: r * (in * k * k + out)
    h = torch.randn(2, 12, 9, 9, generator=torch.Generator().manual_seed(2))
    a = torch.einsum("rf...,fi->ri...", layer.foura_A["default"], frequency_basis("rfft", 12))
    b = frequency_basis("rfft", 5).T @ layer.foura_B["default"]
    low = nn.functional.conv2d(h, a, stride=2, padding=2, dilation=2)
    expected = layer.base_layer(h) + nn.functional.conv2d(low, b[:, :, None, None]) * layer.scaling["default"]
    torch.testing.assert_close(layer(h), expected, rtol=0, atol=1e-5)
    assert model(x).shape == convnet()(x).shape


@pytest.mark.parametrize("gate", ["none", "frozen"])
def test_conv_merge_matches_unmerged_outputs(gate):
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(1))
    model = foura(convnet(), gate=gate)
    if gate == "frozen":
        model.base_model.model[2].foura_mask["default"] = torch.tensor([1.0, 0.0, 1.0, 1.0])
    unmerged = model(x)
    assert not torch.allclose(unmerged, convnet()(x), atol=1e-3)  # the adapter acts
    plain = model.merge_and_unload()
    assert isinstance(plain[2], nn.Conv2d)
    torch.testing.assert_close(plain(x), unmerged, rtol=0, atol=1e-5)


def test_conv_adaptive_gate_trains_and_stays_unmerged():
    model = foura(convnet(), gate="adaptive")
    model(torch.randn(2, 6, 9, 9)).square().mean().backward()
    gate_grads = [p.grad for n, p in model.named_parameters() if ".foura_gate." in n]
    assert gate_grads and all(g is not None for g in gate_grads)
    with pytest.raises(ValueError, match="input-adaptive gate"):
        model.merge_adapter()
