"""NeodragonPipeline: text -> pyramidal-flow MMDiT (autoregressive over latent frames) -> VAE decoder -> SR.

``hybrid`` makes frame 0 with a separate image generator and the rest with a step-distilled DiT (1 step per
stage, no CFG); ``monolithic`` makes every frame with a multi-step DiT and classifier-free guidance.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image
from safetensors import SafetensorError

from ..models.context_adapter import ContextAdapter
from ..models.first_frame import FirstFrameGenerator, LatentFirstFrameGenerator, SSD1BFirstFrameGenerator
from ..models.mmdit import PyramidMMDiT
from ..models.sentence import SentenceTextEncoder, is_sentence_encoder_folder
from ..models.sr import QuickSRNet
from ..models.text import TextEncoderBundle, TextEncoding
from ..models.vae import LATENT_STATISTICS, AsymmetricCausalVideoVAE
from ..schedulers import PyramidFlowMatchScheduler

MODES = ("hybrid", "monolithic")
PIPELINE_CONFIG = "pipeline_config.json"
# Frames the super-resolution model upscales per call: the whole nano video at once, and at the official 320x512 a
# bounded activation memory (a 64-channel layer of 16 frames at 640x1024 is 2 GiB in float32).
SR_FRAMES_PER_CALL = 16
SUBFOLDERS = {
    "vae": "causal_video_vae",
    "super_resolution": "super_resolution",
    ("hybrid", "transformer"): "diffusion_transformer_320p",
    ("hybrid", "context_adapter"): "context_adapter",
    ("monolithic", "transformer"): "diffusion_transformer_320p_multistep_t2v",
    ("monolithic", "context_adapter"): "context_adapter_multistep_t2v",
}
DEFAULT_NEGATIVE_PROMPT = (
    "cartoon style, worst quality, low quality, blurry, absolute black, absolute white, low res, extra limbs, "
    "extra digits, misplaced objects, mutated anatomy, monochrome, horror"
)


@dataclass
class ModeDefaults:
    """Sampling defaults of one mode (unit 0 = first latent frame, units >= 1 = the rest)."""

    num_inference_steps: list[int]
    video_num_inference_steps: list[int]
    guidance_scale: float
    video_guidance_scale: float


@dataclass
class PipelineConfig:
    """Generation defaults; ``pipeline_config.json`` in a checkpoint folder overrides them.

    The official release has no such file, so the defaults are the reference values (49 x 320 x 512). The latent
    normalisation constants belong to the VAE (``AsymmetricCausalVideoVAE.normalize_latents``).
    """

    height: int = 320
    width: int = 512
    num_frames: int = 49
    fps: int = 24
    default_mode: str = "hybrid"
    # "ssd_1b", "latent_unet" (the nano generator, first_frame_unet/) or "pyramid_dit" (the multi-step DiT pair)
    first_frame: str = "ssd_1b"
    first_frame_height: int = 640  # SSD-1B renders at 640x1024; the image is downsized to the video size
    first_frame_width: int = 1024
    first_frame_steps: int = 20  # Euler steps and guidance of the latent_unet generator
    first_frame_guidance: float = 4.0
    # the DiT of hybrid mode's later frames: "distilled" (the release's step-distilled pair) or "multistep" (the
    # monolithic pair, until a step-distilled DiT exists; the hybrid mode's defaults then set its steps and CFG)
    hybrid_dit: str = "distilled"
    prompt_modifier: str = ", hyper quality, Ultra HD, 8K"
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    modes: dict[str, ModeDefaults] = field(default_factory=lambda: {
        "hybrid": ModeDefaults([1, 1, 1], [1, 1, 1], 0.0, 0.0),
        "monolithic": ModeDefaults([20, 20, 20], [10, 10, 10], 7.0, 5.0),
    })

    @classmethod
    def load(cls, root: Path) -> PipelineConfig:
        path = root / PIPELINE_CONFIG
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it.") from err
        moved = sorted(set(data) & set(LATENT_STATISTICS))
        if moved:
            raise ValueError(f"{path} holds the latent constants {moved}, which now live in the VAE's config: move "
                             f"them into {SUBFOLDERS['vae']}/config.json (same keys) and delete them here.")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{path} has unknown keys {unknown}; remove them (known: "
                             f"{', '.join(f.name for f in fields(cls))}).")
        modes = {name: ModeDefaults(**values) for name, values in data.pop("modes", {}).items()}
        config = cls(**data)
        config.modes.update(modes)
        return config

    def save(self, root: Path) -> None:
        (root / PIPELINE_CONFIG).write_text(json.dumps(asdict(self), indent=2))

    def with_latent_first_frame(self, steps: int, guidance: float, hybrid_default: bool = True) -> PipelineConfig:
        """This (monolithic) config with a hybrid mode, its default unless ``hybrid_default`` is False: frame 0 from
        the ``latent_unet`` generator with ``steps`` and ``guidance``, the later frames from the multi-step DiT with
        the monolithic mode's later-frame steps and guidance."""
        later = self.modes["monolithic"]
        hybrid = ModeDefaults(later.video_num_inference_steps, later.video_num_inference_steps,
                              later.video_guidance_scale, later.video_guidance_scale)
        default_mode = "hybrid" if hybrid_default else self.default_mode
        return replace(self, default_mode=default_mode, first_frame="latent_unet", hybrid_dit="multistep",
                       first_frame_steps=steps, first_frame_guidance=guidance, modes={**self.modes, "hybrid": hybrid})



