"""Neodragon's asymmetric causal video VAE.

The encoder is Pyramid-Flow's causal 3-D VAE encoder (8x spatial, 8x temporal, first frame encoded
alone). The default decoder is a small TAEHV-style decoder run in parallel over time; a heavier native
causal decoder (Pyramid-Flow-like) can be selected with ``decoder_type="causal"``.

Tensors are NCTHW throughout. Pixel values are in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.activations import get_activation
from diffusers.models.attention_processor import Attention
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

_GN_EPS = 1e-6
_LEGACY_ATTENTION_KEYS = {
    "query.": "to_q.",
    "key.": "to_k.",
    "value.": "to_v.",
    "proj_attn.": "to_out.0.",
}


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return value, value, value
    return tuple(value)  # type: ignore[return-value]


class CausalConv3d(nn.Module):
    """3-D convolution that is causal in time.

    Time is zero-padded with ``k_t - 1`` frames in front and nothing behind, so output frame ``t`` only
    sees input frames ``<= t``; height and width are zero-padded symmetrically by ``k // 2``. An
    integer ``stride`` strides time only, i.e. ``(stride, 1, 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        stride = (stride, 1, 1) if isinstance(stride, int) else tuple(stride)
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back)
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=stride, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class CausalGroupNorm(nn.GroupNorm):
    """GroupNorm applied to each frame separately, so statistics never mix frames (keeps causality)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = x.transpose(1, 2).reshape(b * t, c, h, w)
        x = super().forward(x)
        return x.reshape(b, t, c, h, w).transpose(1, 2)


def _norm(num_groups: int, channels: int) -> nn.Module:
    """Per-frame GroupNorm, or no normalisation for ``num_groups == 0``.

    The nano teacher uses 0: ShapesWorld frames are mostly flat colour, where per-frame statistics come from a
    few object pixels, and with GroupNorm the VAE stalled at mean-colour reconstructions (docs/journal/nano-teacher.md).
    """
    return CausalGroupNorm(num_groups, channels, eps=_GN_EPS) if num_groups else nn.Identity()


class CausalResnetBlock3D(nn.Module):
    """Pre-activation residual block: GN, act, conv, GN, act, dropout, conv, plus a 1x1x1 shortcut
    when the channel count changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        act_fn: str = "silu",
    ) -> None:
        super().__init__()
        self.norm1 = _norm(norm_num_groups, in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = _norm(norm_num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.act = get_activation(act_fn)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class CausalDownsample2x(nn.Module):
    """Spatial 2x downsampling: causal 3x3x3 conv with stride (1, 2, 2); H -> ceil(H / 2)."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, out_channels or channels, 3, stride=(1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CausalTemporalDownsample2x(nn.Module):
    """Temporal 2x downsampling: causal 3x3x3 conv with stride (2, 1, 1); T -> (T - 1) // 2 + 1."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, out_channels or channels, 3, stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CausalUpsample2x(nn.Module):
    """Spatial 2x upsampling: causal conv to 4x channels, then a 2x2 pixel shuffle per frame."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.out_channels = out_channels or channels
        self.conv = CausalConv3d(channels, self.out_channels * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        b, _, t, h, w = x.shape
        c = self.out_channels
        # channel layout (c, p1, p2) -> (b, c, t, h, p1, w, p2)
        x = x.reshape(b, c, 2, 2, t, h, w).permute(0, 1, 4, 5, 2, 6, 3)
        return x.reshape(b, c, t, 2 * h, 2 * w)


class CausalTemporalUpsample2x(nn.Module):
    """Causal temporal 2x upsampling: causal conv to 2x channels, unfold each frame into two, drop the
    first frame. T -> 2T - 1, so the first (image) frame stays a single frame."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.out_channels = out_channels or channels
        self.conv = CausalConv3d(channels, self.out_channels * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        b, _, t, h, w = x.shape
        c = self.out_channels
        x = x.reshape(b, c, 2, t, h, w).transpose(2, 3).reshape(b, c, 2 * t, h, w)
        return x[:, :, 1:]


class _ResnetStage(nn.Module):
    """Residual blocks, then the optional resamplers named in ``_resamplers`` (their names are state-dict keys)."""

    _resamplers: tuple[str, ...] = ()

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int, dropout: float,
                 act_fn: str, **resamplers: nn.Module | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            CausalResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, norm_num_groups, dropout, act_fn)
            for i in range(num_layers)
        )
        for name in self._resamplers:
            setattr(self, name, nn.ModuleList([resamplers[name]]) if resamplers[name] is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for name in self._resamplers:
            if getattr(self, name) is not None:
                x = getattr(self, name)[0](x)
        return x


class DownEncoderBlockCausal3D(_ResnetStage):
    """Residual blocks followed by optional spatial and temporal 2x downsampling."""

    _resamplers = ("downsamplers", "temporal_downsamplers")

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int = 32,
                 dropout: float = 0.0, act_fn: str = "silu", add_spatial_downsample: bool = True,
                 add_temporal_downsample: bool = False) -> None:
        super().__init__(
            in_channels, out_channels, num_layers, norm_num_groups, dropout, act_fn,
            downsamplers=CausalDownsample2x(out_channels) if add_spatial_downsample else None,
            temporal_downsamplers=CausalTemporalDownsample2x(out_channels) if add_temporal_downsample else None,
        )


class UpDecoderBlockCausal3D(_ResnetStage):
    """Residual blocks followed by optional spatial and causal temporal 2x upsampling."""

    _resamplers = ("upsamplers", "temporal_upsamplers")

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, norm_num_groups: int = 32,
                 act_fn: str = "silu", add_spatial_upsample: bool = True, add_temporal_upsample: bool = False) -> None:
        super().__init__(
            in_channels, out_channels, num_layers, norm_num_groups, 0.0, act_fn,
            upsamplers=CausalUpsample2x(out_channels) if add_spatial_upsample else None,
            temporal_upsamplers=CausalTemporalUpsample2x(out_channels) if add_temporal_upsample else None,
        )


