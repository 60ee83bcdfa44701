"""Export a model's generation path as static ONNX graphs with a manifest (the paper's §4.1 deployment layout).

Every graph has fixed shapes and batch 1 (the runtime feeds a batch, CFG's two branches included, one row at a
time). The DiT gets one graph per distinct (stage, history) shape set of the schedule: a latent frame's stage sees
a history pyramid whose shapes depend on how many frames came before, so ``latent_frames x stages`` graphs.
Each graph is checked against PyTorch on the inputs it was exported with.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from torch import nn

from ..models.first_frame import SSD1B_SUBFOLDERS, LatentFirstFrameGenerator, SSD1BFirstFrameGenerator
from ..models.mmdit import PyramidMMDiT
from ..models.sr import QuickSRNet
from ..models.vae import AsymmetricCausalVideoVAE
from ..pipelines.neodragon import NeodragonPipeline, PipelineConfig, PyramidFirstFrameGenerator
from ..utils.video import atomic_folder

FORMAT = "neodragon-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = "graphs"
OPSET = 21  # 16-bit QuantizeLinear/DequantizeLinear are standard ONNX ops from opset 21
# A graph passes its check when max|ORT - PyTorch| <= ATOL + RTOL * max|PyTorch|.
ATOL, RTOL = 1e-4, 1e-3
# Above this many bytes of weights a graph keeps them in a side file (protobuf's 2 GiB limit).
EXTERNAL_DATA_BYTES = 1 << 30
SAMPLE_PROMPT = "a red circle moving to the right"  # the inputs graphs are exported and checked with


@dataclass
class TensorSpec:
    name: str
    shape: list[int]
    dtype: str  # numpy dtype name


@dataclass
class GraphSpec:
    """One exported graph: which component it runs, its file and its fixed input/output tensors."""

    name: str
    # text_encoder, context_adapter, transformer, vae_decoder, super_resolution; hybrid mode's frame 0: first_frame
    # (latent UNet), first_frame_context_adapter + first_frame_transformer (pyramid DiT), or first_frame_text_encoder
    # + first_frame_unet + first_frame_vae_decoder (SSD-1B) with vae_encoder
    component: str
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    unit: int | None = None  # DiT graphs: the latent frame and pyramid stage whose shapes it has
    stage: int | None = None
    check: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    float_nodes: list[str] = field(default_factory=list)  # nodes a quantised graph keeps in float

    @classmethod
    def from_dict(cls, data: dict) -> GraphSpec:
        data = dict(data)
        data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        return cls(**data)


@dataclass
class Manifest:
    """What a deployed folder holds and which graph runs when (``manifest.json``)."""

    source: str
    mode: str
    num_frames: int
    height: int
    width: int
    graphs: dict[str, GraphSpec]
    scheme: str = "fp32"
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def dit_graph(self, unit: int, stage: int) -> str:
        for spec in self.graphs.values():
            if spec.component == "transformer" and (spec.unit, spec.stage) == (unit, stage):
                return spec.name
        raise KeyError(f"No DiT graph for latent frame {unit}, stage {stage} in the manifest.")

    def save(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {MANIFEST}: it is not an exported model. Make one with "
                                    "`neodragon deploy export MODEL -o DIR`.")
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}, expected "
                                 f"{FORMAT!r} version {FORMAT_VERSION}")
            data["graphs"] = {name: GraphSpec.from_dict(spec) for name, spec in data["graphs"].items()}
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path} is not a valid deployment manifest ({err}); re-export the model with "
                             "`neodragon deploy export`.") from err


# -- graph wrappers: flat tensor inputs and outputs around the library's modules ---------------------------


class TextGraph(nn.Module):
    """The text stack on token ids: ``(input_ids, attention_mask, *pooled_ids) -> (tokens, pooled)``."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *pooled_ids: torch.Tensor):
        encoding = self.text_encoder(list(pooled_ids), input_ids, attention_mask)
        return encoding.tokens.float(), encoding.pooled.float()


