"""Text conditioning: DT5 (T5 encoder + projection), CLIP pooled encoders, offline word tokenizers (§6), and the
nano student's text stack that text-encoder distillation trains."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutput

try:
    # transformers >= 5: these initialisers skip tensors already loaded from a checkpoint
    from transformers import initialization as _init
except ImportError:  # pragma: no cover - transformers 4.x
    _init = nn.init

__all__ = [
    "DEFAULT_POOLED_SUBFOLDERS",
    "DEFAULT_TOKEN_SUBFOLDERS",
    "T5EncoderWithProjection",
    "T5ProjectionConfig",
    "TextEncoderBundle",
    "TextEncoding",
    "StudentTextConfig",
    "build_word_tokenizer",
    "student_text_stack",
    "subset_tokenizer",
    "tiny_text_bundle",
]

DEFAULT_POOLED_SUBFOLDERS: tuple[tuple[str, str], ...] = (
    ("tokenizer", "text_encoder"),
    ("tokenizer_2", "text_encoder_2"),
)
DEFAULT_TOKEN_SUBFOLDERS: tuple[str, str] = ("tokenizer_3", "text_encoder_3")


# --------------------------------------------------------------------------------------------------------------
# DT5
# --------------------------------------------------------------------------------------------------------------


class T5ProjectionConfig(T5Config):
    """T5 encoder config plus the DT5 projection widths.

    The projection output width is read from ``out_dim`` (DistillT5 quirk): a ``project_out_dim`` entry is ignored,
    so a config.json carrying only ``project_out_dim`` gets the default 4096. Both keys are written back on save.
    """

    def __init__(self, project_in_dim: int = 768, out_dim: int = 4096, **kwargs) -> None:
        kwargs.pop("project_out_dim", None)
        super().__init__(**kwargs)
        self.project_in_dim = project_in_dim
        self.out_dim = out_dim
        self.project_out_dim = out_dim


class T5EncoderWithProjection(T5PreTrainedModel):
    """DT5: a T5 encoder followed by ``final_projection`` (Linear, ReLU, Dropout(0.1), Linear; no biases)."""

    config_class = T5ProjectionConfig
    config: T5ProjectionConfig

    def __init__(self, config: T5ProjectionConfig) -> None:
        super().__init__(config)
        self.encoder = T5EncoderModel(config)
        in_dim, out_dim = config.project_in_dim, config.project_out_dim
        self.final_projection = nn.Sequential(
            nn.Linear(in_dim, out_dim, bias=False),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(out_dim, out_dim, bias=False),
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # The T5 default (std = initializer_factor = 1) would blow up a 768 -> 4096 -> 4096 projection.
        if isinstance(module, nn.Linear) and any(module is m for m in getattr(self, "final_projection", ())):
            _init.normal_(module.weight, mean=0.0, std=self.config.initializer_factor * module.in_features**-0.5)
            return
        super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Module) -> None:
        self.encoder.set_input_embeddings(new_embeddings)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> BaseModelOutput | tuple[torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)[0]
        tokens = self.final_projection(hidden)
        if not return_dict:
            return (tokens,)
        return BaseModelOutput(last_hidden_state=tokens)


# --------------------------------------------------------------------------------------------------------------
# Offline word-level tokenizers
# --------------------------------------------------------------------------------------------------------------

_PUNCTUATION = tuple(".,!?;:'\"-()")


def build_word_tokenizer(
    words: Iterable[str], model_max_length: int, kind: Literal["t5", "clip"] = "t5"
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built offline from plain words (lower-cased, punctuation split off).

    ``kind="t5"``: ``<pad>`` = 0, ``</s>`` = 1 appended, ``<unk>`` = 2. ``kind="clip"``: ``<|startoftext|>`` and
    ``<|endoftext|>`` wrap every sequence and the pad token is the eos token, as in CLIP.
    """
    from tokenizers import models, normalizers, pre_tokenizers, processors

    if kind == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
        names = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    elif kind == "clip":
        # eos must not get id 2: transformers' CLIP then assumes the legacy "argmax id is eos" pooling.
        specials = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
        names = {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<unk>",
        }
    else:
        raise ValueError(f"kind must be 't5' or 'clip', got {kind!r}")

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    vocab: dict[str, int] = {token: i for i, token in enumerate(specials)}
    for text in [*words, *_PUNCTUATION]:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            vocab.setdefault(piece, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=names["unk_token"]))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    eos = names["eos_token"]
    if kind == "clip":
        bos = names["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}",
            pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
        )
    else:
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, vocab[eos])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=model_max_length, padding_side="right", **names
    )


