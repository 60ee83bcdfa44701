"""Generation from exported graphs: ONNX Runtime sessions behind the interfaces ``NeodragonPipeline`` calls.

The pipeline's own sampling loop runs unchanged (noise, scheduler, CFG, history pyramids), so a seed gives the same
video as with PyTorch up to the graphs' numerics; only the networks are replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from transformers import AutoTokenizer

from ..models.first_frame import SSD1B_SUBFOLDERS, LatentFirstFrameGenerator, SSD1BFirstFrameGenerator
from ..models.text import TextEncoding, token_counts, tokenize_prompts
from ..models.vae import AsymmetricCausalVideoVAE
from ..pipelines.neodragon import NeodragonPipeline, PipelineConfig, PyramidFirstFrameGenerator
from ..schedulers import PyramidFlowMatchScheduler
from .export import GraphSpec, Manifest


def session(model: str | Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of a graph file or serialized graph (``threads``: intra-op threads; None lets ONNX
    Runtime choose)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers would drown the output
    # ONNX Runtime's threads spin between calls by default, which starves the torch ops between the graphs (the
    # scheduler's noise, the renoising): on 2 cores a student video took 0.29 s instead of 0.07 s (docs/deployment.md)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


class OnnxModule:
    """What the pipeline needs of a component besides its call: CPU, float32 I/O, no-op ``to``."""

    device = torch.device("cpu")
    dtype = torch.float32

    def to(self, *args, **kwargs) -> OnnxModule:
        for value in (*args, *kwargs.values()):
            if isinstance(value, (str, torch.device)) and torch.device(value).type != "cpu":
                raise ValueError("The onnxruntime backend runs on the CPU; leave out --device.")
            if isinstance(value, torch.dtype) and value != torch.float32:
                raise ValueError("The onnxruntime backend runs the graphs in the precision they were exported or "
                                 "quantised in; leave out --dtype.")
        return self


class OnnxTorchModule(OnnxModule, torch.nn.Module):
    """A graph-backed component that diffusers' SDXL pipeline inspects as a torch module (execution device,
    offloading hooks); it has no parameters."""

    def __init__(self):
        torch.nn.Module.__init__(self)


class OnnxGraph:
    """One graph and its manifest entry. Graphs have batch 1, so a batch runs one row at a time."""

    def __init__(self, folder: Path, spec: GraphSpec, threads: int | None = None):
        path = folder / spec.file
        if not path.is_file():
            raise FileNotFoundError(f"Graph {spec.file} listed in {folder / 'manifest.json'} is missing; re-export "
                                    "the model (`neodragon deploy export`).")
        self.spec, self.session = spec, session(path, threads)
        declared = {t.name: t.shape for t in spec.inputs}
        actual = {i.name: list(i.shape) for i in self.session.get_inputs()}
        if declared != actual:
            raise ValueError(f"{spec.file} does not match its manifest entry (graph inputs {actual}, manifest "
                             f"{declared}); the folder was edited by hand or mixes two exports. Re-export it.")
        self.recorder: list[dict[str, np.ndarray]] | None = None  # set to a list to keep every feed (calibration)

    def __call__(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        batch = next(iter(inputs.values())).shape[0]
        rows = [self.run_row({name: value[row : row + 1] for name, value in inputs.items()}) for row in range(batch)]
        return [torch.cat(outputs) for outputs in zip(*rows, strict=True)]

    def run_row(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        feeds = {}
        for tensor_spec in self.spec.inputs:
            value = inputs[tensor_spec.name].detach().cpu().numpy().astype(tensor_spec.dtype)
            if list(value.shape) != tensor_spec.shape:
                raise ValueError(f"Graph {self.spec.name} takes {tensor_spec.name} of shape {tensor_spec.shape}, got "
                                 f"{list(value.shape)}: the folder was exported for another video size. Re-export "
                                 "with that size (--num-frames/--height/--width) or generate at the exported one.")
            feeds[tensor_spec.name] = value
        if self.recorder is not None:
            self.recorder.append(feeds)
        return [torch.from_numpy(out) for out in self.session.run(None, feeds)]


class OnnxTextEncoder(OnnxModule):
    """The text stack: tokenizers from the folder, the encoder from its graph."""

    def __init__(self, folder: Path, graph: OnnxGraph):
        settings = json.loads((folder / "tokenizers" / "text.json").read_text())
        self.graph, self.max_sequence_length = graph, settings["max_sequence_length"]
        self.pooled_tokenizers = [AutoTokenizer.from_pretrained(folder / "tokenizers" / f"pooled_{i}")
                                  for i in range(settings["pooled_tokenizers"])]
        self.token_tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizers" / "tokens")

    def token_counts(self, prompts: list[str]) -> list[int]:
        return token_counts(self.token_tokenizer, prompts)

    def encode(self, prompts: str | list[str]) -> TextEncoding:
        ids = tokenize_prompts(self.pooled_tokenizers, self.token_tokenizer, self.max_sequence_length, prompts)
        pooled = {f"pooled_ids_{i}": value for i, value in enumerate(ids["pooled_ids"])}
        tokens, pooled_vector = self.graph(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], **pooled)
        return TextEncoding(tokens=tokens, mask=ids["attention_mask"].long(), pooled=pooled_vector)


class OnnxContextAdapter(OnnxModule):
    def __init__(self, graph: OnnxGraph):
        self.graph = graph

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.graph(tokens=tokens)[0]


class OnnxTransformer(OnnxModule):
    """The DiT: each call picks the graph exported for its clips' shapes (its stage and history)."""

    def __init__(self, config: dict, graphs: list[OnnxGraph]):
        self.config = FrozenDict(config)
        self.graphs = {self._key(g.spec.inputs[4:]): g for g in graphs}

    @staticmethod
    def _key(clips) -> tuple:
        return tuple(tuple(clip.shape[2:]) for clip in clips)

    def __call__(self, sample, encoder_hidden_states, encoder_attention_mask, pooled_projections, timestep_ratio):
        if len(sample) != 1:
            raise ValueError("The exported DiT runs one stage per call.")
        clips = list(sample[0])
        graph = self.graphs.get(self._key(clips))
        if graph is None:
            raise ValueError(f"No exported DiT graph for clips of shapes {[list(c.shape) for c in clips]}: the folder "
                             "was exported for another video size or mode. Re-export for this one.")
        timestep = torch.as_tensor(timestep_ratio, dtype=torch.float32).expand(clips[-1].shape[0])
        feeds = {"context": encoder_hidden_states, "mask": encoder_attention_mask, "pooled": pooled_projections,
                 "timestep": timestep, **{f"clip_{i}": clip for i, clip in enumerate(clips)}}
        return graph(**feeds)


