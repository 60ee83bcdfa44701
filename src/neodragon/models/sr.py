"""QuickSRNet: per-frame 2x super-resolution (architecture §12; arXiv 2303.04336)."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


class QuickSRNet(ModelMixin, ConfigMixin):
    """QuickSRNet: conv3x3 + act, N x (conv3x3 + act), ``conv_last`` to 3*s^2 channels, PixelShuffle(s), clip.

    With ``use_ito_connection`` an input-to-output "anchor" (1x1 conv, initialised to repeat each input channel s^2
    times, i.e. nearest upsampling after the shuffle) is added before the PixelShuffle, and ``conv_last`` starts at
    zero so the untrained model is exactly nearest-neighbour upsampling. Images are [B, C, H, W] and videos
    [B, C, T, H, W], both in [-1, 1]; the output is clipped to [-1, 1].
    """

    @register_to_config
    def __init__(
        self,
        scale_factor: int = 2,
        num_channels: int = 32,
        num_intermediate_layers: int = 5,
        use_ito_connection: bool = False,
        in_channels: int = 3,
        out_channels: int = 3,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(_ACTIVATIONS)}")
        if use_ito_connection and in_channels != out_channels:
            raise ValueError("the anchor (ito) connection needs in_channels == out_channels")
        act = _ACTIVATIONS[activation]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, num_channels, 3, padding=1), act()]
        for _ in range(num_intermediate_layers):
            layers += [nn.Conv2d(num_channels, num_channels, 3, padding=1), act()]
        self.cnn = nn.Sequential(*layers)
        shuffle_channels = out_channels * scale_factor**2
        self.conv_last = nn.Conv2d(num_channels, shuffle_channels, 3, padding=1)
        self.anchor = nn.Conv2d(in_channels, shuffle_channels, 1, bias=False) if use_ito_connection else None
        self.depth_to_space = nn.PixelShuffle(scale_factor)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.anchor is None:
            return
        s2 = self.config.scale_factor**2
        with torch.no_grad():
            weight = torch.zeros_like(self.anchor.weight)
            for k in range(weight.shape[0]):
                # PixelShuffle reads channel c*s^2 + r as sub-pixel r of output channel c.
                weight[k, k // s2] = 1.0
            self.anchor.weight.copy_(weight)
            nn.init.zeros_(self.conv_last.weight)
            nn.init.zeros_(self.conv_last.bias)

    @classmethod
    def small(cls, **kwargs) -> QuickSRNet:
        """QuickSRNet-Small: 32 channels, 2 intermediate layers, no anchor (22,860 parameters at 2x)."""
        return cls(**{"num_channels": 32, "num_intermediate_layers": 2, "use_ito_connection": False, **kwargs})

    @classmethod
    def medium(cls, **kwargs) -> QuickSRNet:
        """QuickSRNet-Medium: 32 channels, 5 intermediate layers, no anchor (50,604 parameters at 2x)."""
        return cls(**{"num_channels": 32, "num_intermediate_layers": 5, "use_ito_connection": False, **kwargs})

    @classmethod
    def large(cls, **kwargs) -> QuickSRNet:
        """QuickSRNet-Large: 64 channels, 11 intermediate layers, anchor (414,960 parameters at 2x)."""
        return cls(**{"num_channels": 64, "num_intermediate_layers": 11, "use_ito_connection": True, **kwargs})

    def _upscale(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_last(self.cnn(x))
        if self.anchor is not None:
            y = y + self.anchor(x)
        return self.depth_to_space(y).clamp(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upscale [B, C, H, W] images or [B, C, T, H, W] videos by ``scale_factor``."""
        channels = self.config.in_channels
        if x.ndim not in (4, 5) or x.shape[1] != channels:
            raise ValueError(
                f"QuickSRNet expects [B, {channels}, H, W] or [B, {channels}, T, H, W], got {tuple(x.shape)}"
            )
        if x.ndim == 4:
            return self._upscale(x)
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        y = self._upscale(frames)
        return y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)
