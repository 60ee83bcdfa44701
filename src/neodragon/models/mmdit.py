"""PyramidMMDiT: the pyramidal-flow MMDiT of Neodragon (an SD3-style joint text/video transformer).

One readable file. The forward convention is the reference one: ``sample`` is a list over pyramid stages,
each a list of clips ``[B, C, T, H, W]`` (oldest history first, the current noisy latent last), and the
model returns, per stage, the velocity for the current clip only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, RMSNorm
from torch import nn
from torch.utils.checkpoint import checkpoint

Clips = list[torch.Tensor]


def temporal_rope(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """cos/sin tables ``[L, head_dim/2, 2]`` for one temporal RoPE axis spanning the whole head dim.

    Frequencies are computed in float64 and used in float32, as in the reference.
    """
    omega = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of ``x [B, H, L, D]`` in float32, then cast back."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = rope[..., 0], rope[..., 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)

# Attention and feed-forward linears of every block: the default targets of DiT adapters (SHiRA, LoRA, FouRA).
DIT_TARGETS = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0"
               r"|to_add_out)|ff(_context)?\.net\.(0\.proj|2))")


class PatchEmbed3D(nn.Module):
    """Per-frame 2x2 patchify plus a shared 2-D sincos table, centre-cropped for the current clip.

    Lower-resolution history clips get the crop bilinearly resized to their grid, so every pyramid level
    shares one spatial coordinate frame (``interp_condition_pos``).
    """

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int, max_size: int, base_size: int,
                 interp_condition_pos: bool):
        super().__init__()
        self.patch_size = patch_size
        self.max_size = max_size
        self.interp_condition_pos = interp_condition_pos
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        table = get_2d_sincos_pos_embed(embed_dim, max_size, base_size=base_size, output_type="pt")
        self.register_buffer("pos_embed", table.float().unsqueeze(0), persistent=True)

    def _crop(self, height: int, width: int) -> torch.Tensor:
        grid = self.pos_embed.view(self.max_size, self.max_size, -1)
        top, left = (self.max_size - height) // 2, (self.max_size - width) // 2
        return grid[top : top + height, left : left + width]

    def positions(self, grid: tuple[int, int], current_grid: tuple[int, int]) -> torch.Tensor:
        """Positional table ``[h*w, D]`` for a clip with patch grid ``grid``."""
        if not self.interp_condition_pos or grid == current_grid:
            return self._crop(*grid).flatten(0, 1)
        crop = self._crop(*current_grid).permute(2, 0, 1).unsqueeze(0)
        return F.interpolate(crop, size=grid, mode="bilinear").squeeze(0).flatten(1).transpose(0, 1)

    def forward(self, clips: Clips) -> torch.Tensor:
        p = self.patch_size
        current_grid = (clips[-1].shape[-2] // p, clips[-1].shape[-1] // p)
        tokens = []
        for clip in clips:
            batch, _, frames, height, width = clip.shape
            x = self.proj(clip.transpose(1, 2).flatten(0, 1)).flatten(2).transpose(1, 2)
            x = x + self.positions((height // p, width // p), current_grid).to(x.dtype)
            tokens.append(x.reshape(batch, -1, x.shape[-1]))
        return torch.cat(tokens, dim=1)


class JointAttention(nn.Module):
    """Joint text/image attention with per-head RMSNorm on q/k, temporal RoPE and a boolean mask."""

    def __init__(self, dim: int, num_heads: int, context_pre_only: bool):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, eps=1e-5), RMSNorm(head_dim, eps=1e-5)
        self.norm_add_q, self.norm_add_k = RMSNorm(head_dim, eps=1e-5), RMSNorm(head_dim, eps=1e-5)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
                rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = torch.cat([self.norm_add_q(self._heads(self.add_q_proj(context))),
                       self.norm_q(self._heads(self.to_q(hidden)))], dim=1).transpose(1, 2)
        k = torch.cat([self.norm_add_k(self._heads(self.add_k_proj(context))),
                       self.norm_k(self._heads(self.to_k(hidden)))], dim=1).transpose(1, 2)
        v = torch.cat([self._heads(self.add_v_proj(context)), self._heads(self.to_v(hidden))], dim=1).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
        text_len = context.shape[1]
        hidden_out = self.to_out[1](self.to_out[0](out[:, text_len:]))
        context_out = None if self.to_add_out is None else self.to_add_out(out[:, :text_len])
        return hidden_out, context_out


class JointTransformerBlock(nn.Module):
    """MMDiT block with AdaLN-Zero modulation of both streams; the last block only reads the text."""

    def __init__(self, dim: int, num_heads: int, context_pre_only: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6, bias=True)
        else:
            self.norm1_context = AdaLayerNormZero(dim)
        self.attn = JointAttention(dim, num_heads, context_pre_only)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim, dim_out=dim, activation_fn="gelu-approximate")

    @staticmethod
    def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return x * (1 + scale[:, None]) + shift[:, None]

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor,
                rope: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden, emb=temb)
        if self.context_pre_only:
            norm_context = self.norm1_context(context, temb)
        else:
            norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, emb=temb)
        attn_hidden, attn_context = self.attn(norm_hidden, norm_context, mask, rope)

        hidden = hidden + gate_msa[:, None] * attn_hidden
        hidden = hidden + gate_mlp[:, None] * self.ff(self._modulate(self.norm2(hidden), scale_mlp, shift_mlp))
        if self.context_pre_only:
            return hidden, None
        context = context + c_gate_msa[:, None] * attn_context
        context_ff = self.ff_context(self._modulate(self.norm2_context(context), c_scale_mlp, c_shift_mlp))
        return hidden, context + c_gate_mlp[:, None] * context_ff


class PyramidMMDiT(ModelMixin, ConfigMixin):
    """Pyramidal-flow MMDiT with temporal-causal attention over a history pyramid.

    Config keys match the released ``diffusion_transformer_320p*/config.json``. ``use_context_embedder``
    (not in the release, default off) adds Pyramid-Flow's ``context_embedder`` Linear for teacher
    checkpoints; ``from_pretrained`` switches it on when the checkpoint has that weight.
    """

    _supports_gradient_checkpointing = True
    _repeated_blocks = ["JointTransformerBlock"]  # what `compile_repeated_blocks()` compiles

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 24,
        caption_projection_dim: int = 1536,
        pooled_projection_dim: int = 2048,
        pos_embed_max_size: int = 192,
        max_num_frames: int = 200,
        qk_norm: str = "rms_norm",
        pos_embed_type: str = "sincos",
        temp_pos_embed_type: str = "rope",
        joint_attention_dim: int = 4096,
        use_gradient_checkpointing: bool = False,
        use_temporal_causal: bool = True,
        use_t5_mask: bool = True,
        add_temp_pos_embed: bool = True,
        interp_condition_pos: bool = True,
        gradient_checkpointing_ratio: float = 0.6,
        use_context_embedder: bool = False,
    ):
        super().__init__()
        unsupported = {"qk_norm": (qk_norm, "rms_norm"), "pos_embed_type": (pos_embed_type, "sincos"),
                       "temp_pos_embed_type": (temp_pos_embed_type, "rope")}
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise NotImplementedError(f"PyramidMMDiT supports {key}={supported!r} only (got {value!r}); "
                                          "this is the configuration of every released video checkpoint.")
        inner_dim = num_attention_heads * attention_head_dim
        self.pos_embed = PatchEmbed3D(patch_size, in_channels, inner_dim, pos_embed_max_size,
                                      base_size=sample_size // patch_size, interp_condition_pos=interp_condition_pos)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(inner_dim, pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, inner_dim) if use_context_embedder else None
        self.transformer_blocks = nn.ModuleList(
            [JointTransformerBlock(inner_dim, num_attention_heads, context_pre_only=i == num_layers - 1)
             for i in range(num_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(inner_dim, inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * in_channels)
        self.gradient_checkpointing = use_gradient_checkpointing

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs) -> PyramidMMDiT:
        """Load a checkpoint folder; teacher checkpoints with a ``context_embedder`` are detected."""
        folder = Path(pretrained_model_name_or_path) / kwargs.get("subfolder", "")
        weights = folder / "diffusion_pytorch_model.safetensors"
        if weights.is_file() and "use_context_embedder" not in kwargs:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                if "context_embedder.weight" in handle.keys():  # noqa: SIM118 - safe_open has no __contains__
                    kwargs["use_context_embedder"] = True
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    # -- inputs -----------------------------------------------------------------------------------------

    def _check_clips(self, clips: Clips) -> None:
        if not isinstance(clips, (list, tuple)) or not clips:
            raise ValueError("Each stage of `sample` must be a non-empty list of clips [B, C, T, H, W].")
        p, cfg = self.config.patch_size, self.config
        batch = clips[-1].shape[0]
        for clip in clips:
            if clip.ndim != 5 or clip.shape[1] != cfg.in_channels or clip.shape[0] != batch:
                raise ValueError(f"Clips must be [B={batch}, C={cfg.in_channels}, T, H, W]; got {tuple(clip.shape)}.")
            if clip.shape[-2] % p or clip.shape[-1] % p:
                raise ValueError(f"Clip height/width must be multiples of patch_size={p}; got {tuple(clip.shape)}.")
        grid = max(clips[-1].shape[-2], clips[-1].shape[-1]) // p
        if grid > cfg.pos_embed_max_size:
            raise ValueError(f"Latent grid {grid} exceeds pos_embed_max_size={cfg.pos_embed_max_size}.")
        if sum(clip.shape[2] for clip in clips) > cfg.max_num_frames:
            raise ValueError(f"At most max_num_frames={cfg.max_num_frames} latent frames per sequence.")

    def _frame_positions(self, clips: Clips) -> torch.Tensor:
        """Running temporal index of every image token: history frames 0..u-1, current frame u."""
        p, device = self.config.patch_size, clips[-1].device
        frames_per_clip = torch.tensor([clip.shape[2] for clip in clips], device=device)
        tokens_per_clip_frame = torch.tensor([clip.shape[-2] * clip.shape[-1] // p**2 for clip in clips], device=device)
        tokens_per_frame = tokens_per_clip_frame.repeat_interleave(frames_per_clip)
        return torch.arange(len(tokens_per_frame), device=device).repeat_interleave(tokens_per_frame)

    def _attention_mask(self, text_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Padding AND temporal-causal mask ``[B, 1, L, L]``, built once per forward.

        Padding: token ids are equal for real tokens of a sample and 0 for padded text, so padded text
        tokens only see each other (their rows stay non-empty).
        """
        batch, num_image = text_mask.shape[0], positions.shape[0] - text_mask.shape[1]
        valid = text_mask.bool() if self.config.use_t5_mask else torch.ones_like(text_mask, dtype=torch.bool)
        valid = torch.cat([valid, valid.new_ones(batch, num_image)], dim=1)
        mask = valid[:, :, None] == valid[:, None, :]
        if self.config.use_temporal_causal:
            mask = mask & (positions[:, None] >= positions[None, :])
        return mask.unsqueeze(1)

    # -- forward ----------------------------------------------------------------------------------------

    def _run_blocks(self, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor,
                    rope: torch.Tensor | None) -> torch.Tensor:
        num_checkpointed = round(self.config.gradient_checkpointing_ratio * len(self.transformer_blocks))
        for index, block in enumerate(self.transformer_blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled() and index < num_checkpointed:
                hidden, context = checkpoint(block, hidden, context, temb, mask, rope, use_reentrant=False)
            else:
                hidden, context = block(hidden, context, temb, mask, rope)
        return hidden

    def _forward_stage(self, clips: Clips, context: torch.Tensor, text_mask: torch.Tensor,
                       temb: torch.Tensor) -> torch.Tensor:
        current = clips[-1]
        batch, channels, frames, height, width = current.shape
        p = self.config.patch_size
        hidden = self.pos_embed(clips)

        image_positions = self._frame_positions(clips)
        positions = torch.cat([image_positions.new_zeros(context.shape[1]), image_positions])
        rope = temporal_rope(positions, self.config.attention_head_dim) if self.config.add_temp_pos_embed else None
        mask = self._attention_mask(text_mask, positions)

        hidden = self._run_blocks(hidden, context, temb, mask, rope)
        num_current = frames * (height // p) * (width // p)
        out = self.proj_out(self.norm_out(hidden[:, -num_current:], temb))
        out = out.reshape(batch, frames, height // p, width // p, p, p, channels)
        return out.permute(0, 6, 1, 2, 4, 3, 5).reshape(batch, channels, frames, height, width)

    def forward(
        self,
        sample: list[Clips],
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep_ratio: torch.Tensor | float,
    ) -> list[torch.Tensor]:
        """Velocity for the current clip of each stage.

        Args:
            sample: list over stages of clip lists, oldest history first, current noisy latent last.
            encoder_hidden_states: ``[B, L, D]`` text tokens (ContextAdapter output; raw ``joint_attention_dim``
                tokens when the model has a ``context_embedder``).
            encoder_attention_mask: ``[B, L]``, 1 for real tokens and 0 for padding.
            pooled_projections: ``[B, pooled_projection_dim]``.
            timestep_ratio: raw timestep on the 0..1000 scale, ``[B]`` or a scalar.

        With several stages packed (training), conditioning with ``num_stages * B`` rows is read interleaved
        (row ``j`` belongs to stage ``j % num_stages``), as in Pyramid-Flow; ``B`` rows are shared.
        """
        if not isinstance(sample, (list, tuple)) or not sample:
            raise ValueError("`sample` must be a list over stages, each a list of clips.")
        stages = [list(s) if isinstance(s, (list, tuple)) else [s] for s in sample]
        for clips in stages:
            self._check_clips(clips)
        if self.context_embedder is not None:
            encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        batch = stages[0][-1].shape[0]
        timestep = torch.as_tensor(timestep_ratio, device=stages[0][-1].device)
        timestep = timestep.expand(encoder_hidden_states.shape[0]) if timestep.ndim == 0 else timestep
        temb = self.time_text_embed(timestep, pooled_projections)

        def rows(tensor: torch.Tensor, stage: int) -> torch.Tensor:
            if tensor.shape[0] == batch:
                return tensor
            if tensor.shape[0] == batch * len(stages):
                return tensor[stage :: len(stages)]
            raise ValueError(f"Conditioning batch {tensor.shape[0]} matches neither B={batch} nor "
                             f"num_stages*B={batch * len(stages)}.")

        return [
            self._forward_stage(clips, rows(encoder_hidden_states, i), rows(encoder_attention_mask, i), rows(temb, i))
            for i, clips in enumerate(stages)
        ]