class DiTStageGraph(nn.Module):
    """One DiT call at fixed shapes: ``(context, mask, pooled, timestep, *clips) -> velocity``."""

    def __init__(self, transformer: PyramidMMDiT):
        super().__init__()
        self.transformer = transformer

    def forward(self, context, mask, pooled, timestep, *clips):
        return self.transformer([list(clips)], context, mask, pooled, timestep)[0]


class DecoderGraph(nn.Module):
    """The VAE decoder on un-normalised latents: ``latents -> video`` in [-1, 1] (unclamped)."""

    def __init__(self, vae: AsymmetricCausalVideoVAE):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


class EncoderGraph(nn.Module):
    """The video VAE's encoder on one image as a 1-frame video: ``image -> posterior parameters`` (mean, logvar)."""

    def __init__(self, vae: AsymmetricCausalVideoVAE):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.parameters


class CLIPGraph(nn.Module):
    """An SDXL text encoder: ``input_ids -> (output[0], hidden_states[-2])``, what SDXL's prompt encoding reads."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        output = self.encoder(input_ids, output_hidden_states=True)
        return output[0], output.hidden_states[-2]


class SDXLUNetGraph(nn.Module):
    """One SDXL UNet call: ``(sample, timestep, encoder_hidden_states, text_embeds, time_ids[, timestep_cond])``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond=None):
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]


