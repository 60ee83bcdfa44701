"""Presets: one name per model, each saying what it loads.

- ``nano``: whatever ships as the default model (today the nano teacher, trained on ShapesWorld, bundled).
- ``nano-teacher``: the nano teacher (bundled), the model the compression recipes start from.
- ``nano-student``: the student architecture the recipes compress into (DT5 + ContextAdapter text stack, a
  lighter decoder); untrained until a recipe trains it, so it loads with random weights.
- ``official-reduced``: the release's layout, classes and 16-channel latent at test size (random weights).

The release itself (``official``) is not a preset: its checkpoint folder (a path or a hub id) loads directly, with
the code defaults of every class being the release's configuration. ``create_random_checkpoint`` writes a complete
folder in the official layout with seeded random weights, which is how tests and benchmarks exercise the real
loading path without the released weights.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .data import caption_vocabulary
from .models.context_adapter import ContextAdapter
from .models.mmdit import PyramidMMDiT
from .models.sentence import SentenceTextEncoder
from .models.sr import QuickSRNet
from .models.text import StudentTextConfig, TextEncoderBundle, student_text_stack, subset_tokenizer, tiny_text_bundle
from .models.vae import AsymmetricCausalVideoVAE
from .pipelines.neodragon import SUBFOLDERS, ModeDefaults, NeodragonPipeline, PipelineConfig
from .schedulers import PyramidFlowMatchScheduler
from .utils.checkpoint import package_weights, packaged_model_dir

# The nano tokenizers' vocabulary: every word of ShapesWorld's captions, plus the prompt-modifier words.
NANO_VOCAB = (*caption_vocabulary(), *"hyper quality ultra hd 8k cinematic realistic textures high detail".split())


@dataclass
class Preset:
    """Configs of every component of a checkpoint folder (random-weight builder input)."""

    name: str
    dit: dict
    context_adapter: dict | None  # None: the DiT reads the text tokens through its own context_embedder
    vae: dict
    # tiny_text_bundle arguments, {"sentence_encoder": name, "max_sequence_length": n}, or the distilled student of
    # such an encoder: {"distilled_from": name, "max_sequence_length": n, "student": StudentTextConfig}
    text: dict
    pipeline: PipelineConfig
    super_resolution: dict | None = None
    ssd_1b: dict | None = None
    modes: tuple[str, ...] = ("hybrid", "monolithic")


def nano_student_preset() -> Preset:
    """The nano student, what the compression recipes make of the nano teacher: 17 frames at 128x128 (2x SR to
    256x256), the teacher's 8-channel latent space and 6-block 128-wide DiT, read through the distilled text stack
    (DT5 + ContextAdapter, small pooled encoders, the teacher's tokenizer cut to the caption vocabulary;
    `neodragon distill text-encoder`) and decoded by the distilled 64,32,16,16 decoder (`neodragon distill
    decoder`)."""
    text = StudentTextConfig()
    return Preset(
        name="nano-student",
        dit=dict(sample_size=16, patch_size=2, in_channels=8, num_layers=6, attention_head_dim=32,
                 num_attention_heads=4, caption_projection_dim=128, pooled_projection_dim=384,
                 pos_embed_max_size=16, max_num_frames=32, joint_attention_dim=384),
        context_adapter=text.adapter_config(output_dims=128),
        vae=dict(encoder_out_channels=8, encoder_layers_per_block=[1, 1, 1, 1],
                 encoder_block_out_channels=[16, 32, 64, 64], encoder_norm_num_groups=0,
                 decoder_num_features=[64, 32, 16, 16], sample_size=128),
        text={"distilled_from": "all-MiniLM-L6-v2", "max_sequence_length": 32, "student": text},
        super_resolution=dict(num_channels=32, num_intermediate_layers=2),
        pipeline=PipelineConfig(
            height=128, width=128, num_frames=17, fps=8, default_mode="monolithic", first_frame="pyramid_dit",
            prompt_modifier="", negative_prompt="",
            modes={"hybrid": ModeDefaults([1, 1, 1], [1, 1, 1], 0.0, 0.0),
                   "monolithic": ModeDefaults([8, 8, 8], [4, 4, 4], 5.0, 4.0)},
        ),
    )


def nano_teacher_preset() -> Preset:
    """The nano world's "Pyramid-Flow": frozen MiniLM text stack (384-d tokens through a context_embedder,
    mean-pooled sentence vector), a VAE decoder about 2x heavier than the student's, and a multi-step DiT with CFG.

    The encoder has no normalisation and the decoder is TAEHV-style: with per-frame GroupNorm (in the encoder
    or in the native causal decoder) the VAE stalled at mean-colour reconstructions on ShapesWorld's flat frames
    (docs/journal/nano-teacher.md)."""
    student = nano_student_preset()
    return Preset(
        name="nano-teacher",
        dit={**student.dit, "use_context_embedder": True},
        context_adapter=None,
        vae={**student.vae, "decoder_num_features": [96, 64, 48, 48]},
        text={"sentence_encoder": "all-MiniLM-L6-v2", "max_sequence_length": 32},
        super_resolution=student.super_resolution,
        # 20 Euler steps per stage for frame 0: more named shapes than 8 at +36 DiT calls
        # (docs/journal/nano-teacher.md)
        pipeline=replace(student.pipeline, modes={
            **student.pipeline.modes,
            "monolithic": replace(student.pipeline.modes["monolithic"], num_inference_steps=[20, 20, 20])}),
        modes=("monolithic",),
    )


def reduced_official_preset() -> Preset:
    """The official layout, widths and 16-channel latent at test size (2 blocks, tiny encoders, tiny SSD-1B)."""
    return Preset(
        name="official-reduced",
        dit=dict(sample_size=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                 caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=32, max_num_frames=32,
                 joint_attention_dim=20),
        context_adapter=dict(input_dims=20, output_dims=32, layer_depths=[16, 16], skips=[True, True]),
        vae=dict(encoder_layers_per_block=[1, 1, 1, 1], encoder_block_out_channels=[8, 16, 16, 16],
                 encoder_norm_num_groups=4, decoder_num_features=[16, 8, 8, 8]),
        text=dict(vocab_words=NANO_VOCAB, pooled_dims=(8, 16), token_dim=20, hidden_size=16),
        super_resolution=dict(num_channels=8, num_intermediate_layers=1),
        ssd_1b=dict(image_size=64),
        pipeline=PipelineConfig(first_frame_height=64, first_frame_width=64),
    )


def create_random_checkpoint(preset: Preset, root: str | Path, seed: int = 0) -> Path:
    """Write every component of ``preset`` with seeded random weights in the official folder layout."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _build_text_stack(preset, seed).save_pretrained(root)
        for mode in preset.modes:
            PyramidMMDiT(**preset.dit).save_pretrained(root / SUBFOLDERS[mode, "transformer"])
            if preset.context_adapter is not None:
                ContextAdapter(**preset.context_adapter).save_pretrained(root / SUBFOLDERS[mode, "context_adapter"])
        AsymmetricCausalVideoVAE(**preset.vae).save_pretrained(root / SUBFOLDERS["vae"])
        if preset.super_resolution is not None:
            QuickSRNet(**preset.super_resolution).save_pretrained(root / SUBFOLDERS["super_resolution"])
        if preset.ssd_1b is not None:
            _write_tiny_ssd1b(root, **preset.ssd_1b)
    PyramidFlowMatchScheduler().save_pretrained(root / "scheduler")
    preset.pipeline.save(root)
    return root