class OnnxFirstFrameGenerator(OnnxModule):
    """Hybrid mode's latent UNet as a graph, sampled by ``LatentFirstFrameGenerator``'s own loop."""

    first_frame_latents = LatentFirstFrameGenerator.first_frame_latents

    def __init__(self, config: dict, graph: OnnxGraph, num_inference_steps: int, guidance_scale: float):
        self.unet = SimpleNamespace(config=FrozenDict(config))
        self.graph, self.num_inference_steps, self.guidance_scale = graph, num_inference_steps, guidance_scale

    def __call__(self, latents, sigmas, tokens, mask, pooled) -> torch.Tensor:
        return self.graph(latents=latents, sigmas=sigmas, tokens=tokens, mask=mask, pooled=pooled)[0]


class OnnxPyramidFirstFrameGenerator(OnnxModule):
    """Frame 0 from the multi-step DiT pair's graphs, sampled by ``PyramidFirstFrameGenerator``'s own loop."""

    first_frame_latents = PyramidFirstFrameGenerator.first_frame_latents

    def __init__(self, transformer: OnnxTransformer, context_adapter: OnnxContextAdapter | None,
                 num_inference_steps: list[int], guidance_scale: float):
        self.transformer, self.context_adapter = transformer, context_adapter
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale


class _CLIPOutput(tuple):
    """What SDXL's prompt encoding reads of a CLIP output: ``[0]`` and ``hidden_states[-2]``."""

    def __new__(cls, output: torch.Tensor, penultimate: torch.Tensor):
        instance = super().__new__(cls, (output,))
        instance.hidden_states = (penultimate, output)
        return instance


class OnnxCLIPTextEncoder(OnnxTorchModule):
    def __init__(self, config: dict, graph: OnnxGraph):
        super().__init__()
        self.config, self.graph = FrozenDict(config), graph

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = True) -> _CLIPOutput:
        return _CLIPOutput(*self.graph(input_ids=input_ids))


class OnnxSDXLUNet(OnnxTorchModule):
    """SSD-1B's UNet graph behind the call SDXL's pipeline makes."""

    def __init__(self, config: dict, graph: OnnxGraph):
        super().__init__()
        self.config, self.graph = FrozenDict(config), graph
        # the pipeline checks its time ids + pooled width against the UNet's added-embedding input
        self.add_embedding = SimpleNamespace(
            linear_1=SimpleNamespace(in_features=config["projection_class_embeddings_input_dim"]))

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict=False) -> tuple[torch.Tensor]:
        feeds = {"sample": sample, "timestep": torch.as_tensor(timestep, dtype=torch.float32).expand(len(sample)),
                 "encoder_hidden_states": encoder_hidden_states, "text_embeds": added_cond_kwargs["text_embeds"],
                 "time_ids": added_cond_kwargs["time_ids"]}
        if timestep_cond is not None:
            feeds["timestep_cond"] = timestep_cond
        return (self.graph(**feeds)[0],)


