"""SHiRA: sparse high-rank adapters that train a fixed 1-2 % of a layer's existing weights.

An adapter is, per layer, a sorted vector of flat indices into the weight and the trained deltas at them:
``W_new = W + scale * S`` with ``supp(S)`` fixed by a mask. Linear and Conv1d/2d/3d layers are supported; a
convolution is treated as its ``[out, in/groups * prod(kernel)]`` matrix, so flat indices are the same for
both views. Masks are built per layer from a seed (``layer_seed``), so same-shaped layers get different masks.

Training keeps only the ``[nnz]`` values as parameters (``ShiraLayer``); fused-mode switching between adapters
lives in :mod:`neodragon.adapters.switching`.

Design choices (the paper leaves them open; see ``shared/reference/adapters.md`` §1.3, §1.9):

- **Budget**: ``density`` rounds ``density * out * fan_in`` to the nearest entry; ``r`` gives PEFT's
  ``r * (out + fan_in)``. Every strategy returns exactly that many entries.
- **Scores and ties**: each strategy scores every entry and the top k are kept; ties at the threshold go to
  the lowest flat indices (``top_k_indices``). ``random`` scores are float64 uniforms from the layer's seed.
- **Grad / SNIP**: scores from the sum over calibration batches of ``|dL/dW|`` per batch (so gradients whose
  sign flips between batches do not cancel), times ``|W|`` for SNIP. The caller chooses the batches; a few
  are enough for a stable top-1 %.
- **Struct**: the stretched diagonal ``(t * out // L, t * fan_in // L)``, ``L = max(out, fan_in)``, plus every
  f-th row (or column) from a seeded start within the first stride; one partial line meets the budget.
  Different seeds shift the lines; ``exclude=`` gives strictly non-overlapping adapters for any strategy.
- **Files**: flat int32 indices + float32 values (8 bytes per entry; PEFT's layout takes 12) with the layer
  shapes in the safetensors metadata.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.mmdit import DIT_TARGETS
from ..utils.video import atomic_path

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
STRATEGIES = ("struct", "random", "wm", "grad", "snip")
FORMAT = "neodragon-shira/1"
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------- targets


def names_regex(names: Iterable[str]) -> str:
    """A regex that fully matches exactly these module names (PEFT's ``target_modules`` string form)."""
    return "(" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> dict[str, nn.Module]:
    """Modules selected like PEFT does: a string is a regex matched against the full name, a list holds names
    or name suffixes (``"to_q"`` matches ``"...attn.to_q"``)."""
    if isinstance(target_modules, str):
        def match(name: str) -> bool:
            return re.fullmatch(target_modules, name) is not None
    else:
        suffixes = tuple(target_modules)

        def match(name: str) -> bool:
            return any(name == t or name.endswith("." + t) for t in suffixes)

    found = {name: module for name, module in model.named_modules() if name and match(name)}
    if not found:
        examples = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_LAYERS)][:6]
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}. Its "
                         f"adaptable layers are named like {examples}: pass such names (or suffixes) or a regex "
                         "that fully matches them.")
    wrong = {n: type(m).__name__ for n, m in found.items() if not isinstance(m, SUPPORTED_LAYERS)}
    if wrong:
        raise TypeError(f"SHiRA adapts nn.Linear and nn.Conv1d/2d/3d only, but target_modules also matched {wrong}. "
                        "Narrow target_modules to the layers themselves (and unwrap layers already wrapped by an "
                        "adapter).")
    return found


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """(out, fan_in) of a Linear or ConvNd weight viewed as a matrix."""
    return shape[0], math.prod(shape[1:])


def layer_seed(seed: int, name: str) -> int:
    """Deterministic per-layer seed: the same base seed gives different masks to same-shaped layers. It has
    32 bits because the CPU generator (mt19937) ignores higher seed bits."""
    return zlib.crc32(f"{seed}/{name}".encode())


# ---------------------------------------------------------------------------------------------- masks