def _build_text_stack(preset: Preset, seed: int) -> TextEncoderBundle | SentenceTextEncoder:
    text = preset.text
    if "sentence_encoder" in text:
        return SentenceTextEncoder.from_source(text["sentence_encoder"], text["max_sequence_length"])
    if "distilled_from" in text:
        teacher = AutoTokenizer.from_pretrained(packaged_model_dir(text["distilled_from"]))
        tokenizer = subset_tokenizer(teacher, NANO_VOCAB, text["max_sequence_length"])
        pooled_dim = preset.dit["pooled_projection_dim"]
        return student_text_stack(tokenizer, pooled_dim, text["student"], text["max_sequence_length"])
    return tiny_text_bundle(seed=seed, **text)


def _write_tiny_ssd1b(root: Path, image_size: int) -> None:
    """A tiny SDXL-architecture first-frame model (random weights) in the ``ssd_1b_*`` folders."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models.first_frame import SSD1B_SUBFOLDERS
    from .models.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(NANO_VOCAB, 77, kind="clip")
    text_config = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    parts = {
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**text_config)),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "unet": UNet2DConditionModel(
            sample_size=image_size // 8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
            cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 16, use_linear_projection=True),
        "vae": AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    }
    for name, part in parts.items():
        part.save_pretrained(root / SSD1B_SUBFOLDERS[name])


PRESETS = {"nano": nano_teacher_preset, "nano-teacher": nano_teacher_preset, "nano-student": nano_student_preset,
           "official-reduced": reduced_official_preset}
BUNDLED = {"nano": "nano", "nano-teacher": "nano"}  # preset -> its folder under weights/ (the default ships)


def bundled_weights(name: str = "nano") -> Path | None:
    """The checkpoint folder shipped inside the package for preset ``name``; None for a preset without trained
    weights."""
    if name not in BUNDLED:
        return None
    folder = package_weights(BUNDLED[name])
    return folder if (folder / SUBFOLDERS["vae"]).is_dir() else None


def local_folder(source: str | Path) -> Path:
    """The folder ``source`` names: a local folder, or a preset's bundled weights (a folder of that name wins)."""
    folder = Path(source).expanduser()
    if folder.is_dir() or str(source) not in PRESETS:
        return folder
    bundled = bundled_weights(str(source))
    if bundled is None:
        raise FileNotFoundError(f"No trained weights are bundled for the '{source}' preset.")
    return bundled


