"""Fused-mode SHiRA switching: adapters are scattered into the model's weights in place.

Only the adapter's 1-2 % of entries are touched, so applying, switching and removing an adapter costs a
gather and a scatter per layer instead of LoRA's dense ``W +/- B @ A``. The original values at the touched
entries are kept in the weight's own dtype, so removing an adapter restores the weights bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from .shira import ShiraAdapter, fused_values


class AdapterSwitcher:
    """Applies SHiRA adapters to ``model`` in fused mode and moves between them.

    ``apply(b)`` while ``a`` is applied goes from ``W + S_a`` to ``W + S_b`` in one pass over the layers: in each
    layer the entries of ``a`` get their original values back and those of ``b`` are written, in the same step,
    so the model never returns to its unadapted weights as a whole (LoRA unfuses everything, then fuses again).
    ``restore()`` gives back the exact original weights. Apply several adapters at once by applying
    ``fuse_adapters([...], weights)``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.active: ShiraAdapter | None = None
        self.scale = 1.0
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (indices, original values)

    def apply(self, adapter: ShiraAdapter, scale: float = 1.0) -> None:
        """Make ``W + scale * S_adapter`` the model's weights, whatever adapter was applied before."""
        adapter.check(self.model)
        with torch.no_grad():
            for name in sorted(self._saved.keys() | adapter.indices.keys()):
                self._switch_layer(name, adapter.indices.get(name), adapter.values.get(name), scale)
        self.active, self.scale = adapter, scale

    def restore(self) -> None:
        """Remove the applied adapter: the weights are again exactly the originals."""
        with torch.no_grad():
            for name in list(self._saved):
                self._switch_layer(name, None, None, 1.0)
        self.active, self.scale = None, 1.0

    def _switch_layer(self, name: str, indices: torch.Tensor | None, values: torch.Tensor | None,
                      scale: float) -> None:
        flat = self.model.get_submodule(name).weight.detach().view(-1)
        if name in self._saved:
            old, original = self._saved.pop(name)
            flat.index_copy_(0, old, original)  # index_select/index_copy_: far faster than [] indexing on the CPU
        if indices is not None:
            indices = indices.to(flat.device)
            base = flat.index_select(0, indices)
            flat.index_copy_(0, indices, fused_values(base, values.to(flat.device), scale))
            self._saved[name] = (indices, base)
