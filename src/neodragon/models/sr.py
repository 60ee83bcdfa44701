"""QuickSRNet: per-frame 2x super-resolution (architecture §12; arXiv 2303.04336)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}
# The QuickSRNet family (arXiv 2303.04336; docs: ../shared/reference/neodragon-architecture.md section 12). Which one
# Neodragon used is not published; `neodragon train sr --size` picks one by measurement.
VARIANTS = {
    "small": {"num_channels": 32, "num_intermediate_layers": 2, "use_ito_connection": False},
    "medium": {"num_channels": 32, "num_intermediate_layers": 5, "use_ito_connection": False},
    "large": {"num_channels": 64, "num_intermediate_layers": 11, "use_ito_connection": True},
}


def variant_of(config: Mapping) -> str | None:
    """small, medium or large when ``config`` is exactly that family member's (anchor included), else None."""
    return next((name for name, member in VARIANTS.items()
                 if all(config.get(key) == value for key, value in member.items())), None)


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
    def variant(cls, name: str, **kwargs) -> QuickSRNet:
        """The family member ``name`` (small, medium or large), with ``kwargs`` overriding its config."""
        if name not in VARIANTS:
            raise ValueError(f"unknown QuickSRNet size {name!r}; expected one of {', '.join(VARIANTS)}")
        return cls(**{**VARIANTS[name], **kwargs})

    @property
    def variant_name(self) -> str | None:
        """small, medium or large when the config is exactly that family member's (``variant_of``), else None."""
        return variant_of(self.config)

    @torch.no_grad()
    def upscale_video(self, video: torch.Tensor, frames_per_call: int = 16) -> torch.Tensor:
        """Upscale a decoded video ``[B, C, T, H, W]`` in chunks of about ``frames_per_call`` frames (each chunk one
        batched call over a span of time steps, which bounds the activations' memory at full resolution), in this
        model's dtype and device; returns float32 in [-1, 1]. The input is clamped to [-1, 1] first, as the training
        pairs are."""
        if video.ndim != 5:
            raise ValueError(f"upscale_video expects [B, C, T, H, W], got {tuple(video.shape)}")
        if frames_per_call < 1:
            raise ValueError(f"frames_per_call must be at least 1, got {frames_per_call}")
        parameter = next(self.parameters())
        steps = max(1, frames_per_call // video.shape[0])  # time steps per call, every video of the batch at once
        return torch.cat([self(chunk.to(parameter.device, parameter.dtype)).float()
                          for chunk in video.clamp(-1, 1).split(steps, dim=2)], dim=2)

    @classmethod
    def small(cls, **kwargs) -> QuickSRNet:
        """QuickSRNet-Small: 32 channels, 2 intermediate layers, no anchor (22,860 parameters at 2x)."""
        return cls.variant("small", **kwargs)

    @classmethod
    def medium(cls, **kwargs) -> QuickSRNet:
        """QuickSRNet-Medium: 32 channels, 5 intermediate layers, no anchor (50,604 parameters at 2x)."""
        return cls.variant("medium", **kwargs)

    @classmethod
    def large(cls, **kwargs) -> QuickSRNet:
        """QuickSRNet-Large: 64 channels, 11 intermediate layers, anchor (414,960 parameters at 2x)."""
        return cls.variant("large", **kwargs)

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