@dataclass
class NeodragonPipelineOutput(BaseOutput):
    """``frames``: PIL lists per video, ``np`` [B, F, H, W, 3] or ``pt`` [B, F, 3, H, W] in [0, 1], or latents."""

    frames: Any


@dataclass
class _Conditioning:
    context: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def cat(self, other: _Conditioning) -> _Conditioning:
        return _Conditioning(*(torch.cat([a, b]) for a, b in zip(
            (self.context, self.mask, self.pooled), (other.context, other.mask, other.pooled), strict=True)))


@dataclass
class _Plan:
    """What one call generates; unit 0 (the first latent frame) has its own steps and guidance."""

    prompts: list[str]
    height: int
    width: int
    latent_frames: int
    first_unit: int
    stage_steps: tuple[list[int], list[int]]
    scales: tuple[float, float]

    @property
    def units(self) -> range:
        return range(self.first_unit, self.latent_frames)

    def steps(self, unit: int) -> list[int]:
        return self.stage_steps[min(unit, 1)]

    def guidance(self, unit: int) -> float:
        return self.scales[min(unit, 1)]


class NeodragonPipeline(DiffusionPipeline):
    """Text-to-video with a pyramidal-flow MMDiT; see the module docstring for the two modes."""

    model_cpu_offload_seq = "text_encoder->context_adapter->transformer->vae->super_resolution"
    _optional_components = ["context_adapter", "first_frame_generator", "super_resolution"]

    def __init__(self, text_encoder: TextEncoderBundle | SentenceTextEncoder, context_adapter: ContextAdapter | None,
                 transformer: PyramidMMDiT,
                 vae: AsymmetricCausalVideoVAE, scheduler: PyramidFlowMatchScheduler, mode: str = "hybrid",
                 first_frame_generator: FirstFrameGenerator | None = None, super_resolution: QuickSRNet | None = None,
                 pipeline_config: PipelineConfig | None = None):
        super().__init__()
        _check_mode(mode)
        self.register_modules(text_encoder=text_encoder, context_adapter=context_adapter, transformer=transformer,
                              vae=vae, scheduler=scheduler, first_frame_generator=first_frame_generator,
                              super_resolution=super_resolution)
        self.mode = mode
        self.pipeline_config = pipeline_config or PipelineConfig()

    # -- loading and saving -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, mode: str | None = None,
                        torch_dtype: torch.dtype | None = None, load_super_resolution: bool = True,
                        cache_dir: str | Path | None = None, revision: str | None = None) -> NeodragonPipeline:
        """Load a checkpoint folder in the official layout (or a hub id, which needs the network).

        Only the components of ``mode`` are loaded: the hybrid and monolithic DiT/adapter pairs are trained
        pairs and are never mixed.
        """
        root = resolve_checkpoint(pretrained_model_name_or_path, cache_dir=cache_dir, revision=revision)
        config = PipelineConfig.load(root)
        mode = mode or config.default_mode
        _check_mode(mode)
        dtype_kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        parts = {
            "text_encoder": load_text_stack(root, **dtype_kw),
            **_load_dit_pair(root, dit_mode(config, mode), dtype_kw),
            "vae": _load(AsymmetricCausalVideoVAE, root, SUBFOLDERS["vae"], dtype_kw),
        }
        sr_dir = root / SUBFOLDERS["super_resolution"]
        if load_super_resolution and sr_dir.is_dir():
            parts["super_resolution"] = _load(QuickSRNet, root, SUBFOLDERS["super_resolution"], dtype_kw)
        scheduler_dir = root / "scheduler"
        scheduler = (PyramidFlowMatchScheduler.from_pretrained(scheduler_dir) if scheduler_dir.is_dir()
                     else PyramidFlowMatchScheduler())  # the release builds its scheduler from code defaults
        first_frame = _load_first_frame(root, config, dtype_kw) if mode == "hybrid" else None
        return cls(scheduler=scheduler, mode=mode, first_frame_generator=first_frame, pipeline_config=config, **parts)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write the official folder layout (plus ``pipeline_config.json`` and ``scheduler/``)."""
        root = Path(save_directory)
        root.mkdir(parents=True, exist_ok=True)
        self.text_encoder.save_pretrained(root)
        pair = dit_mode(self.pipeline_config, self.mode)
        self.transformer.save_pretrained(root / SUBFOLDERS[pair, "transformer"])
        if self.context_adapter is not None:
            self.context_adapter.save_pretrained(root / SUBFOLDERS[pair, "context_adapter"])
        self.vae.save_pretrained(root / SUBFOLDERS["vae"])
        self.scheduler.save_pretrained(root / "scheduler")
        if self.super_resolution is not None:
            self.super_resolution.save_pretrained(root / SUBFOLDERS["super_resolution"])
        if self.first_frame_generator is not None:
            self.first_frame_generator.save_pretrained(root)
        self.pipeline_config.save(root)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def to(self, *args, **kwargs) -> NeodragonPipeline:
        """Move/cast every component, like ``nn.Module.to`` (device and/or dtype, positional or keyword)."""
        for module in (self.text_encoder, self.context_adapter, self.transformer, self.vae, self.super_resolution,
                       self.first_frame_generator):
            if module is not None:
                module.to(*args, **kwargs)
        return self

    # -- generation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | list[int] | None = None,
        video_num_inference_steps: int | list[int] | None = None,
        guidance_scale: float | None = None,
        video_guidance_scale: float | None = None,
        negative_prompt: str | None = None,
        prompt_modifier: str | None = None,
        generator: torch.Generator | None = None,
        super_resolution: bool = False,
        output_type: str = "pil",
        callback_on_step_end: Callable[[NeodragonPipeline, int, float, dict], dict | None] | None = None,
        return_dict: bool = True,
    ) -> NeodragonPipelineOutput | tuple:
        """Generate one video per prompt.

        Step counts are per pyramid stage (an int means the same for every stage); unit 0 (the first latent
        frame) uses ``num_inference_steps``/``guidance_scale`` and later units the ``video_*`` values, which default
        to the unit-0 values given in the call, else to the mode's defaults (as `neodragon generate --steps` and
        ``--guidance`` do). CFG runs wherever the applicable guidance scale is > 1.
        ``super_resolution=True`` upscales the decoded frames with the checkpoint's ``super_resolution/`` model (2x for
        QuickSRNet), a batch of frames per call; off by default here (`neodragon generate` turns it on when the model
        has one).
        ``callback_on_step_end(pipe, step, timestep, state)`` gets ``state = {"latents", "unit", "stage"}`` and may
        return ``{"latents": ...}`` to replace them.
        """
        plan = self._plan(prompt, num_frames, height, width, num_inference_steps, video_num_inference_steps,
                          guidance_scale, video_guidance_scale, prompt_modifier)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent'; got {output_type!r}.")
        if super_resolution and self.super_resolution is None:
            raise ValueError("This checkpoint has no super_resolution/ component; generate without SR.")

        negative = self.pipeline_config.negative_prompt if negative_prompt is None else negative_prompt
        cond = self.encode_prompt(plan.prompts)
        uncond = None
        if any(plan.guidance(unit) > 1.0 for unit in plan.units):
            uncond = self.encode_prompt([negative] * len(plan.prompts))

        generated = []
        if self.mode == "hybrid":
            generated.append(self._first_frame_latent(plan.prompts, negative, plan.height, plan.width, generator))
        stage0_noise = self.prepare_noise(len(plan.prompts), plan.latent_frames, plan.height, plan.width, generator)
        pyramids = [self.scheduler.latent_pyramid(frame) for frame in generated]  # each frame resized once
        with self.progress_bar(total=sum(sum(plan.steps(unit)) for unit in plan.units)) as progress:
            for unit in plan.units:
                scale = plan.guidance(unit)
                history = self.scheduler.history_from_pyramids(pyramids) if pyramids else None
                latents = self.sample_unit(stage0_noise[:, :, unit : unit + 1], history,
                                           uncond.cat(cond) if scale > 1.0 else cond, plan.steps(unit), scale,
                                           generator, unit, progress, callback_on_step_end)
                generated.append(latents)
                pyramids.append(self.scheduler.latent_pyramid(latents))
        latents = torch.cat(generated, dim=2)
        if output_type == "latent":
            return NeodragonPipelineOutput(frames=latents) if return_dict else (latents,)
        video = self.decode_latents(latents)
        if super_resolution:  # every frame of the batch, a chunk of frames per call
            video = self.super_resolution.upscale_video(video, SR_FRAMES_PER_CALL)
        frames = _postprocess(video, output_type)
        return NeodragonPipelineOutput(frames=frames) if return_dict else (frames,)

    def _plan(self, prompt, num_frames, height, width, steps, video_steps, guidance, video_guidance,
              prompt_modifier) -> _Plan:
        """Validate the call and fill every unset value from the mode's defaults."""
        cfg, defaults = self.pipeline_config, self.pipeline_config.modes[self.mode]
        num_frames = cfg.num_frames if num_frames is None else num_frames
        height, width = cfg.height if height is None else height, cfg.width if width is None else width
        self._check_geometry(num_frames, height, width)
        stages = self.scheduler.config.stages
        modifier = cfg.prompt_modifier if prompt_modifier is None else prompt_modifier
        prompts = [p + modifier for p in _check_prompts(prompt)]
        self._warn_truncated(prompts)
        video_steps = steps if video_steps is None else video_steps
        video_guidance = guidance if video_guidance is None else video_guidance
        return _Plan(
            prompts=prompts, height=height, width=width,
            latent_frames=(num_frames - 1) // self.vae.config.temporal_downsample_scale + 1,
            first_unit=1 if self.mode == "hybrid" else 0,
            stage_steps=(_steps(steps, defaults.num_inference_steps, stages),
                         _steps(video_steps, defaults.video_num_inference_steps, stages)),
            scales=(defaults.guidance_scale if guidance is None else guidance,
                    defaults.video_guidance_scale if video_guidance is None else video_guidance),
        )

    def _warn_truncated(self, prompts: list[str]) -> None:
        """Say when a prompt is longer than the text encoder reads, and by how much (it would be cut silently)."""
        limit = self.text_encoder.max_sequence_length
        for index, count in enumerate(self.text_encoder.token_counts(prompts)):
            if count > limit:
                where = f"Prompt {index + 1}" if len(prompts) > 1 else "The prompt"
                warnings.warn(f"{where} is {count} tokens long, but the text encoder reads only the first {limit}: "
                              f"the last {count - limit} tokens are ignored. Shorten it to keep all of it.",
                              UserWarning, stacklevel=4)

    def encode_prompt(self, prompts: list[str]) -> _Conditioning:
        """Text stack (tokens, mask, pooled), then the ContextAdapter on the token stream when there is one (a
        DiT with a ``context_embedder`` takes the raw tokens)."""
        return self.encode_prompt_with(prompts, self.context_adapter)

    def encode_prompt_with(self, prompts: list[str], adapter: ContextAdapter | None) -> _Conditioning:
        """``encode_prompt`` through another DiT's ContextAdapter (a first-frame generator's own pair)."""
        encoding: TextEncoding = self.text_encoder.encode(prompts)
        dtype, context = self.transformer.dtype, encoding.tokens.to(self.device)
        if adapter is not None:
            context = adapter(context.to(adapter.dtype))
        return _Conditioning(context.to(dtype), encoding.mask.to(self.device), encoding.pooled.to(self.device, dtype))

    def prepare_noise(self, batch: int, latent_frames: int, height: int, width: int,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Full-resolution noise, reduced to stage 0 by the noise pyramid (drawn in fp32 on the CPU so that a
        seed gives the same video on every device)."""
        down = self.vae.config.spatial_downsample_scale
        shape = (batch, self.transformer.config.in_channels, latent_frames, height // down, width // down)
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        return self.scheduler.noise_pyramid(noise)[0].to(self.device, self.transformer.dtype)

    def sample_unit(self, latents: torch.Tensor, history: list[list[torch.Tensor]] | None, cond: _Conditioning,
                    steps: list[int], guidance_scale: float, generator: torch.Generator | None = None,
                    unit: int = 0, progress=None, callback: Callable | None = None,
                    transformer: PyramidMMDiT | None = None) -> torch.Tensor:
        """Generate one latent frame from its stage-0 noise through the pyramid stages: Euler steps per stage, then
        upsample+renoise. ``transformer`` is the pipeline's own unless a first-frame generator passes its DiT."""
        transformer = transformer or self.transformer
        use_cfg = guidance_scale > 1.0
        for stage in range(len(steps)):
            num_steps = steps[stage]
            if stage > 0:
                latents = self.scheduler.upsample_and_renoise(latents, stage, generator=generator)
            timesteps = self.scheduler.stage_timesteps(num_steps, stage)
            sigmas = self.scheduler.stage_sigmas(num_steps, stage).to(latents.dtype)
            clips = history[stage] if history else []
            if use_cfg:
                clips = [torch.cat([clip, clip]) for clip in clips]
            for i, timestep in enumerate(timesteps):
                model_input = torch.cat([latents, latents]) if use_cfg else latents
                t = timestep.to(self.device, latents.dtype).expand(model_input.shape[0])
                velocity = transformer([clips + [model_input]], cond.context, cond.mask, cond.pooled, t)[0]
                if use_cfg:
                    uncond, text = velocity.chunk(2)
                    velocity = uncond + guidance_scale * (text - uncond)
                latents = self.scheduler.step(velocity, sigmas[i], sigmas[i + 1], latents)
                if callback is not None:
                    update = callback(self, i, float(timestep), {"latents": latents, "unit": unit, "stage": stage})
                    latents = (update or {}).get("latents", latents)
                if progress is not None:
                    progress.update()
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Un-normalise (``vae.denormalize_latents``) and decode."""
        return self.vae.decode(self.vae.denormalize_latents(latents).to(self.vae.dtype)).sample.float()

    def _first_frame_latent(self, prompts: list[str], negative_prompt: str, height: int, width: int,
                            generator: torch.Generator | None) -> torch.Tensor:
        """Frame 0 of hybrid mode as a normalised latent ``[B, C, 1, h, w]``, from the first-frame generator."""
        if self.first_frame_generator is None:
            raise ValueError("Hybrid mode needs a first-frame generator; load the checkpoint with mode='hybrid' "
                             "from a folder that has one, or use mode='monolithic'.")
        return self.first_frame_generator.first_frame_latents(self, prompts, negative_prompt, height, width,
                                                              generator)

    def encode_first_frame(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """An image ``[B, 3, H, W]`` in [-1, 1] as frame 0's normalised latent (a posterior sample, as in the
        reference)."""
        image = image.to(self.device, self.vae.dtype).unsqueeze(2)
        z = self.vae.encode(image).latent_dist.sample(generator=generator)
        return self.vae.normalize_latents(z).to(self.transformer.dtype)

    def _check_geometry(self, num_frames: int, height: int, width: int) -> None:
        t_down = self.vae.config.temporal_downsample_scale
        if num_frames < 1 or (num_frames - 1) % t_down:
            raise ValueError(f"num_frames must be 1 + {t_down}k (e.g. {1 + t_down}, {1 + 2 * t_down}, "
                             f"{1 + 6 * t_down}); got {num_frames}.")
        factor = (self.vae.config.spatial_downsample_scale * self.transformer.config.patch_size
                  * 2 ** (self.scheduler.config.stages - 1))
        if height <= 0 or width <= 0 or height % factor or width % factor:
            raise ValueError(f"height and width must be positive multiples of {factor} (VAE x patch x pyramid "
                             f"factor); got {height}x{width}.")


class PyramidFirstFrameGenerator(torch.nn.Module):
    """Frame 0 from the multi-step DiT/adapter pair (the monolithic pair): text-to-image by pyramidal flow, for
    presets that have no separate image model. It samples in the pipeline's latent space, so no VAE round trip."""

    def __init__(self, transformer: PyramidMMDiT, context_adapter: ContextAdapter | None,
                 num_inference_steps: list[int], guidance_scale: float):
        super().__init__()
        self.transformer, self.context_adapter = transformer, context_adapter
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale

    @classmethod
    def from_pretrained(cls, root: str | Path, config: PipelineConfig,
                        torch_dtype: torch.dtype | None = None) -> PyramidFirstFrameGenerator:
        """The monolithic pair of a checkpoint folder, sampled with the monolithic mode's frame-0 defaults."""
        dtype_kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        defaults = config.modes["monolithic"]
        return cls(**_load_dit_pair(Path(root), "monolithic", dtype_kw),
                   num_inference_steps=defaults.num_inference_steps, guidance_scale=defaults.guidance_scale)

    def save_pretrained(self, root: str | Path) -> None:
        self.transformer.save_pretrained(Path(root) / SUBFOLDERS["monolithic", "transformer"])
        if self.context_adapter is not None:
            self.context_adapter.save_pretrained(Path(root) / SUBFOLDERS["monolithic", "context_adapter"])

    @torch.no_grad()
    def first_frame_latents(self, pipe: NeodragonPipeline, prompts: list[str], negative_prompt: str, height: int,
                            width: int, generator: torch.Generator | None = None) -> torch.Tensor:
        use_cfg = self.guidance_scale > 1.0
        cond = pipe.encode_prompt_with(prompts, self.context_adapter)
        if use_cfg:
            cond = pipe.encode_prompt_with([negative_prompt] * len(prompts), self.context_adapter).cat(cond)
        noise = pipe.prepare_noise(len(prompts), 1, height, width, generator)
        return pipe.sample_unit(noise, None, cond, self.num_inference_steps, self.guidance_scale, generator,
                                transformer=self.transformer)