class OnnxImageVAE(OnnxTorchModule):
    """SSD-1B's VAE decoder graph."""

    def __init__(self, config: dict, graph: OnnxGraph):
        super().__init__()
        self.config, self.graph = FrozenDict(config), graph

    def decode(self, latents: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (self.graph(latents=latents)[0],)


class OnnxVAE(OnnxModule):
    """The VAE decoder graph (and the encoder's, for an SSD-1B first frame) with the VAE config (latent constants,
    scales)."""

    denormalize_latents = AsymmetricCausalVideoVAE.denormalize_latents
    normalize_latents = AsymmetricCausalVideoVAE.normalize_latents

    def __init__(self, config: dict, decoder: OnnxGraph, encoder: OnnxGraph | None = None):
        self.config, self.decoder, self.encoder = FrozenDict(config), decoder, encoder

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(sample=self.decoder(latents=z)[0])

    def encode(self, x: torch.Tensor) -> AutoencoderKLOutput:
        if self.encoder is None:
            raise ValueError("This exported folder has no VAE encoder graph (only a hybrid export with an SSD-1B "
                             "first frame has one).")
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(self.encoder(image=x)[0]))


class OnnxSuperResolution(OnnxModule):
    def __init__(self, graph: OnnxGraph):
        self.graph = graph

    def upscale_video(self, video: torch.Tensor, frames_per_call: int = 16) -> torch.Tensor:
        """The whole video in one call per batch row (the graph's fixed shape); ``frames_per_call`` is ignored."""
        return self.graph(video=video)[0]


def load_onnx_pipeline(folder: str | Path, threads: int | None = None) -> NeodragonPipeline:
    """A ``NeodragonPipeline`` whose networks are the exported (fp32 or quantised) graphs of ``folder``."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    graphs = {name: OnnxGraph(folder, spec, threads) for name, spec in manifest.graphs.items()}

    def component(name: str) -> list[OnnxGraph]:
        return [g for g in graphs.values() if g.spec.component == name]

    def first(name: str) -> OnnxGraph | None:
        return next(iter(component(name)), None)

    adapter, sr, encoder = first("context_adapter"), first("super_resolution"), first("vae_encoder")
    config = PipelineConfig.load(folder)
    pipe = NeodragonPipeline(
        text_encoder=OnnxTextEncoder(folder, first("text_encoder")),
        context_adapter=OnnxContextAdapter(adapter) if adapter else None,
        transformer=OnnxTransformer(_config(folder, "transformer"), component("transformer")),
        vae=OnnxVAE(_config(folder, "vae"), first("vae_decoder"), encoder),
        scheduler=PyramidFlowMatchScheduler.from_pretrained(folder / "scheduler"),
        mode=manifest.mode, super_resolution=OnnxSuperResolution(sr) if sr else None,
        first_frame_generator=_first_frame_generator(folder, config, component), pipeline_config=config)
    pipe.onnx_graphs = graphs  # every graph by name (calibration records their feeds)
    return pipe


def _config(folder: Path, name: str) -> dict:
    return json.loads((folder / "configs" / f"{name}.json").read_text())


def _first_frame_generator(folder: Path, config: PipelineConfig, component):
    """Hybrid mode's frame-0 generator from its graphs: latent UNet, pyramid DiT pair or SSD-1B; None without."""
    if component("first_frame"):
        return OnnxFirstFrameGenerator(_config(folder, "first_frame_unet"), component("first_frame")[0],
                                       config.first_frame_steps, config.first_frame_guidance)
    if component("first_frame_transformer"):
        adapter = component("first_frame_context_adapter")
        defaults = config.modes["monolithic"]  # as PyramidFirstFrameGenerator.from_pretrained samples it
        return OnnxPyramidFirstFrameGenerator(
            OnnxTransformer(_config(folder, "first_frame_transformer"), component("first_frame_transformer")),
            OnnxContextAdapter(adapter[0]) if adapter else None, defaults.num_inference_steps,
            defaults.guidance_scale)
    if component("first_frame_unet"):
        text_encoders = sorted(component("first_frame_text_encoder"), key=lambda g: g.spec.name)
        encoder_2_config = _config(folder, SSD1B_SUBFOLDERS["text_encoder_2"])
        parts = {
            "text_encoder": OnnxCLIPTextEncoder({}, text_encoders[0]),
            "text_encoder_2": OnnxCLIPTextEncoder(encoder_2_config, text_encoders[1]),
            "unet": OnnxSDXLUNet(_config(folder, SSD1B_SUBFOLDERS["unet"]), component("first_frame_unet")[0]),
            "vae": OnnxImageVAE(_config(folder, SSD1B_SUBFOLDERS["vae"]), component("first_frame_vae_decoder")[0]),
            **{name: AutoTokenizer.from_pretrained(folder / "tokenizers" / SSD1B_SUBFOLDERS[name])
               for name in ("tokenizer", "tokenizer_2")}}
        return SSD1BFirstFrameGenerator.from_parts(parts, image_height=config.first_frame_height,
                                                   image_width=config.first_frame_width)
    return None


def is_exported_folder(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()