class ImageDecoderGraph(nn.Module):
    """An image VAE's decoder (SDXL's): ``latents -> image``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


class SuperResolutionGraph(nn.Module):
    """The SR model on a whole decoded video (clamped first, as ``upscale_video`` does)."""

    def __init__(self, sr: QuickSRNet):
        super().__init__()
        self.sr = sr

    def forward(self, video):
        return self.sr(video.clamp(-1, 1))


# -- export --------------------------------------------------------------------------------------------------


def export_model(model: str | Path, out: str | Path, mode: str | None = None, num_frames: int | None = None,
                 height: int | None = None, width: int | None = None, super_resolution: bool = True,
                 overwrite: bool = False) -> Manifest:
    """Export ``model`` (a preset or checkpoint folder) for one video geometry (default: the model's) to ``out``:
    graphs/, manifest.json, the tokenizers, the scheduler and the configs the runtime needs."""
    from ..presets import load_pipeline

    pipe = load_pipeline(str(model), mode=mode, torch_dtype=torch.float32, load_super_resolution=super_resolution)
    config = pipe.pipeline_config
    num_frames = num_frames or config.num_frames
    height, width = height or config.height, width or config.width
    if pipe.mode == "hybrid" and not isinstance(pipe.first_frame_generator, FIRST_FRAME_EXPORTERS):
        raise ValueError(f"{model}'s hybrid mode makes frame 0 with {type(pipe.first_frame_generator).__name__}, "
                         "which has no exporter. Pass --mode monolithic.")
    pipe._check_geometry(num_frames, height, width)
    with atomic_folder(Path(out), overwrite) as tmp:
        (tmp / GRAPHS).mkdir()
        graphs = _export_graphs(pipe, tmp, num_frames, height, width)
        manifest = Manifest(source=str(model), mode=pipe.mode, num_frames=num_frames, height=height, width=width,
                            graphs={g.name: g for g in graphs})
        _save_runtime_files(pipe, tmp, replace(config, num_frames=num_frames, height=height, width=width))
        manifest.save(tmp)
    return manifest


@torch.no_grad()
def _export_graphs(pipe: NeodragonPipeline, folder: Path, num_frames: int, height: int,
                   width: int) -> list[GraphSpec]:
    text_inputs = pipe.text_encoder.tokenize([SAMPLE_PROMPT])
    pooled_ids = text_inputs["pooled_ids"]
    names = ["input_ids", "attention_mask", *(f"pooled_ids_{i}" for i in range(len(pooled_ids)))]
    text_args = (text_inputs["input_ids"], text_inputs["attention_mask"], *pooled_ids)
    graphs = [export_graph(TextGraph(pipe.text_encoder), text_args, names, ["tokens", "pooled"], folder,
                           "text_encoder", "text_encoder")]
    encoding = pipe.text_encoder(**text_inputs)
    context = encoding.tokens.float()
    if pipe.context_adapter is not None:
        graphs.append(export_graph(pipe.context_adapter, (context,), ["tokens"], ["context"], folder,
                                   "context_adapter", "context_adapter"))
        context = pipe.context_adapter(context)
    generator = torch.Generator().manual_seed(0)
    first_frame = pipe.first_frame_generator
    if isinstance(first_frame, LatentFirstFrameGenerator):
        graphs.append(_export_first_frame(pipe, folder, encoding, height, width, generator))
    elif isinstance(first_frame, PyramidFirstFrameGenerator):
        graphs += _export_pyramid_first_frame(pipe, folder, encoding, height, width, generator)
    elif isinstance(first_frame, SSD1BFirstFrameGenerator):
        graphs += _export_ssd1b(pipe, folder, height, width, generator)
    graphs += _export_dit(pipe.transformer, folder, context, encoding, dit_schedule(pipe, num_frames, height, width),
                          "transformer", generator)
    down = pipe.vae.config.spatial_downsample_scale
    latents = torch.randn(1, pipe.vae.config.encoder_out_channels, pipe.vae.num_latent_frames(num_frames),
                          height // down, width // down, generator=generator) * 0.2
    graphs.append(export_graph(DecoderGraph(pipe.vae), (latents,), ["latents"], ["video"], folder, "vae_decoder",
                               "vae_decoder"))
    if pipe.super_resolution is not None:
        video = torch.rand(1, 3, num_frames, height, width, generator=generator) * 2 - 1
        graphs.append(export_graph(SuperResolutionGraph(pipe.super_resolution), (video,), ["video"], ["upscaled"],
                                   folder, "super_resolution", "super_resolution"))
    return graphs


def _export_first_frame(pipe: NeodragonPipeline, folder: Path, encoding, height: int, width: int,
                        generator: torch.Generator) -> GraphSpec:
    """The first-frame UNet: one velocity call ``(latents, sigmas, tokens, mask, pooled) -> velocity``."""
    unet = pipe.first_frame_generator
    down = pipe.vae.config.spatial_downsample_scale
    latents = torch.randn(1, unet.unet.config.in_channels, height // down, width // down, generator=generator)
    args = (latents, torch.tensor([0.5]), encoding.tokens.float(), encoding.mask, encoding.pooled.float())
    _save_config(folder, "first_frame_unet", unet.unet)
    return export_graph(unet, args, ["latents", "sigmas", "tokens", "mask", "pooled"], ["velocity"], folder,
                        "first_frame", "first_frame")


def _export_pyramid_first_frame(pipe: NeodragonPipeline, folder: Path, encoding, height: int, width: int,
                                generator: torch.Generator) -> list[GraphSpec]:
    """Frame 0 from the multi-step DiT pair: its ContextAdapter and its three stage graphs at frame 0."""
    first_frame, graphs = pipe.first_frame_generator, []
    context = encoding.tokens.float()
    if first_frame.context_adapter is not None:
        graphs.append(export_graph(first_frame.context_adapter, (context,), ["tokens"], ["context"], folder,
                                   "first_frame_context_adapter", "first_frame_context_adapter"))
        context = first_frame.context_adapter(context)
    calls = dit_schedule(pipe, 1, height, width, units=range(1))
    _save_config(folder, "first_frame_transformer", first_frame.transformer)
    return graphs + _export_dit(first_frame.transformer, folder, context, encoding, calls, "first_frame_transformer",
                                generator)


def _export_dit(transformer: PyramidMMDiT, folder: Path, context: torch.Tensor, encoding, calls: list,
                component: str, generator: torch.Generator) -> list[GraphSpec]:
    """One graph per ``(unit, stage, clips)`` call shape, named ``<component>_f<unit>_s<stage>``."""
    inputs = (context, encoding.mask, encoding.pooled.float(), torch.tensor([500.0]))
    names = ["context", "mask", "pooled", "timestep"]
    graphs = []
    for unit, stage, clips in calls:
        clips = [torch.randn(clip.shape, generator=generator) for clip in clips]
        graphs.append(export_graph(DiTStageGraph(transformer), (*inputs, *clips),
                                   [*names, *(f"clip_{i}" for i in range(len(clips)))], ["velocity"], folder,
                                   f"{component}_f{unit}_s{stage}", component, unit=unit, stage=stage))
    return graphs


def _export_ssd1b(pipe: NeodragonPipeline, folder: Path, height: int, width: int,
                  generator: torch.Generator) -> list[GraphSpec]:
    """SSD-1B's two CLIPs, its UNet (one call at the image size) and its VAE decoder, plus the video VAE's encoder
    that turns the image into frame 0's latent (the paper's "VAE encoder" graph)."""
    sdxl = pipe.first_frame_generator.pipe
    for name in ("unet", "vae", "text_encoder_2"):
        _save_config(folder, SSD1B_SUBFOLDERS[name], getattr(sdxl, name))
    for name in ("tokenizer", "tokenizer_2"):
        getattr(sdxl, name).save_pretrained(folder / "tokenizers" / SSD1B_SUBFOLDERS[name])
    graphs = []
    for index, (tokenizer, encoder) in enumerate(((sdxl.tokenizer, sdxl.text_encoder),
                                                   (sdxl.tokenizer_2, sdxl.text_encoder_2))):
        ids = tokenizer([SAMPLE_PROMPT], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        graphs.append(export_graph(CLIPGraph(encoder), (ids,), ["input_ids"], ["output", "penultimate"], folder,
                                   f"first_frame_text_encoder_{index + 1}", "first_frame_text_encoder"))
    embeds, _, pooled, _ = sdxl.encode_prompt(SAMPLE_PROMPT, device="cpu",
                                              do_classifier_free_guidance=False)
    image_height, image_width = pipe.first_frame_generator.image_height, pipe.first_frame_generator.image_width
    scale, unet = sdxl.vae_scale_factor, sdxl.unet
    latents = torch.randn(1, unet.config.in_channels, image_height // scale, image_width // scale, generator=generator)
    time_ids = torch.tensor([[image_height, image_width, 0, 0, image_height, image_width]], dtype=torch.float32)
    args = [latents, torch.tensor([999.0]), embeds, pooled, time_ids]
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    if unet.config.time_cond_proj_dim is not None:  # an LCM-distilled UNet embeds the guidance scale
        args.append(sdxl.get_guidance_scale_embedding(torch.tensor([-1.0]), unet.config.time_cond_proj_dim))
        names.append("timestep_cond")
    graphs.append(export_graph(SDXLUNetGraph(unet), tuple(args), names, ["noise"], folder, "first_frame_unet",
                               "first_frame_unet"))
    graphs.append(export_graph(ImageDecoderGraph(sdxl.vae), (latents,), ["latents"], ["image"], folder,
                               "first_frame_vae_decoder", "first_frame_vae_decoder"))
    image = torch.rand(1, 3, 1, height, width, generator=generator) * 2 - 1
    graphs.append(export_graph(EncoderGraph(pipe.vae), (image,), ["image"], ["posterior"], folder, "vae_encoder",
                               "vae_encoder"))
    return graphs


FIRST_FRAME_EXPORTERS = (LatentFirstFrameGenerator, PyramidFirstFrameGenerator, SSD1BFirstFrameGenerator)


def dit_schedule(pipe: NeodragonPipeline, num_frames: int, height: int, width: int,
                 units: range | None = None) -> list[tuple[int, int, list[torch.Tensor]]]:
    """``(unit, stage, clips)`` for every DiT call shape of a video: history clips then the current latent, as
    ``NeodragonPipeline.__call__`` builds them (zeros: only the shapes matter). ``units`` defaults to the latent
    frames the pipeline's DiT makes (from frame 1 in hybrid mode, where frame 0 comes from its generator)."""
    scheduler, down = pipe.scheduler, pipe.vae.config.spatial_downsample_scale
    if units is None:
        units = range(1 if pipe.mode == "hybrid" else 0, pipe.vae.num_latent_frames(num_frames))
    frame = torch.zeros(1, pipe.transformer.config.in_channels, 1, height // down, width // down)
    pyramid = scheduler.latent_pyramid(frame)
    calls = []
    for unit in units:
        history = scheduler.history_from_pyramids([pyramid] * unit)
        for stage in range(scheduler.config.stages):
            calls.append((unit, stage, [*history[stage], pyramid[stage]]))
    return calls


@torch.no_grad()
def export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], input_names: list[str],
                 output_names: list[str], folder: Path, name: str, component: str, **extra) -> GraphSpec:
    """Export ``module`` at the shapes of ``args`` to ``folder/graphs/<name>.onnx`` and check it against PyTorch."""
    module = module.eval()
    expected = module(*args)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    file = f"{GRAPHS}/{name}.onnx"
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    program = torch.onnx.export(module, args, input_names=input_names, output_names=output_names,
                                opset_version=OPSET, dynamo=True, external_data=False, verbose=False)
    program.save(str(folder / file), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    spec = GraphSpec(name=name, component=component, file=file,
                     inputs=[_tensor_spec(n, a) for n, a in zip(input_names, args, strict=True)],
                     outputs=[_tensor_spec(n, e) for n, e in zip(output_names, expected, strict=True)], **extra)
    feeds = {n: a.numpy() for n, a in zip(input_names, args, strict=True)}
    spec.check = compare_with_reference(folder / file, feeds, [e.numpy() for e in expected])
    return spec


def compare_with_reference(path: Path, feeds: dict[str, np.ndarray], expected: list[np.ndarray]) -> dict[str, float]:
    """Run the graph in ONNX Runtime; fail unless every output is within ATOL + RTOL * max|expected|."""
    from .runtime import session

    got = session(path).run(None, feeds)
    error = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    scale = max(float(np.abs(e).max()) for e in expected)
    if not error <= ATOL + RTOL * scale:
        raise RuntimeError(f"{path.name}: ONNX Runtime differs from PyTorch by {error:.3g} (outputs up to "
                           f"{scale:.3g}; tolerance {ATOL} + {RTOL} x that). The export is wrong; please report it.")
    return {"max_abs_error": error, "max_abs_output": scale}


def _tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, list(tensor.shape), str(tensor.numpy().dtype))