# --------------------------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TextEncoding:
    """Text conditioning of a batch: DT5 ``tokens`` [B, L, D], their ``mask`` [B, L] (long), ``pooled`` [B, P]."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoding:
        """Move everything to ``device``; cast tokens and pooled (not the integer mask) to ``dtype``."""
        return TextEncoding(
            self.tokens.to(device=device, dtype=dtype),
            self.mask.to(device=device),
            self.pooled.to(device=device, dtype=dtype),
        )


def token_counts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[int]:
    """How many tokens (special tokens included) ``tokenizer`` makes of each prompt, before any truncation."""
    return [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False).input_ids]


def tokenize_prompts(pooled_tokenizers: Sequence[PreTrainedTokenizerBase], token_tokenizer: PreTrainedTokenizerBase,
                     max_sequence_length: int,
                     prompts: str | Sequence[str]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Token ids of a text stack: each pooled (CLIP) tokenizer's padded to its ``model_max_length``, the token
    stream's to ``max_sequence_length`` with its attention mask (shared by the PyTorch and the ONNX text stacks)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    pooled_ids = [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
                  for tokenizer in pooled_tokenizers]
    batch = token_tokenizer(prompts, padding="max_length", max_length=max_sequence_length,
                            truncation=True, add_special_tokens=True, return_tensors="pt")
    return {"pooled_ids": pooled_ids, "input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class TextEncoderBundle(nn.Module):
    """CLIP-style pooled encoders (pooled = concat of their ``text_embeds``) plus the DT5 token encoder (or a plain T5
    encoder: Pyramid-Flow's T5-XXL, the teacher that DT5 is distilled from).

    DT5 inputs are padded/truncated to ``max_sequence_length`` (default: 128, or the token tokenizer's
    ``model_max_length`` when that is shorter).
    """

    def __init__(
        self,
        pooled_encoders: Sequence[tuple[PreTrainedTokenizerBase, CLIPTextModelWithProjection]],
        token_encoder: tuple[PreTrainedTokenizerBase, T5EncoderWithProjection | T5EncoderModel],
        max_sequence_length: int | None = None,
    ) -> None:
        super().__init__()
        if not pooled_encoders:
            raise ValueError("TextEncoderBundle needs at least one pooled (CLIP) encoder")
        self.pooled_tokenizers = [tok for tok, _ in pooled_encoders]
        self.pooled_encoders = nn.ModuleList([enc for _, enc in pooled_encoders])
        self.token_tokenizer, self.token_encoder = token_encoder
        # The official T5 tokenizer allows 512; the reference pads/truncates to 128. Tiny word tokenizers save
        # a shorter model_max_length, which a reload must keep.
        if max_sequence_length is None:
            max_sequence_length = min(128, self.token_tokenizer.model_max_length)
        self.max_sequence_length = max_sequence_length
        self.eval()

    @property
    def pooled_dim(self) -> int:
        return sum(enc.config.projection_dim for enc in self.pooled_encoders)

    @property
    def token_dim(self) -> int:
        config = self.token_encoder.config
        return getattr(config, "project_out_dim", config.d_model)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Untruncated length of each prompt's token stream (``encode`` keeps the first ``max_sequence_length``)."""
        return token_counts(self.token_tokenizer, prompts)

    def tokenize(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Token ids as §6.1 (``tokenize_prompts``)."""
        return tokenize_prompts(self.pooled_tokenizers, self.token_tokenizer, self.max_sequence_length, prompts)

    def forward(self, pooled_ids: Sequence[torch.Tensor], input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> TextEncoding:
        """``TextEncoding`` of tokenized prompts (``tokenize``'s output); differentiable, for distillation."""
        # Like the reference, CLIP runs without a mask: it is causal and pools at the first eos.
        pooled = [encoder(ids.to(_device_of(encoder)))[0]
                  for ids, encoder in zip(pooled_ids, self.pooled_encoders, strict=True)]
        device = _device_of(self.token_encoder)
        mask = attention_mask.to(device=device, dtype=torch.long)
        tokens = self.token_encoder(input_ids.to(device), attention_mask=mask)[0].to(self.token_encoder.dtype)
        return TextEncoding(tokens=tokens, mask=mask, pooled=torch.cat(pooled, dim=-1))

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> TextEncoding:
        """Encode prompts as §6.1 (``tokenize``, then ``forward``)."""
        return self(**self.tokenize(prompts))

    @staticmethod
    def _default_pooled_subfolders(count: int, token_subfolders: Sequence[str]) -> list[tuple[str, str]]:
        names = [(f"tokenizer{s}", f"text_encoder{s}") for s in ["", *(f"_{i}" for i in range(2, count + 1))]]
        if any(name in token_subfolders for pair in names for name in pair):
            raise ValueError(f"default sub-folders {names} collide with {tuple(token_subfolders)}; pass subfolders=")
        return names

    @classmethod
    def from_pretrained(
        cls,
        root: str | Path,
        subfolders: Sequence[tuple[str, str]] = DEFAULT_POOLED_SUBFOLDERS,
        token_subfolders: tuple[str, str] = DEFAULT_TOKEN_SUBFOLDERS,
        torch_dtype: torch.dtype | None = None,
        max_sequence_length: int | None = None,
    ) -> TextEncoderBundle:
        """Load tokenizers and encoders from ``root/<sub-folder>`` (the official Neodragon layout by default), in
        float32 unless ``torch_dtype`` says otherwise, as diffusers loads the other components (transformers would
        keep the stored dtype: fp16 for a bundled student)."""
        root = Path(root)
        torch_dtype = torch_dtype or torch.float32
        for name in [*(n for pair in subfolders for n in pair), *token_subfolders]:
            if not (root / name).is_dir():
                raise FileNotFoundError(
                    f"text encoder sub-folder '{name}' is missing under {root}. Download the complete Neodragon "
                    "snapshot (tokenizer, text_encoder, tokenizer_2, text_encoder_2, tokenizer_3, text_encoder_3) "
                    "into this folder, or pass subfolders=/token_subfolders= naming the folders you have."
                )
        pooled = [
            (
                AutoTokenizer.from_pretrained(root / tok),
                CLIPTextModelWithProjection.from_pretrained(root / enc, dtype=torch_dtype),
            )
            for tok, enc in subfolders
        ]
        tok, enc = token_subfolders
        token = (AutoTokenizer.from_pretrained(root / tok), _load_token_encoder(root / enc, torch_dtype))
        return cls(pooled, token, max_sequence_length=max_sequence_length)

    def save_pretrained(
        self,
        root: str | Path,
        subfolders: Sequence[tuple[str, str]] | None = None,
        token_subfolders: tuple[str, str] = DEFAULT_TOKEN_SUBFOLDERS,
    ) -> None:
        """Write every tokenizer and encoder into its own sub-folder of ``root`` (``from_pretrained``'s layout)."""
        root = Path(root)
        if subfolders is None:
            subfolders = self._default_pooled_subfolders(len(self.pooled_encoders), token_subfolders)
        if len(subfolders) != len(self.pooled_encoders):
            raise ValueError(f"{len(subfolders)} sub-folder pairs given for {len(self.pooled_encoders)} encoders")
        for (tok_dir, enc_dir), tokenizer, encoder in zip(
            subfolders, self.pooled_tokenizers, self.pooled_encoders, strict=True
        ):
            tokenizer.save_pretrained(root / tok_dir)
            encoder.save_pretrained(root / enc_dir)
        self.token_tokenizer.save_pretrained(root / token_subfolders[0])
        self.token_encoder.save_pretrained(root / token_subfolders[1])


def _load_token_encoder(folder: Path, torch_dtype: torch.dtype | None) -> T5EncoderWithProjection | T5EncoderModel:
    """DT5 (the release), or a plain T5 encoder such as T5-XXL (Pyramid-Flow's SD3 text stack, the teacher of
    text-encoder distillation), whose tokens are its last hidden states."""
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    plain = config.get("architectures") == ["T5EncoderModel"]
    return (T5EncoderModel if plain else T5EncoderWithProjection).from_pretrained(folder, dtype=torch_dtype)


def tiny_text_bundle(
    vocab_words: Iterable[str],
    pooled_dims: Sequence[int] = (8, 16),
    token_dim: int = 32,
    seed: int = 0,
    hidden_size: int = 16,
    max_sequence_length: int = 128,
    clip_max_length: int = 77,
) -> TextEncoderBundle:
    """A random-weight bundle with tiny CLIP and DT5 encoders over a word-level vocabulary (tests, nano presets)."""
    words = list(vocab_words)
    clip_tokenizer = build_word_tokenizer(words, clip_max_length, kind="clip")
    t5_tokenizer = build_word_tokenizer(words, max_sequence_length, kind="t5")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pooled = []
        for i, dim in enumerate(pooled_dims):
            config = CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=1 + i % 2,
                num_attention_heads=2,
                max_position_embeddings=clip_max_length,
                projection_dim=dim,
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
            pooled.append((clip_tokenizer, CLIPTextModelWithProjection(config)))
        t5_config = T5ProjectionConfig(
            vocab_size=len(t5_tokenizer),
            d_model=hidden_size,
            d_kv=hidden_size // 2,
            d_ff=2 * hidden_size,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=max_sequence_length,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            project_in_dim=hidden_size,
            out_dim=token_dim,
        )
        dt5 = T5EncoderWithProjection(t5_config)
    return TextEncoderBundle(pooled, (t5_tokenizer, dt5), max_sequence_length=max_sequence_length)


# --------------------------------------------------------------------------------------------------------------
# The nano student's text stack (text-encoder distillation)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StudentTextConfig:
    """Sizes of the student text stack: DT5 (a T5 encoder with its projection to ``token_dim``), two CLIP-style
    pooled encoders whose projections concatenate to the DiT's pooled width, and the ContextAdapter's hidden
    widths (its input is ``token_dim``, its output the DiT's width)."""

    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 256
    token_dim: int = 384
    pooled_hidden: int = 128
    pooled_layers: int = 2
    adapter_depths: tuple[int, ...] = (128, 128)

    @classmethod
    def release(cls) -> StudentTextConfig:
        """The release's sizes: DistilT5 (a T5-Base encoder projecting to T5-XXL's 4096) and the 4 x 4096
        ContextAdapter; its pooled encoders are the teacher's own CLIPs, kept rather than rebuilt."""
        return cls(d_model=768, num_layers=12, num_heads=12, d_ff=2048, token_dim=4096, adapter_depths=(4096,) * 4)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def adapter_config(self, output_dims: int, input_dims: int | None = None) -> dict:
        """ContextAdapter arguments: DT5 tokens (``token_dim`` wide unless ``input_dims``) to the DiT's width."""
        depths = list(self.adapter_depths)
        return dict(input_dims=input_dims or self.token_dim, output_dims=output_dims, layer_depths=depths,
                    skips=[True] * len(depths))


def subset_tokenizer(teacher: PreTrainedTokenizerBase, texts: Iterable[str],
                     model_max_length: int) -> PreTrainedTokenizerFast:
    """The teacher's WordPiece tokenizer cut down to the pieces it uses on ``texts`` (plus its special tokens): it
    tokenizes those texts exactly as the teacher does, so the student's tokens align with the teacher's, with a
    vocabulary of a few hundred entries instead of tens of thousands."""
    spec = json.loads(teacher.backend_tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise ValueError(f"subset_tokenizer needs a WordPiece teacher tokenizer; got {spec['model']['type']}.")
    specials = [teacher.pad_token, teacher.unk_token, teacher.cls_token, teacher.sep_token]
    pieces = sorted({piece for text in texts for piece in teacher.tokenize(text)} - set(specials))
    # pad 0 and a sep id other than 2: transformers' CLIP treats eos id 2 as the legacy "argmax id is eos" pooling
    vocab = {token: index for index, token in enumerate([*specials, *pieces])}
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [{**token, "id": vocab[token["content"]]} for token in spec["added_tokens"]
                            if token["content"] in vocab]
    for name, entry in spec["post_processor"].get("special_tokens", {}).items():
        entry["ids"] = [vocab[name]]
    spec["truncation"], spec["padding"] = None, None
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), model_max_length=model_max_length,
        padding_side="right", pad_token=teacher.pad_token, unk_token=teacher.unk_token,
        cls_token=teacher.cls_token, sep_token=teacher.sep_token)


def student_text_stack(tokenizer: PreTrainedTokenizerFast, pooled_dim: int, config: StudentTextConfig,
                       max_sequence_length: int) -> TextEncoderBundle:
    """A randomly initialised student stack in the release's classes: two CLIP text encoders with projections
    (pooled widths summing to ``pooled_dim``) and DT5, all reading ``tokenizer``'s ids."""
    halves = (pooled_dim // 2, pooled_dim - pooled_dim // 2)
    pooled = []
    for width in halves:
        clip = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=config.pooled_hidden, intermediate_size=4 * config.pooled_hidden,
            num_hidden_layers=config.pooled_layers, num_attention_heads=max(1, config.pooled_hidden // 32),
            max_position_embeddings=max_sequence_length, projection_dim=width,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id)
        pooled.append((tokenizer, CLIPTextModelWithProjection(clip)))
    dt5 = T5EncoderWithProjection(T5ProjectionConfig(
        vocab_size=len(tokenizer), d_model=config.d_model, d_kv=config.d_model // config.num_heads,
        d_ff=config.d_ff, num_layers=config.num_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=16, relative_attention_max_distance=max_sequence_length,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False, use_cache=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
        project_in_dim=config.d_model, out_dim=config.token_dim))
    return TextEncoderBundle(pooled, (tokenizer, dt5), max_sequence_length=max_sequence_length)