class CausalUNetMidBlock3D(nn.Module):
    """Resnet, per-frame single-head spatial self-attention, resnet.

    The attention is diffusers' ``Attention`` (keys ``group_norm``, ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``). Checkpoints with the legacy names (``query``, ``key``, ``value``, ``proj_attn``) are
    renamed on load: diffusers does it in ``from_pretrained``; ``_load_from_state_dict`` covers a plain
    ``load_state_dict``.
    """

    def __init__(self, channels: int, norm_num_groups: int = 32, act_fn: str = "silu") -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                CausalResnetBlock3D(channels, channels, norm_num_groups, 0.0, act_fn),
                CausalResnetBlock3D(channels, channels, norm_num_groups, 0.0, act_fn),
            ]
        )
        self.attentions = nn.ModuleList(
            [
                Attention(
                    channels,
                    heads=1,
                    dim_head=channels,
                    rescale_output_factor=1.0,
                    eps=_GN_EPS,
                    norm_num_groups=norm_num_groups or None,
                    residual_connection=True,
                    bias=True,
                    upcast_softmax=True,
                    _from_deprecated_attn_block=True,
                )
            ]
        )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        attn_prefix = f"{prefix}attentions.0."
        for key in [k for k in state_dict if k.startswith(attn_prefix)]:
            rest = key[len(attn_prefix) :]
            for old, new in _LEGACY_ATTENTION_KEYS.items():
                if rest.startswith(old):
                    state_dict[attn_prefix + new + rest[len(old) :]] = state_dict.pop(key)
                    break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        b, c, t, h, w = x.shape
        # attention is spatial only: each frame is its own batch item, so time stays causal
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        frames = self.attentions[0](frames)
        x = frames.reshape(b, t, c, h, w).transpose(1, 2)
        return self.resnets[1](x)


