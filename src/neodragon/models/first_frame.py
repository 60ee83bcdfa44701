"""First-frame generators for hybrid mode: a text-to-image model that makes frame 0 of the video.

A generator is a registered component of ``NeodragonPipeline`` (``first_frame_generator``): it returns frame 0 as
the DiT's normalised latent, and saves itself into the checkpoint folder. The release uses SSD-1B (an SDXL UNet)
with an LCM scheduler at 640x1024, downsized to the DiT resolution and VAE-encoded as in the reference; any
other image model can stand behind the same call. The nano model's ``LatentFirstFrameGenerator`` is a small UNet of
the same family that samples in the video VAE's latent space, so its frame 0 needs no decode/encode round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image


class FirstFrameGenerator(Protocol):
    """Makes frame 0 of a hybrid-mode video as the normalised latent ``[B, C, 1, h, w]`` of ``pipe``'s VAE."""

    def first_frame_latents(self, pipe, prompts: list[str], negative_prompt: str, height: int, width: int,
                            generator: torch.Generator | None = None) -> torch.Tensor: ...

    def save_pretrained(self, root: str | Path) -> None: ...

    def to(self, *args, **kwargs): ...


def pil_to_tensor(images: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """Resize with LANCZOS (as the reference does) and scale to [-1, 1], ``[B, 3, H, W]``."""
    arrays = [np.asarray(img.convert("RGB").resize((width, height), Image.LANCZOS), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


SSD1B_SUBFOLDERS = {
    "vae": "ssd_1b_vae",
    "unet": "ssd_1b_unet",
    "text_encoder": "ssd_1b_text_encoder",
    "text_encoder_2": "ssd_1b_text_encoder_2",
    "tokenizer": "ssd_1b_tokenizer",
    "tokenizer_2": "ssd_1b_tokenizer_2",
}


class SSD1BFirstFrameGenerator:
    """SSD-1B through diffusers' SDXL pipeline with the reference LCM settings (4 steps, no CFG)."""

    timesteps = (999, 749, 499, 249)

    def __init__(self, sdxl_pipeline, image_height: int = 640, image_width: int = 1024):
        self.pipe = sdxl_pipeline
        self.image_height, self.image_width = image_height, image_width
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, root: str | Path, torch_dtype: torch.dtype | None = None,
                        **kwargs) -> SSD1BFirstFrameGenerator:
        """Load the ``ssd_1b_*`` sub-folders of a Neodragon checkpoint folder."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        root = Path(root)
        missing = [sub for sub in SSD1B_SUBFOLDERS.values() if not (root / sub).is_dir()]
        if missing:
            raise FileNotFoundError(f"Hybrid mode needs the SSD-1B first-frame model, but {root} lacks {missing}. "
                                    "Use mode='monolithic' or a checkpoint folder with the ssd_1b_* sub-folders.")
        parts = {name: loader.from_pretrained(root / SSD1B_SUBFOLDERS[name], torch_dtype=torch_dtype)
                 for name, loader in (("vae", AutoencoderKL), ("unet", UNet2DConditionModel))}
        for name, loader in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            parts[name] = loader.from_pretrained(root / SSD1B_SUBFOLDERS[name], dtype=torch_dtype)
        for name in ("tokenizer", "tokenizer_2"):
            parts[name] = AutoTokenizer.from_pretrained(root / SSD1B_SUBFOLDERS[name])
        return cls.from_parts(parts, **kwargs)

    @classmethod
    def from_parts(cls, parts: dict, **kwargs) -> SSD1BFirstFrameGenerator:
        """SDXL's pipeline with the reference LCM scheduler around ``parts`` (vae, unet, text_encoder(_2),
        tokenizer(_2)): the PyTorch models, or the ONNX Runtime graphs of an exported folder."""
        from diffusers import LCMScheduler, StableDiffusionXLPipeline

        scheduler = LCMScheduler(set_alpha_to_one=False, original_inference_steps=4, steps_offset=1)
        pipe = StableDiffusionXLPipeline(scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                         add_watermarker=False, **parts)
        return cls(pipe, **kwargs)

    def save_pretrained(self, root: str | Path) -> None:
        for name, sub in SSD1B_SUBFOLDERS.items():
            getattr(self.pipe, name).save_pretrained(Path(root) / sub)

    def to(self, *args, **kwargs) -> SSD1BFirstFrameGenerator:
        self.pipe.to(*args, **kwargs)
        return self

    def first_frame_latents(self, pipe, prompts: list[str], negative_prompt: str, height: int, width: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """SSD-1B's image (no CFG, so no negative prompt), encoded by the pipeline's VAE."""
        return pipe.encode_first_frame(self(prompts, height, width, generator), generator)

    @torch.no_grad()
    def __call__(self, prompts: list[str], height: int, width: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Images ``[B, 3, height, width]`` in [-1, 1]."""
        images = self.pipe(prompt=prompts, num_inference_steps=len(self.timesteps), timesteps=list(self.timesteps),
                           guidance_scale=0.0, height=self.image_height, width=self.image_width,
                           generator=generator, output_type="pil").images
        return pil_to_tensor(images, height, width)


LATENT_UNET_SUBFOLDER = "first_frame_unet"


def latent_unet(latent_channels: int, text_dim: int, pooled_dim: int, sample_size: int,
                block_out_channels: tuple[int, ...] = (64, 96, 96), attention_head_dim: int = 32,
                time_embedding_dim: int = 256) -> UNet2DConditionModel:
    """A text-conditioned UNet on one latent frame: residual blocks at every level, cross-attention to the text
    tokens below the full resolution (where a nano object spans a token or two), the pooled text vector added to
    the time embedding."""
    levels = len(block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=1, down_block_types=down,
        up_block_types=up, cross_attention_dim=text_dim, attention_head_dim=attention_head_dim,
        norm_num_groups=16, time_embedding_dim=time_embedding_dim, class_embed_type="projection",
        projection_class_embeddings_input_dim=pooled_dim)


class LatentFirstFrameGenerator(torch.nn.Module):
    """Frame 0 by rectified flow in the video VAE's normalised latent space (the SSD-1B role at nano scale).

    The UNet predicts the velocity ``noise - latent`` at ``x = (1 - sigma) latent + sigma noise`` (timestep
    ``1000 sigma``); sampling takes ``num_inference_steps`` Euler steps from sigma 1 to 0 with classifier-free
    guidance against the negative prompt. It reads the pipeline's text encoder directly (tokens, mask, pooled),
    not the DiT's ContextAdapter.
    """

    def __init__(self, unet: UNet2DConditionModel, num_inference_steps: int = 20, guidance_scale: float = 4.0):
        super().__init__()
        self.unet = unet
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale

    @classmethod
    def from_pretrained(cls, root: str | Path, num_inference_steps: int = 20, guidance_scale: float = 4.0,
                        torch_dtype: torch.dtype | None = None) -> LatentFirstFrameGenerator:
        """The ``first_frame_unet/`` of a checkpoint folder."""
        folder = Path(root) / LATENT_UNET_SUBFOLDER
        if not folder.is_dir():
            raise FileNotFoundError(f"Hybrid mode needs the first-frame UNet, but {root} has no "
                                    f"{LATENT_UNET_SUBFOLDER}/; use mode='monolithic' or a folder that has one.")
        dtype_kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        return cls(UNet2DConditionModel.from_pretrained(folder, **dtype_kw), num_inference_steps, guidance_scale)

    def save_pretrained(self, root: str | Path) -> None:
        self.unet.save_pretrained(Path(root) / LATENT_UNET_SUBFOLDER)

    def forward(self, latents: torch.Tensor, sigmas: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """The predicted velocity for latents ``[B, C, h, w]`` at noise levels ``sigmas`` ``[B]``."""
        dtype = self.unet.dtype
        return self.unet(latents.to(dtype), sigmas.to(dtype) * 1000, encoder_hidden_states=tokens.to(dtype),
                         encoder_attention_mask=mask, class_labels=pooled.to(dtype)).sample

    @torch.no_grad()
    def first_frame_latents(self, pipe, prompts: list[str], negative_prompt: str, height: int, width: int,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        """Frame 0 as the normalised latent ``[B, C, 1, h, w]``; the noise is drawn on the CPU (in fp32), so a
        seed gives the same frame on every device."""
        use_cfg = self.guidance_scale > 1.0
        text = pipe.text_encoder.encode(prompts if not use_cfg else [negative_prompt] * len(prompts) + prompts)
        tokens, mask, pooled = (t.to(pipe.device) for t in (text.tokens, text.mask, text.pooled))
        down = pipe.vae.config.spatial_downsample_scale
        shape = (len(prompts), self.unet.config.in_channels, height // down, width // down)
        latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        latents = latents.to(pipe.device)
        sigmas = torch.linspace(1.0, 0.0, self.num_inference_steps + 1)
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:], strict=True):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            velocity = self(model_input, sigma.expand(len(model_input)), tokens, mask, pooled).float()
            if use_cfg:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + self.guidance_scale * (cond - uncond)
            latents = pipe.scheduler.step(velocity, sigma, next_sigma, latents)  # the pipeline's Euler step
        return latents.unsqueeze(2).to(pipe.transformer.dtype)