@dataclass
class MaskSpec:
    """Which layers SHiRA adapts (``target_modules``), which entries it trains (``strategy``) and how many.

    The budget is either ``density`` (a fraction of each layer's weights, rounded to the nearest entry) or
    PEFT's ``r`` convention: ``r * (out + fan_in)`` entries, the parameter count of a rank-``r`` LoRA. With
    neither given, ``density=0.01``. ``struct_axis`` picks rows or columns for the ``struct`` strategy.
    """

    target_modules: str | list[str] = DIT_TARGETS
    strategy: str = "random"
    density: float | None = None
    r: int | None = None
    seed: int = 0
    struct_axis: str = "rows"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.struct_axis not in ("rows", "cols"):
            raise ValueError(f"struct_axis must be 'rows' or 'cols', got {self.struct_axis!r}")
        if self.density is not None and self.r is not None:
            raise ValueError("Give the budget as density or as r, not both.")
        if self.density is None and self.r is None:
            self.density = 0.01
        if self.density is not None and not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.r is not None and self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be in [0, 2**31), got {self.seed}")

    def budget(self, shape: Sequence[int]) -> int:
        """Number of trainable entries of a layer with this weight shape."""
        out, fan_in = matrix_shape(shape)
        k = self.r * (out + fan_in) if self.r is not None else round(self.density * out * fan_in)
        if not 1 <= k <= out * fan_in:
            raise ValueError(f"A budget of {k} entries does not fit a {out}x{fan_in} weight; lower r or density.")
        return k


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted flat indices of the k highest scores; ties at the threshold go to the lowest indices, so the
    result does not depend on how ``topk`` orders equal values."""
    scores = scores.reshape(-1)
    kth = scores.topk(k, sorted=False).values.min()
    above = (scores > kth).nonzero().squeeze(1)
    ties = (scores == kth).nonzero().squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def _spread_priority(count: int, needed: int, generator: torch.Generator, cyclic: bool) -> torch.Tensor:
    """Priorities (lowest first) of ``count`` items: every ``count // needed``-th item from a seeded start,
    then the items after those, so that the first ``needed`` are evenly spread. The start lies within the
    first stride, or anywhere when ``cyclic`` (the first ``needed`` then wrap around the end)."""
    stride = max(1, count // max(needed, 1))
    start = int(torch.randint(count if cyclic else stride, (1,), generator=generator))
    rotated = (torch.arange(count) - start) % count
    return (rotated % stride) * count + rotated


def struct_scores(shape: Sequence[int], k: int, generator: torch.Generator, axis: str = "rows") -> torch.Tensor:
    """SHiRA-Struct priorities: the (stretched) diagonal first, then whole rows (or columns) at an even stride
    from a seeded start. The top-k of these scores is the diagonal plus every f-th line, with one partial line
    to meet the budget exactly (or an evenly spread part of the diagonal for budgets below its length)."""
    rows, cols = matrix_shape(shape)
    n, m = (rows, cols) if axis == "rows" else (cols, rows)  # n lines of length m
    diag_len = max(n, m)
    t = torch.arange(diag_len)
    diag_priority = _spread_priority(diag_len, k, generator, cyclic=True)
    line_priority = _spread_priority(n, math.ceil(max(k - diag_len, 0) / m), generator, cyclic=False)
    scores = (-line_priority).double()[:, None].expand(n, m).clone()  # <= 0
    scores[t * n // diag_len, t * m // diag_len] = 1.0 + (diag_priority.max() - diag_priority).double()  # >= 1
    return scores if axis == "rows" else scores.T.contiguous()


def select_indices(weight: torch.Tensor, k: int, strategy: str, *, generator: torch.Generator,
                   grad_abs: torch.Tensor | None = None, struct_axis: str = "rows",
                   exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted flat indices of the k entries of ``weight`` that a SHiRA mask of this strategy trains.

    ``grad_abs`` is the calibration gradient magnitude (``calibration_gradients``) needed by ``grad`` and
    ``snip``. ``exclude`` holds flat indices that may not be chosen (non-overlapping adapters).
    """
    w = weight.detach().reshape(-1)
    if strategy == "random":
        scores = torch.rand(w.numel(), generator=generator, dtype=torch.float64)
    elif strategy == "wm":
        scores = w.float().abs()
    elif strategy in ("grad", "snip"):
        if grad_abs is None:
            raise ValueError(f"strategy {strategy!r} needs calibration gradients: pass loss_fn and batches.")
        scores = grad_abs.reshape(-1).float() * (w.float().abs() if strategy == "snip" else 1.0)
        scores = scores.nan_to_num(nan=-math.inf)
    elif strategy == "struct":
        scores = struct_scores(weight.shape, k, generator, struct_axis).reshape(-1)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if exclude is not None and exclude.numel():
        if w.numel() - exclude.numel() < k:
            raise ValueError(f"Only {w.numel() - exclude.numel()} entries remain outside the excluded adapter; "
                             f"a budget of {k} needs more: lower the budget.")
        scores = scores.clone()
        scores[exclude] = -math.inf
    return top_k_indices(scores, k)