# -- helpers ----------------------------------------------------------------------------------------------


def resolve_checkpoint(name_or_path: str | Path, cache_dir: str | Path | None = None,
                       revision: str | None = None) -> Path:
    """A local folder, or a hub id downloaded on explicit request (fails clearly when offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).count("/") != 1:
        raise FileNotFoundError(f"{name_or_path!r} is neither a checkpoint folder nor a hub id like "
                                "'Qualcomm-AI-Research/Neodragon'.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), cache_dir=cache_dir, revision=revision))
    except Exception as err:  # network, auth and missing-repo errors all end here
        raise OSError(f"Could not download {name_or_path!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
                      "Check the network, or download the folder elsewhere and pass its local path.") from err


def load_text_stack(root: str | Path,
                    torch_dtype: torch.dtype | None = None) -> TextEncoderBundle | SentenceTextEncoder:
    """The text stack of a checkpoint folder: a sentence encoder (the nano teacher) or the release's bundle."""
    text_stack = SentenceTextEncoder if is_sentence_encoder_folder(Path(root)) else TextEncoderBundle
    return text_stack.from_pretrained(root, **({"torch_dtype": torch_dtype} if torch_dtype is not None else {}))


def _load(cls, root: Path, subfolder: str, dtype_kw: dict):
    if not (root / subfolder).is_dir():
        raise FileNotFoundError(f"Checkpoint folder {root} has no {subfolder}/ component; it is needed for "
                                f"{cls.__name__}. Check the path, or re-create the folder with save_pretrained.")
    try:
        return cls.from_pretrained(root / subfolder, **dtype_kw)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # SafetensorError: a truncated file
        raise ValueError(f"Could not load {cls.__name__} from {root / subfolder}: {err}. Check that config.json "
                         "and the weights belong to the same model and that the weight file is complete "
                         "(re-download or re-export the component).") from err


