"""First-frame generators for hybrid mode: a text-to-image model that makes frame 0 of the video.

A generator is a registered component of ``NeodragonPipeline`` (``first_frame_generator``): it returns frame 0 as
the DiT's normalised latent, and saves itself into the checkpoint folder. The release uses SSD-1B (an SDXL UNet)
with an LCM scheduler at 640x1024, downsized to the DiT resolution and VAE-encoded as in the reference; any
other image model can stand behind the same call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
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
        from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
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