def _accumulate_abs(total: torch.Tensor, param: torch.Tensor) -> None:
    total.add_(param.grad.abs())
    param.grad = None


def calibration_gradients(model: nn.Module, targets: Mapping[str, nn.Module],
                          loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                          batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Per target weight, the sum over calibration batches of ``|dL/dW|`` (float32).

    Summing magnitudes per batch (rather than taking the magnitude of the summed gradient) keeps entries whose
    gradient changes sign between batches. Each gradient is folded into the sum by a post-accumulate hook and
    dropped at once, so at most one dense gradient per layer exists at a time; other parameters get none.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    sums = {name: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device)
            for name, m in targets.items()}
    hooks = []
    try:
        for p in params:
            p.requires_grad_(False)
        for name, module in targets.items():
            module.weight.requires_grad_(True)
            hooks.append(module.weight.register_post_accumulate_grad_hook(
                lambda p, total=sums[name]: _accumulate_abs(total, p)))
        count = 0
        for batch in batches:
            loss_fn(model, batch).backward()
            count += 1
        if not count:
            raise ValueError("No calibration batches were given.")
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return sums


def build_shira(model: nn.Module, spec: MaskSpec, *, loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                batches: Iterable[Any] | None = None, exclude: ShiraAdapter | None = None) -> ShiraAdapter:
    """A zero-valued adapter (the masks) for the layers ``spec`` targets.

    ``grad`` and ``snip`` need ``loss_fn(model, batch) -> loss`` and a few calibration ``batches``.
    ``exclude``: entries of that adapter are not chosen (SHiRA's non-overlapping multi-adapter setting).
    """
    targets = find_targets(model, spec.target_modules)
    grads = {}
    if spec.strategy in ("grad", "snip"):
        if loss_fn is None or batches is None:
            raise ValueError(f"strategy {spec.strategy!r} needs loss_fn and calibration batches.")
        grads = calibration_gradients(model, targets, loss_fn, batches)
    indices, values, shapes = {}, {}, {}
    for name, module in targets.items():
        generator = torch.Generator().manual_seed(layer_seed(spec.seed, name))
        skip = exclude.indices.get(name) if exclude is not None else None
        k = spec.budget(module.weight.shape)
        idx = select_indices(module.weight, k, spec.strategy, generator=generator, grad_abs=grads.get(name),
                             struct_axis=spec.struct_axis, exclude=skip).cpu()
        indices[name], values[name], shapes[name] = idx, torch.zeros(k), tuple(module.weight.shape)
    budget = {"r": spec.r} if spec.r is not None else {"density": spec.density}
    metadata = {"strategy": spec.strategy, "seed": spec.seed, "struct_axis": spec.struct_axis, **budget}
    return ShiraAdapter(indices, values, shapes, metadata)


# ---------------------------------------------------------------------------------------------- the adapter