def _load_dit_pair(root: Path, mode: str, dtype_kw: dict) -> dict:
    """The DiT and ContextAdapter of one mode; the adapter may be absent when the DiT has a context_embedder."""
    if not (root / SUBFOLDERS[mode, "transformer"]).is_dir():
        other = next(m for m in MODES if m != mode)
        raise FileNotFoundError(f"{root} has no {mode}-mode DiT ({SUBFOLDERS[mode, 'transformer']}/); "
                                f"use mode='{other}' (--mode {other}) or a checkpoint with that component.")
    transformer = _load(PyramidMMDiT, root, SUBFOLDERS[mode, "transformer"], dtype_kw)
    adapter_dir = SUBFOLDERS[mode, "context_adapter"]
    if not (root / adapter_dir).is_dir() and transformer.context_embedder is not None:
        return {"transformer": transformer, "context_adapter": None}
    return {"transformer": transformer, "context_adapter": _load(ContextAdapter, root, adapter_dir, dtype_kw)}


def dit_mode(config: PipelineConfig, mode: str) -> str:
    """Whose DiT/adapter pair ``mode`` runs: its own, or the monolithic pair for a hybrid mode without a distilled
    DiT (``hybrid_dit = "multistep"``)."""
    if config.hybrid_dit not in ("distilled", "multistep"):
        raise ValueError(f"Unknown hybrid_dit {config.hybrid_dit!r} in {PIPELINE_CONFIG}; use 'distilled' or "
                         "'multistep'.")
    return "monolithic" if mode == "hybrid" and config.hybrid_dit == "multistep" else mode