class CausalVideoEncoder(nn.Module):
    """Pyramid-Flow causal video encoder: conv_in, down blocks, mid block, GN/act/conv_out.

    Outputs ``2 * out_channels`` moment channels (mean and log-variance) at 1/8 resolution.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 16,
        layers_per_block: Sequence[int] = (2, 2, 2, 2),
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        spatial_down_sample: Sequence[bool] = (True, True, True, False),
        temporal_down_sample: Sequence[bool] = (True, True, True, False),
        block_dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        act_fn: str = "silu",
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0], 3)
        blocks = []
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            blocks.append(
                DownEncoderBlockCausal3D(
                    prev,
                    ch,
                    layers_per_block[i],
                    norm_num_groups,
                    block_dropout[i],
                    act_fn,
                    add_spatial_downsample=spatial_down_sample[i],
                    add_temporal_downsample=temporal_down_sample[i],
                )
            )
            prev = ch
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = CausalUNetMidBlock3D(prev, norm_num_groups, act_fn)
        self.conv_norm_out = _norm(norm_num_groups, prev)
        self.conv_act = get_activation(act_fn)
        self.conv_out = CausalConv3d(prev, 2 * out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class CausalVideoDecoder(nn.Module):
    """Native causal video decoder (Pyramid-Flow-like, about 226 M parameters at the defaults).

    conv_in, mid block, up blocks (resnets, then 2x pixel-shuffle spatial and causal 2x temporal
    upsampling), GN/act/conv_out. With three temporal ups, ``k`` latent frames give ``1 + 8 (k - 1)``
    frames, and output frames of latent ``i`` depend only on latents ``<= i``.
    """

    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 3,
        block_out_channels: Sequence[int] = (128, 256, 512, 512),
        layers_per_block: Sequence[int] = (3, 3, 3, 3),
        spatial_up_sample: Sequence[bool] = (True, True, True, False),
        temporal_up_sample: Sequence[bool] = (True, True, True, False),
        norm_num_groups: int = 32,
        act_fn: str = "silu",
    ) -> None:
        super().__init__()
        reversed_channels = list(reversed(block_out_channels))
        prev = reversed_channels[0]
        self.conv_in = CausalConv3d(in_channels, prev, 3)
        self.mid_block = CausalUNetMidBlock3D(prev, norm_num_groups, act_fn)
        blocks = []
        for i, ch in enumerate(reversed_channels):
            blocks.append(
                UpDecoderBlockCausal3D(
                    prev,
                    ch,
                    layers_per_block[i],
                    norm_num_groups,
                    act_fn,
                    add_spatial_upsample=spatial_up_sample[i],
                    add_temporal_upsample=temporal_up_sample[i],
                )
            )
            prev = ch
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_norm_out = _norm(norm_num_groups, prev)
        self.conv_act = get_activation(act_fn)
        self.conv_out = CausalConv3d(prev, out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


def _conv3x3(n_in: int, n_out: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of the latent to (-3, 3): ``tanh(x / 3) * 3``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """TAEHV memory block: ``relu(conv(cat[x_t, past]) + skip(x_t))`` on frames flattened into the batch."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv3x3(2 * n_in, n_out), nn.ReLU(), _conv3x3(n_out, n_out), nn.ReLU(), _conv3x3(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(torch.cat([x, past], 1)) + self.skip(x))


class TGrow(nn.Module):
    """Temporal upsampling by ``stride``: a 1x1 conv to ``n * stride`` channels, then each frame becomes
    ``stride`` consecutive frames (channel groups in order)."""

    def __init__(self, n: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


class TAEHVDecoder(nn.Module):
    """TAEHV-style tiny video decoder, run in parallel over time.

    ``blocks`` is an ``nn.Sequential`` whose indices are part of the checkpoint format. Each MemBlock's
    memory is its own input at the previous frame (zeros at frame 0). Each stride-2 TGrow doubles the
    frame count, then ``2 ** n_time_ups - 1`` frames are trimmed from the start, so ``k`` latent frames
    give ``1 + 8 (k - 1)`` frames with the default three time upscales. Input and output are NCTHW;
    the output is not clamped (nominally [-1, 1]).
    """

    def __init__(
        self,
        latent_channels: int = 16,
        num_features: Sequence[int] = (256, 128, 64, 64),
        time_upscale: Sequence[bool] = (True, True, True),
        space_upscale: Sequence[bool] = (True, True, True),
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        n = list(num_features)
        layers: list[nn.Module] = [Clamp(), _conv3x3(latent_channels, n[0]), nn.ReLU()]
        for i in range(3):
            layers += [MemBlock(n[i], n[i]) for _ in range(3)]
            layers += [
                nn.Upsample(scale_factor=2 if space_upscale[i] else 1),
                TGrow(n[i], 2 if time_upscale[i] else 1),
                _conv3x3(n[i], n[i + 1], bias=False),
            ]
        layers += [nn.ReLU(), _conv3x3(n[3], out_channels)]
        self.blocks = nn.Sequential(*layers)
        self.frames_to_trim = 2 ** sum(bool(u) for u in time_upscale) - 1
        # every block after the last TGrow works frame by frame, so the frames before the first output frame are
        # dropped there rather than at the end: the full-resolution convolutions skip them
        self.trim_after = max(i for i, block in enumerate(self.blocks) if isinstance(block, TGrow))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = z.shape
        x = z.transpose(1, 2).reshape(n * t, c, h, w)
        for index, block in enumerate(self.blocks):
            if isinstance(block, MemBlock):
                frames = x.reshape(n, -1, *x.shape[1:])
                past = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, :-1]], dim=1)
                x = block(x, past.reshape(x.shape))
            else:
                x = block(x)
            if index == self.trim_after:
                x = x.reshape(n, -1, *x.shape[1:])[:, self.frames_to_trim :].flatten(0, 1)
        return x.reshape(n, -1, *x.shape[1:]).transpose(1, 2)