def fused_values(base: torch.Tensor, values: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``base + scale * values`` computed in float32 and rounded once into the weight dtype. Training, merging
    and fused switching all use it, so their weights agree bit for bit."""
    return (base.float() + values.float() * scale).to(base.dtype)


def sparse_update(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  scale: float = 1.0) -> torch.Tensor:
    """A new tensor: ``weight`` with ``scale * values`` added at the flat ``indices`` (differentiable in values)."""
    flat = weight.reshape(-1)
    return flat.index_copy(0, indices, fused_values(flat.index_select(0, indices), values, scale)).view_as(weight)


def isin_sorted(elements: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """``torch.isin`` for sorted unique index vectors by binary search (much faster on the CPU)."""
    if not test.numel():
        return torch.zeros_like(elements, dtype=torch.bool)
    position = torch.searchsorted(test, elements).clamp_(max=test.numel() - 1)
    return test[position] == elements


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(text)


@dataclass
class ShiraAdapter:
    """A SHiRA adapter: per layer name, sorted unique flat ``indices`` (int64) into the weight, the trained
    deltas ``values`` (float32) at them, and the weight ``shapes`` it was made for."""

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.indices.keys() == self.values.keys() == self.shapes.keys():
            raise ValueError("indices, values and shapes must have the same layer names.")
        for name, idx in self.indices.items():
            if idx.ndim != 1 or idx.shape != self.values[name].shape:
                raise ValueError(f"Layer {name!r}: indices {tuple(idx.shape)} and values "
                                 f"{tuple(self.values[name].shape)} must be equal-length vectors.")
            if idx.numel() and (idx[0] < 0 or idx[-1] >= math.prod(self.shapes[name])
                                or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()))):
                raise ValueError(f"Layer {name!r}: indices must be sorted, unique and inside the weight "
                                 f"{self.shapes[name]}.")

    @property
    def num_params(self) -> int:
        return sum(v.numel() for v in self.values.values())

    def density(self) -> float:
        return self.num_params / sum(math.prod(s) for s in self.shapes.values())

    def delta(self, name: str) -> torch.Tensor:
        """The layer's sparse delta as a coalesced COO matrix ``[out, fan_in]``."""
        out, fan_in = matrix_shape(self.shapes[name])
        idx = self.indices[name]
        return torch.sparse_coo_tensor(torch.stack([idx // fan_in, idx % fan_in]), self.values[name],
                                       (out, fan_in), is_coalesced=True, check_invariants=False)

    def check(self, model: nn.Module) -> dict[str, nn.Module]:
        """The model's modules for this adapter's layers; a clear error when names, types or shapes differ."""
        modules = dict(model.named_modules())
        missing = sorted(set(self.shapes) - set(modules))
        if missing:
            have = [n for n, m in modules.items() if isinstance(m, SUPPORTED_LAYERS)][:4]
            raise ValueError(f"The adapter targets {len(missing)} layers the model does not have, e.g. {missing[:3]} "
                             f"(the model's layers are named like {have}). Load it into the model it was made for, "
                             "or into the same sub-model (for example the DiT, not the pipeline).")
        found = {name: modules[name] for name in self.shapes}
        wrong = {n: type(m).__name__ for n, m in found.items() if not isinstance(m, SUPPORTED_LAYERS)}
        if wrong:
            raise TypeError(f"Layers {wrong} are not plain Linear/Conv layers (already wrapped by an adapter?). "
                            "Use the unwrapped model, e.g. after remove_shira() or PEFT's unload().")
        bad = {n: (self.shapes[n], tuple(m.weight.shape)) for n, m in found.items()
               if tuple(m.weight.shape) != tuple(self.shapes[n])}
        if bad:
            name, (want, have) = next(iter(bad.items()))
            raise ValueError(f"{len(bad)} layers have other shapes than the adapter was made for, e.g. {name!r}: "
                             f"adapter {want}, model {have}. The adapter belongs to a different model configuration "
                             "(width, channels or kernel); build or train one for this model.")
        return found

    # -- files

    def save(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write indices (int32) and values (``dtype``; float16 halves the file) to one safetensors file,
        atomically."""
        path = Path(path)
        tensors = {}
        for name, idx in self.indices.items():
            small = math.prod(self.shapes[name]) < 2**31
            tensors[f"{name}.indices"] = idx.to(torch.int32 if small else torch.int64).contiguous()
            tensors[f"{name}.values"] = self.values[name].detach().to(dtype).contiguous()
        metadata = {"format": FORMAT, "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
                    "metadata": json.dumps(self.metadata)}
        _atomic_save(tensors, path, metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ShiraAdapter:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a neodragon SHiRA adapter (format {header.get('format')!r}); for a "
                             "PEFT adapter folder use ShiraAdapter.from_peft(folder, model).")
        tensors = load_file(str(path))
        shapes = {n: tuple(s) for n, s in json.loads(header["shapes"]).items()}
        return cls({n: tensors[f"{n}.indices"].long() for n in shapes}, {n: tensors[f"{n}.values"] for n in shapes},
                   shapes, json.loads(header["metadata"]))

    def to_peft(self, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write a PEFT SHiRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
        ``PeftModel.from_pretrained`` loads. PEFT's SHiRA adapts Linear layers with ``r * (in + out)`` entries
        each for one ``r``, so the masks must have been built with ``MaskSpec(r=...)``."""
        from peft import ShiraConfig as PeftShiraConfig

        convs = [n for n, s in self.shapes.items() if len(s) != 2]
        if convs:
            raise ValueError(f"PEFT's SHiRA adapts nn.Linear only; this adapter also has conv layers {convs[:3]}. "
                             "Keep it in neodragon's format (ShiraAdapter.save).")
        ranks = {n: self.values[n].numel() / sum(s) for n, s in self.shapes.items()}
        if len(set(ranks.values())) != 1 or not next(iter(ranks.values())).is_integer():
            example = next(iter(ranks.items()))
            raise ValueError(f"PEFT's SHiRA stores r * (in + out) entries per layer for a single integer r, but e.g. "
                             f"layer {example[0]!r} has {example[1]:.3g} * (in + out). Build the masks with "
                             "MaskSpec(r=...) to export to PEFT.")
        config = PeftShiraConfig(r=int(next(iter(ranks.values()))), target_modules=names_regex(self.shapes),
                                 mask_type=self.metadata.get("strategy", "random"), inference_mode=True,
                                 random_seed=self.metadata.get("seed"), base_model_name_or_path=base_model_name_or_path)
        tensors = {}
        for name, idx in self.indices.items():
            fan_in = self.shapes[name][1]
            tensors[f"{PEFT_PREFIX}{name}.shira_weight"] = self.values[name].detach().float().contiguous()
            tensors[f"{PEFT_PREFIX}{name}.shira_indices"] = torch.stack([idx // fan_in, idx % fan_in]).int()
        directory = Path(directory)
        _atomic_save(tensors, directory / "adapter_model.safetensors")
        _atomic_write_text(directory / "adapter_config.json", json.dumps(config.to_dict(), indent=2, default=list))
        return directory

    @classmethod
    def from_peft(cls, directory: str | Path, model: nn.Module) -> ShiraAdapter:
        """Read a PEFT SHiRA adapter folder; ``model`` (the base model PEFT wrapped) gives the layer shapes."""
        directory = Path(directory)
        config = json.loads((directory / "adapter_config.json").read_text())
        if config.get("peft_type") != "SHIRA":
            raise ValueError(f"{directory} holds a PEFT {config.get('peft_type')} adapter, not SHiRA.")
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        modules = dict(model.named_modules())
        indices, values, shapes = {}, {}, {}
        for key, weight in tensors.items():
            if not key.endswith(".shira_weight"):
                continue
            name = key.removeprefix(PEFT_PREFIX).removesuffix(".shira_weight")
            if name not in modules or not isinstance(modules[name], nn.Linear):
                raise ValueError(f"The PEFT adapter targets {name!r}, which is not a Linear layer of "
                                 f"{type(model).__name__}. Pass the base model the adapter was trained on.")
            rows_cols = tensors[key.removesuffix("shira_weight") + "shira_indices"].long()
            shape = tuple(modules[name].weight.shape)
            if weight.numel() != config["r"] * sum(shape) or bool((rows_cols.amax(1) >= torch.tensor(shape)).any()):
                raise ValueError(f"Layer {name!r} of the PEFT adapter (r={config['r']}, {weight.numel()} entries) "
                                 f"does not fit the model's {shape} weight: the adapter belongs to a different model "
                                 "configuration. Pass the base model it was trained on.")
            flat = rows_cols[0] * shape[1] + rows_cols[1]
            order = flat.argsort()
            indices[name], values[name], shapes[name] = flat[order], weight[order].float(), shape
        if not indices:
            raise ValueError(f"{directory} has no SHiRA weights.")
        adapter = cls(indices, values, shapes, {"strategy": config.get("mask_type"), "r": config.get("r"),
                                                "seed": config.get("random_seed"), "source": "peft"})
        adapter.check(model)
        return adapter


# ---------------------------------------------------------------------------------------------- training


class ShiraLayer(nn.Module):
    """A Linear/ConvNd layer whose frozen weight gets a trainable sparse delta at fixed flat indices.

    Only ``values`` ``[nnz]`` is a parameter. The forward builds the effective weight out of place with
    ``sparse_update`` on the detached base weight, so the frozen weight gets no gradient and the optimiser
    keeps state for the values only. Costs: the effective weight (a dense copy per adapted layer) is kept for
    the backward pass, where the layer's dense weight gradient exists briefly before being gathered at the
    indices.
    """

    def __init__(self, base_layer: nn.Module, indices: torch.Tensor, values: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.base_layer = base_layer
        device = base_layer.weight.device
        self.register_buffer("indices", indices.to(device=device, dtype=torch.long))
        self.values = nn.Parameter(values.detach().to(device=device, dtype=torch.float32).clone())
        self.scale = scale

    def effective_weight(self) -> torch.Tensor:
        return sparse_update(self.base_layer.weight.detach(), self.indices, self.values, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.base_layer, {"weight": self.effective_weight()}, (x,))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def add_shira(model: nn.Module, adapter: ShiraAdapter, trainable: bool = True) -> dict[str, ShiraLayer]:
    """Wrap the adapter's layers in ``ShiraLayer`` (values start from the adapter's) and freeze everything else,
    so that gradients reach only the sparse values."""
    modules = adapter.check(model)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = {}
    for name, module in modules.items():
        layers[name] = ShiraLayer(module, adapter.indices[name], adapter.values[name])
        layers[name].values.requires_grad_(trainable)
        _set_submodule(model, name, layers[name])
    return layers


def get_shira(model: nn.Module, metadata: dict[str, Any] | None = None) -> ShiraAdapter:
    """The adapter currently held by the model's ``ShiraLayer`` modules (values copied)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ShiraLayer)}
    if not layers:
        raise ValueError("The model has no ShiraLayer; add one with add_shira().")
    return ShiraAdapter({n: m.indices.cpu() for n, m in layers.items()},
                        {n: m.values.detach().float().cpu().clone() for n, m in layers.items()},
                        {n: tuple(m.base_layer.weight.shape) for n, m in layers.items()}, dict(metadata or {}))


def remove_shira(model: nn.Module, merge: bool = False) -> ShiraAdapter:
    """Unwrap every ``ShiraLayer``; with ``merge`` the deltas are written into the weights for good."""
    adapter = get_shira(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, ShiraLayer)]:
        if merge:
            with torch.no_grad():
                layer.base_layer.weight.copy_(layer.effective_weight())
        _set_submodule(model, name, layer.base_layer)
    return adapter


# ---------------------------------------------------------------------------------------------- fusion


def fuse_adapters(adapters: Sequence[ShiraAdapter], weights: Sequence[float] | None = None) -> ShiraAdapter:
    """SHiRA multi-adapter fusion: ``sum_i w_i S_i`` as one adapter over the union of the masks."""
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if not adapters or len(weights) != len(adapters):
        raise ValueError("Give one or more adapters and one weight per adapter.")
    shapes: dict[str, tuple[int, ...]] = {}
    for adapter in adapters:
        for name, shape in adapter.shapes.items():
            if shapes.setdefault(name, shape) != shape:
                raise ValueError(f"Layer {name!r} has shape {shapes[name]} in one adapter and {shape} in another: "
                                 "the adapters were made for different models.")
    indices, values = {}, {}
    for name in shapes:
        parts = [(a.indices[name], a.values[name].float() * w) for a, w in zip(adapters, weights, strict=True)
                 if name in a.indices]
        union, inverse = torch.cat([p[0] for p in parts]).unique(return_inverse=True)
        indices[name] = union
        values[name] = torch.zeros(union.numel()).index_add_(0, inverse, torch.cat([p[1] for p in parts]))
    return ShiraAdapter(indices, values, shapes, {"fused": [a.metadata for a in adapters], "weights": weights})


def orthogonality(delta_1: torch.Tensor, delta_2: torch.Tensor) -> tuple[float, float]:
    """SHiRA's AWOM ``||A1^T A2||_2`` and AWOR ``1 - ||A1^T A2||_0 / m^2`` of two adapter weights ``[n, m]``
    (dense or sparse; LoRA's ``B @ A`` works too). The product is formed densely in float64."""
    product = delta_1.to_dense().double().T @ delta_2.to_dense().double()
    awom = torch.linalg.matrix_norm(product, ord=2).item()
    return awom, 1.0 - product.count_nonzero().item() / product.numel()


def overlap_stats(a: ShiraAdapter, b: ShiraAdapter, metrics: bool = False) -> dict[str, dict[str, float]]:
    """Per shared layer: sizes, shared entries, Jaccard index and, with ``metrics``, AWOM/AWOR."""
    stats = {}
    for name in sorted(a.indices.keys() & b.indices.keys()):
        shared = int(isin_sorted(a.indices[name], b.indices[name]).sum())
        union = a.indices[name].numel() + b.indices[name].numel() - shared
        row = {"nnz_a": a.indices[name].numel(), "nnz_b": b.indices[name].numel(), "shared": shared,
               "jaccard": shared / union if union else 0.0}
        if metrics:
            row["awom"], row["awor"] = orthogonality(a.delta(name), b.delta(name))
        stats[name] = row
    return stats