def _load_first_frame(root: Path, config: PipelineConfig, dtype_kw: dict) -> FirstFrameGenerator:
    if config.first_frame == "latent_unet":
        return LatentFirstFrameGenerator.from_pretrained(root, config.first_frame_steps, config.first_frame_guidance,
                                                         **dtype_kw)
    if config.first_frame == "ssd_1b":
        return SSD1BFirstFrameGenerator.from_pretrained(root, image_height=config.first_frame_height,
                                                        image_width=config.first_frame_width, **dtype_kw)
    if config.first_frame == "pyramid_dit":
        return PyramidFirstFrameGenerator.from_pretrained(root, config, **dtype_kw)
    raise ValueError(f"Unknown first_frame {config.first_frame!r} in {root / PIPELINE_CONFIG}; "
                     "use 'ssd_1b', 'latent_unet' or 'pyramid_dit'.")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")


def _check_prompts(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("Every prompt must be a non-empty string, e.g. 'a red circle moving to the right'.")
    return prompts


def _steps(value: int | list[int] | None, default: list[int], stages: int) -> list[int]:
    steps = default if value is None else ([value] * stages if isinstance(value, int) else list(value))
    if len(steps) != stages or any(not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError(f"Step counts must be {stages} positive integers (one per pyramid stage); got {value}.")
    return steps


def _postprocess(video: torch.Tensor, output_type: str):
    frames = (video.clamp(-1, 1) * 0.5 + 0.5).permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W] in [0, 1]
    if output_type == "pt":
        return frames
    array = frames.permute(0, 1, 3, 4, 2).cpu().numpy()
    if output_type == "np":
        return array
    uint8 = np.clip(array * 255.0, 0, 255).astype(np.uint8)  # truncation, as the reference converts
    return [[Image.fromarray(frame) for frame in video_frames] for video_frames in uint8]


__all__ = ["NeodragonPipeline", "NeodragonPipelineOutput", "PipelineConfig", "ModeDefaults",
           "PyramidFirstFrameGenerator", "resolve_checkpoint"]
