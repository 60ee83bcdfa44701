import pytest
import torch
from conftest import FIXTURES, load_io

from neodragon.models.context_adapter import ContextAdapter, SkipMLP, context_adapter_num_parameters


def test_fixture_parity_and_keys():
    model, info = ContextAdapter.from_pretrained(FIXTURES / "context_adapter", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    io = load_io("context_adapter_io.safetensors")
    with torch.no_grad():
        y = model(io["x"])
    torch.testing.assert_close(y, io["y"], atol=1e-4, rtol=0)


def test_default_layout_and_param_count():
    with torch.device("meta"):
        model = SkipMLP()
    keys = set(model.state_dict())
    assert keys == {f"network_layers.{i}.1.{p}" for i in range(4) for p in ("weight", "bias")} | {
        "network_layers.4.0.weight",
        "network_layers.4.0.bias",
    }
    count = sum(p.numel() for p in model.parameters())
    assert count == context_adapter_num_parameters(**model.config) == 130_041_344
    assert tuple(model.network_layers[4][0].weight.shape) == (1536, 8192)


def test_skip_concat_order_and_init():
    model = ContextAdapter(input_dims=3, output_dims=2, layer_depths=(4,), skips=(True,), activation_fn="relu")
    assert all(not m.bias.any() for m in model.modules() if isinstance(m, torch.nn.Linear))
    x = torch.randn(5, 3)
    hidden = model.network_layers[0](x)
    expected = model.network_layers[1](torch.cat([x, hidden], -1))
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu"])
def test_activations_and_pre_activation(act):
    model = ContextAdapter(
        input_dims=6, output_dims=5, layer_depths=(7, 7), skips=(False, True), pre_activation=True, activation_fn=act
    )
    assert isinstance(model.network_layers[0][2], torch.nn.Identity)
    assert not isinstance(model.network_layers[0][0], torch.nn.Identity)
    assert model(torch.randn(2, 3, 6)).shape == (2, 3, 5)


def test_bad_config():
    with pytest.raises(ValueError):
        ContextAdapter(layer_depths=(4, 4), skips=(True,))
    with pytest.raises(ValueError):
        ContextAdapter(input_dims=2, output_dims=2, layer_depths=(2,), skips=(True,), activation_fn="swish9")


def test_save_load_round_trip(tmp_path):
    model = ContextAdapter(input_dims=4, output_dims=3, layer_depths=(5, 6), skips=(True, False))
    model.save_pretrained(tmp_path)
    loaded = ContextAdapter.from_pretrained(tmp_path)
    x = torch.randn(2, 4)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
