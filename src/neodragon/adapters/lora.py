"""The LoRA baseline through PEFT, sized to match a SHiRA adapter's parameter count layer by layer."""

from __future__ import annotations

import re
from collections import Counter

from peft import LoraConfig
from torch import nn

from .shira import ShiraAdapter, matrix_shape, names_regex


def matching_lora_ranks(adapter: ShiraAdapter) -> dict[str, int]:
    """Per layer, the LoRA rank whose parameter count ``r * (out + fan_in)`` is closest to the adapter's nnz
    (exactly equal when the masks were built with ``MaskSpec(r=...)``)."""
    return {name: max(1, round(values.numel() / sum(matrix_shape(adapter.shapes[name]))))
            for name, values in adapter.values.items()}


def matching_lora_config(adapter: ShiraAdapter, **kwargs) -> LoraConfig:
    """A PEFT ``LoraConfig`` on the adapter's layers with matching per-layer ranks and ``lora_alpha = r``
    (scaling 1, SHiRA's convention). ``kwargs`` go to ``LoraConfig``."""
    ranks = matching_lora_ranks(adapter)
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    return LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                      target_modules=names_regex(ranks), **kwargs)


def lora_param_count(model: nn.Module) -> int:
    """Trainable LoRA parameters of a PEFT-wrapped model (``lora_A`` and ``lora_B``)."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)