LATENT_STATISTICS = ("image_latent_shift", "image_latent_scale", "video_latent_shift", "video_latent_scale")


class AsymmetricCausalVideoVAE(ModelMixin, ConfigMixin):
    """Neodragon's video VAE: Pyramid-Flow's heavy causal encoder with a light decoder.

    ``encode`` maps ``[B, 3, 1 + 8k, H, W]`` video in [-1, 1] to a diagonal Gaussian over
    ``[B, C, 1 + k, H / 8, W / 8]`` latents (un-normalised). ``decode`` maps latents back to video with the TAEHV
    decoder (``decoder_type="taehv"``, the released model) or a native causal decoder (``decoder_type="causal"``,
    e.g. for teacher VAEs).

    The DiT works on normalised latents, ``(z - shift) * scale`` with the first latent frame under the image
    constants and the later ones under the video constants (the causal encoder sees frame 0 alone);
    ``normalize_latents`` / ``denormalize_latents`` apply them. The constants are config entries, like diffusers'
    ``scaling_factor``; the release's config has none, so its reference values are the defaults.
    """

    @register_to_config
    def __init__(
        self,
        encoder_in_channels: int = 3,
        encoder_out_channels: int = 16,
        encoder_layers_per_block: Sequence[int] = (2, 2, 2, 2),
        encoder_down_block_types: Sequence[str] = ("DownEncoderBlockCausal3D",) * 4,
        encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512),
        encoder_spatial_down_sample: Sequence[bool] = (True, True, True, False),
        encoder_temporal_down_sample: Sequence[bool] = (True, True, True, False),
        encoder_block_dropout: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        encoder_act_fn: str = "silu",
        encoder_norm_num_groups: int = 32,
        decoder_num_features: Sequence[int] = (256, 128, 64, 64),
        decoder_time_upscale: Sequence[bool] = (True, True, True),
        decoder_space_upscale: Sequence[bool] = (True, True, True),
        sample_size: int = 256,
        temporal_downsample_scale: int = 8,
        spatial_downsample_scale: int = 8,
        decoder_type: str = "taehv",
        decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512),
        decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3),
        decoder_spatial_up_sample: Sequence[bool] = (True, True, True, False),
        decoder_temporal_up_sample: Sequence[bool] = (True, True, True, False),
        decoder_norm_num_groups: int = 32,
        image_latent_shift: float = 0.1490,
        image_latent_scale: float = 0.5430,
        video_latent_shift: float = -0.2343,
        video_latent_scale: float = 0.3031,
    ) -> None:
        super().__init__()
        if decoder_type not in ("taehv", "causal"):
            raise ValueError(f"decoder_type must be 'taehv' or 'causal', got {decoder_type!r}.")
        unknown = sorted(set(encoder_down_block_types) - {"DownEncoderBlockCausal3D"})
        if unknown:
            raise ValueError(f"Unsupported encoder_down_block_types {unknown}; only DownEncoderBlockCausal3D.")
        self.encoder = CausalVideoEncoder(
            in_channels=encoder_in_channels,
            out_channels=encoder_out_channels,
            layers_per_block=encoder_layers_per_block,
            block_out_channels=encoder_block_out_channels,
            spatial_down_sample=encoder_spatial_down_sample,
            temporal_down_sample=encoder_temporal_down_sample,
            block_dropout=encoder_block_dropout,
            act_fn=encoder_act_fn,
            norm_num_groups=encoder_norm_num_groups,
        )
        latent = encoder_out_channels
        self.quant_conv = CausalConv3d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = CausalConv3d(latent, latent, 1)
        if decoder_type == "taehv":
            self.decoder: nn.Module = TAEHVDecoder(
                latent_channels=latent,
                num_features=decoder_num_features,
                time_upscale=decoder_time_upscale,
                space_upscale=decoder_space_upscale,
                out_channels=encoder_in_channels,
            )
        else:
            self.decoder = CausalVideoDecoder(
                in_channels=latent,
                out_channels=encoder_in_channels,
                block_out_channels=decoder_block_out_channels,
                layers_per_block=decoder_layers_per_block,
                spatial_up_sample=decoder_spatial_up_sample,
                temporal_up_sample=decoder_temporal_up_sample,
                norm_num_groups=decoder_norm_num_groups,
                act_fn=encoder_act_fn,
            )

    def latent_statistics(self) -> dict[str, float]:
        """The shift and scale constants of the normalised latent space, keyed as in the config."""
        return {key: getattr(self.config, key) for key in LATENT_STATISTICS}

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents ``[B, C, T, h, w]`` -> the DiT's normalised latents (frame 0 with the image constants)."""
        cfg = self.config
        first = (latents[:, :, :1] - cfg.image_latent_shift) * cfg.image_latent_scale
        rest = (latents[:, :, 1:] - cfg.video_latent_shift) * cfg.video_latent_scale
        return torch.cat([first, rest], dim=2)

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of ``normalize_latents``."""
        cfg = self.config
        first = latents[:, :, :1] / cfg.image_latent_scale + cfg.image_latent_shift
        rest = latents[:, :, 1:] / cfg.video_latent_scale + cfg.video_latent_shift
        return torch.cat([first, rest], dim=2)

    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames for a ``1 + temporal_downsample_scale * k`` frame video."""
        scale = self.config.temporal_downsample_scale
        if num_frames < 1 or (num_frames - 1) % scale:
            raise ValueError(
                f"num_frames must be 1 + {scale} * k (1, {1 + scale}, {1 + 2 * scale}, ...), got {num_frames}."
            )
        return (num_frames - 1) // scale + 1

    def num_frames(self, num_latent_frames: int) -> int:
        """Video frames produced from ``num_latent_frames`` latent frames."""
        if num_latent_frames < 1:
            raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}.")
        return 1 + self.config.temporal_downsample_scale * (num_latent_frames - 1)

    def _check_video(self, x: torch.Tensor) -> None:
        channels = self.config.encoder_in_channels
        if x.ndim != 5:
            raise ValueError(
                f"encode expects a 5-D video tensor [B, {channels}, T, H, W], got shape {tuple(x.shape)}; "
                "add a frame axis for images (x.unsqueeze(2))."
            )
        if x.shape[1] != channels:
            raise ValueError(f"encode expects {channels} channels at dim 1 (NCTHW), got shape {tuple(x.shape)}.")
        self.num_latent_frames(x.shape[2])
        scale = self.config.spatial_downsample_scale
        if x.shape[3] % scale or x.shape[4] % scale:
            raise ValueError(f"encode expects H and W divisible by {scale}, got {x.shape[3]}x{x.shape[4]}.")

    def _check_latent(self, z: torch.Tensor) -> None:
        channels = self.config.encoder_out_channels
        if z.ndim != 5 or z.shape[1] != channels:
            raise ValueError(f"decode expects a 5-D latent [B, {channels}, T, h, w], got shape {tuple(z.shape)}.")

    @apply_forward_hook
    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        """Encode video ``[B, 3, 1 + 8k, H, W]`` to the latent posterior."""
        self._check_video(x)
        posterior = DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Decode un-normalised latents ``[B, C, k, h, w]`` to video ``[B, 3, 1 + 8(k - 1), 8h, 8w]``."""
        self._check_latent(z)
        sample = self.decoder(self.post_quant_conv(z))
        if not return_dict:
            return (sample,)
        return DecoderOutput(sample=sample)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Encode then decode ``sample`` (posterior mode unless ``sample_posterior``)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
