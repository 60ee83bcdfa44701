import copy

import pytest
import torch
from test_shira import dit_inputs, tiny_dit
from torch import nn

from neodragon.adapters.shira import MaskSpec, ShiraAdapter, add_shira, build_shira, fuse_adapters, remove_shira
from neodragon.adapters.switching import AdapterSwitcher


def conv_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.SiLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def trained_like(model: nn.Module, seed: int, targets: str | list[str] | None = None, **budget) -> ShiraAdapter:
    spec = MaskSpec(seed=seed, **({"target_modules": targets} if targets else {}), **(budget or {"density": 0.05}))
    adapter = build_shira(model, spec)
    g = torch.Generator().manual_seed(seed)
    return ShiraAdapter(adapter.indices, {n: torch.randn(v.shape, generator=g) for n, v in adapter.values.items()},
                        adapter.shapes)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype):
    model = tiny_dit().to(dtype)
    original = weights(model)
    a, b = trained_like(model, 1), trained_like(model, 2, density=0.08)
    switcher = AdapterSwitcher(model)
    switcher.apply(a)
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())
    switcher.apply(b)
    switcher.apply(a, scale=0.7)
    switcher.restore()
    assert_bit_equal(weights(model), original)
    assert switcher.active is None


def test_switching_a_to_b_equals_applying_b_to_the_base():
    model = tiny_dit()
    a, b = trained_like(model, 1), trained_like(model, 2)
    switcher = AdapterSwitcher(model)
    switcher.apply(b)
    only_b = weights(model)
    switcher.restore()
    switcher.apply(a)
    switcher.apply(b)  # directly from A to B
    assert_bit_equal(weights(model), only_b)
    assert switcher.active is b


def test_fused_weights_are_base_plus_scaled_delta():
    model = conv_net()
    original = weights(model)
    adapter = trained_like(model, 3, targets=["0", "2", "5"])
    AdapterSwitcher(model).apply(adapter, scale=0.5)
    for name in ("0", "2", "5"):
        flat = original[f"{name}.weight"].flatten().clone()
        flat[adapter.indices[name]] += 0.5 * adapter.values[name]
        assert torch.equal(model.get_submodule(name).weight.flatten(), flat)


def test_fused_mode_equals_the_training_forward():
    model = tiny_dit()
    inputs = dit_inputs()
    adapter = trained_like(model, 4)
    trained = tiny_dit()
    add_shira(trained, adapter, trainable=False)
    switcher = AdapterSwitcher(model)
    with torch.no_grad():
        base = model(**inputs)[0]
        switcher.apply(adapter)
        assert torch.equal(model(**inputs)[0], trained(**inputs)[0])
        switcher.restore()
        assert torch.equal(model(**inputs)[0], base)
    remove_shira(trained, merge=True)
    switcher.apply(adapter)
    assert_bit_equal(weights(model), weights(trained))


def test_multi_adapter_fusion_in_fused_mode():
    model = conv_net()
    original = weights(model)
    targets = ["0", "2", "5"]
    a, b = trained_like(model, 5, targets), trained_like(model, 6, targets)
    switcher = AdapterSwitcher(model)
    switcher.apply(fuse_adapters([a, b], [1.0, 0.5]))
    for name in targets:
        expected = original[f"{name}.weight"].flatten().clone()
        expected[a.indices[name]] += a.values[name]
        expected[b.indices[name]] += 0.5 * b.values[name]
        torch.testing.assert_close(model.get_submodule(name).weight.flatten(), expected, rtol=0, atol=1e-6)
    switcher.apply(a)  # from the fused pair back to one adapter
    switcher.restore()
    assert_bit_equal(weights(model), original)


def test_mismatched_adapter_is_refused_before_any_change():
    model = tiny_dit()
    original = weights(model)
    other = trained_like(conv_net(), 1, targets=["0"])
    switcher = AdapterSwitcher(model)
    with pytest.raises(ValueError, match="does not have"):
        switcher.apply(other)
    assert_bit_equal(weights(model), original)
    add_shira(model, trained_like(tiny_dit(), 1))
    with pytest.raises(TypeError, match="already wrapped"):
        switcher.apply(trained_like(tiny_dit(), 2))