def checkpoint_folder(source: str | Path) -> Path | None:
    """The checkpoint folder ``source`` names, if it names one (a preset, or a folder in the pipeline layout); None
    for anything else, such as a bare VAE folder."""
    folder = local_folder(source)
    return folder if (folder / SUBFOLDERS["vae"]).is_dir() else None


def video_vae_folder(source: str | Path) -> Path:
    """The VAE folder of ``source``: the ``final/`` of `train vae`, a checkpoint folder in the pipeline layout, or a
    bundled preset's name (``nano``: the latent space the bundled DiT was trained in)."""
    folder = local_folder(source)
    if not folder.is_dir():
        raise FileNotFoundError(f"VAE folder {folder} does not exist: pass the final/ of `neodragon train vae`, a "
                                "checkpoint folder, or 'nano' for the bundled model's VAE.")
    return folder / SUBFOLDERS["vae"] if (folder / SUBFOLDERS["vae"]).is_dir() else folder


def load_video_vae(source: str | Path) -> AsymmetricCausalVideoVAE:
    """The trained VAE of ``source`` (``video_vae_folder``)."""
    return AsymmetricCausalVideoVAE.from_pretrained(video_vae_folder(source))


def load_pipeline(model: str = "nano", mode: str | None = None, torch_dtype: torch.dtype | None = None,
                  cache_dir: str | Path | None = None, **kwargs) -> NeodragonPipeline:
    """A preset name (bundled weights; a preset without them is built with seeded random weights, with a
    warning), a checkpoint folder or a hub id."""
    if model in PRESETS:
        folder = bundled_weights(model)
        if folder is None:
            warnings.warn(f"No trained weights are bundled for the '{model}' preset yet: using freshly initialised "
                          "(random) weights, so the video is noise-like. Pass a trained checkpoint folder to get "
                          "real videos.", stacklevel=2)
            with tempfile.TemporaryDirectory() as tmp:  # tiny; everything is in memory once loaded
                folder = create_random_checkpoint(PRESETS[model](), tmp)
                return NeodragonPipeline.from_pretrained(folder, mode=mode, torch_dtype=torch_dtype, **kwargs)
        return NeodragonPipeline.from_pretrained(folder, mode=mode, torch_dtype=torch_dtype, **kwargs)
    return NeodragonPipeline.from_pretrained(model, mode=mode, torch_dtype=torch_dtype, cache_dir=cache_dir, **kwargs)