def _save_runtime_files(pipe: NeodragonPipeline, folder: Path, config: PipelineConfig) -> None:
    """Everything but the graphs that generation reads: tokenizers, scheduler, pipeline config and the configs of
    the DiT and VAE (their shapes and latent constants; no weights)."""
    text = pipe.text_encoder
    pooled = getattr(text, "pooled_tokenizers", [])
    token = getattr(text, "token_tokenizer", None) or text.tokenizer
    for index, tokenizer in enumerate(pooled):
        tokenizer.save_pretrained(folder / "tokenizers" / f"pooled_{index}")
    token.save_pretrained(folder / "tokenizers" / "tokens")
    (folder / "tokenizers" / "text.json").write_text(json.dumps(
        {"max_sequence_length": text.max_sequence_length, "pooled_tokenizers": len(pooled)}, indent=1) + "\n")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    config.save(folder)  # its size is the exported one
    for name, module in (("transformer", pipe.transformer), ("vae", pipe.vae)):
        _save_config(folder, name, module)


def _save_config(folder: Path, name: str, module: nn.Module) -> None:
    """``configs/<name>.json``: a model's config (its shapes and constants; no weights) for the runtime."""
    (folder / "configs").mkdir(exist_ok=True)
    # diffusers models carry their config, transformers models a PretrainedConfig
    text = module.to_json_string() if isinstance(module, ConfigMixin) else module.config.to_json_string()
    (folder / "configs" / f"{name}.json").write_text(text)


def copy_runtime_files(source: Path, target: Path) -> None:
    """The non-graph files of an exported folder (for a quantised copy)."""
    for name in ("tokenizers", "scheduler", "configs"):
        shutil.copytree(source / name, target / name)
    shutil.copy2(source / "pipeline_config.json", target / "pipeline_config.json")


__all__ = ["Manifest", "GraphSpec", "TensorSpec", "export_model", "export_graph", "dit_schedule", "MANIFEST"]
