"""ContextAdapter: the skip-MLP that maps DT5 tokens into the DiT's joint stream (architecture §6.3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "relu": lambda: nn.ReLU(),
    "linear": lambda: nn.Identity(),
}


def _activation(name: str | None) -> nn.Module:
    if name is None:
        return nn.Identity()
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class ContextAdapter(ModelMixin, ConfigMixin):
    """Skip-MLP from text-encoder tokens to the DiT context width.

    Hidden layer ``i`` is ``Sequential(pre-activation | Identity, Linear, activation | Identity)``; the last layer
    is ``Sequential(Linear, out-activation)``. When ``skips[i]`` is set, the original input is concatenated in front
    of the output of hidden layer ``i`` before it enters the next layer.
    """

    @register_to_config
    def __init__(
        self,
        input_dims: int = 4096,
        output_dims: int = 1536,
        layer_depths: Sequence[int] = (4096, 4096, 4096, 4096),
        skips: Sequence[bool] = (True, True, True, True),
        use_biases: bool = True,
        pre_activation: bool = False,
        activation_fn: str = "gelu",
        out_activation_fn: str = "linear",
    ) -> None:
        super().__init__()
        if len(layer_depths) != len(skips):
            raise ValueError(f"layer_depths ({len(layer_depths)}) and skips ({len(skips)}) differ in length")
        if not layer_depths:
            raise ValueError("layer_depths must name at least one hidden layer")
        self.skips = [bool(s) for s in skips]

        layers: list[nn.Module] = []
        in_dim = input_dims
        for depth, skip in zip(layer_depths, self.skips, strict=True):
            layers.append(
                nn.Sequential(
                    _activation(activation_fn) if pre_activation else nn.Identity(),
                    nn.Linear(in_dim, depth, bias=use_biases),
                    nn.Identity() if pre_activation else _activation(activation_fn),
                )
            )
            in_dim = depth + input_dims if skip else depth
        layers.append(nn.Sequential(nn.Linear(in_dim, output_dims, bias=use_biases), _activation(out_activation_fn)))
        self.network_layers = nn.ModuleList(layers)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.network_layers[0](x)
        for skip, layer in zip(self.skips, self.network_layers[1:], strict=True):
            if skip:
                y = torch.cat([x, y], dim=-1)
            y = layer(y)
        return y


SkipMLP = ContextAdapter


def context_adapter_num_parameters(
    input_dims: int = 4096,
    output_dims: int = 1536,
    layer_depths: Sequence[int] = (4096, 4096, 4096, 4096),
    skips: Sequence[bool] = (True, True, True, True),
    use_biases: bool = True,
    **_: object,
) -> int:
    """Parameter count of a ContextAdapter with this config, without building it (accepts a config dict)."""
    total = 0
    in_dim = input_dims
    for depth, skip in zip(layer_depths, skips, strict=True):
        total += in_dim * depth + (depth if use_biases else 0)
        in_dim = depth + input_dims if skip else depth
    return total + in_dim * output_dims + (output_dims if use_biases else 0)
