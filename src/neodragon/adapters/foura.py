"""FouRA: Fourier low-rank adapters, registered with PEFT as the method ``"foura"``.

``y = W x + scaling * F_out^T B g(A F_in x)``: the down- and up-projections A ``[r, in]`` and B ``[out, r]`` are
learned in an orthonormal frequency basis F along the channel axis, and ``g`` gates the r components.
Importing this module registers the method, after which ``get_peft_model(model, FouraConfig(...))``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work as for PEFT's own methods.

Design choices (the published material leaves them open; see ``shared/reference/adapters.md`` §2):

- **Transforms.** ``"dct"`` is the orthonormal DCT-II. ``"rfft"`` is the real FFT made orthonormal and real:
  the ``rfft(norm="ortho")`` bins are packed as DC, (Re, Im) pairs scaled by sqrt(2), and Nyquist, giving
  exactly ``n`` real coefficients. Both are ``n x n`` orthogonal matrices, so A and B stay real and the
  parameter count equals a rank-r LoRA's. Because F acts on the channel axis it folds into the factors,
  ``A F_in`` and ``F_out^T B`` (cost ``r n^2`` per call, independent of the token count), and the per-token
  cost is LoRA's. One basis per width is cached and shared by all layers.
- **Gates.** ``"none"``; ``"frozen"``: a stored 0/1 vector over the r components (``FouraModel.freeze_gates``
  derives it from an adaptive gate's average decisions on calibration data); ``"adaptive"``: per token, a
  small MLP on the low-rank frequency features gives ``sigmoid`` probabilities, the forward uses the hard
  0/1 mask ``p > 0.5`` in training and inference alike, and gradients pass through the sigmoid
  (straight-through estimator). The MLP's last bias starts at +3 so every component starts on. In a
  diffusion transformer the features carry the timestep through AdaLN modulation, which makes the gate
  timestep-adaptive without wiring the timestep into every layer. The paper's entropy term is not used.
- **Token axis** (``token_transform=True``): the adaptive gate then acts on the orthonormal transform of the
  low-rank features along the token axis, which is inverted before the up-projection. With no or a frozen
  gate the two token transforms cancel exactly, so they are skipped.
- **Merging** is allowed for ``none`` and ``frozen`` gates: ``dW = scaling * F_out^T B diag(m) A F_in``.
  Adaptive gates are not linear in the input; merging one raises, and it runs as a side branch.
- **Convolutions** (``nn.Conv2d``, e.g. a VAE decoder's): F acts on the input and output channels as for a
  Linear; A is a conv with the base layer's kernel, stride, padding and dilation (``[r, in, kh, kw]``) and B a
  1 x 1 conv, as in PEFT's conv LoRA, so the parameter count is ``r * (in * kh * kw + out)`` and the merged
  delta is the kernel ``F_out^T B diag(m) (A F_in)``. Gates act per pixel over the r channels; the token-axis
  transform is for token sequences and is refused on convs.
- **Initialisation** follows LoRA: A Kaiming-uniform, B zero (a no-op at step 0), ``scaling = alpha / r``
  times the strength set with ``set_scale``. Several adapters compose by adding their branches.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import PeftType, register_peft_method
from torch import nn

TRANSFORMS = ("dct", "rfft")
GATES = ("none", "frozen", "adaptive")
GATE_BIAS = 3.0  # sigmoid(3) = 0.95: every rank component starts switched on


def _peft_type(name: str) -> PeftType:
    """The PeftType member for an out-of-tree method.

    PeftType is a closed Enum and ``register_peft_method`` accepts only its members, so the member is added
    the way the Enum machinery stores its own members (what a new line in ``peft_types.py`` would do).
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    setattr(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


FOURA = _peft_type("FOURA")


# ---------------------------------------------------------------------------------------------- transforms


@functools.lru_cache(maxsize=16)
def frequency_basis(kind: str, n: int, device: torch.device = torch.device("cpu"),
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal analysis matrix ``[n, n]`` (coefficients = basis @ signal) of the DCT-II or the real FFT."""
    if kind == "dct":
        k = torch.arange(n, dtype=torch.float64)[:, None]
        i = torch.arange(n, dtype=torch.float64)[None, :]
        basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
        basis[0] /= math.sqrt(2)
    elif kind == "rfft":
        spectrum = torch.fft.rfft(torch.eye(n, dtype=torch.float64), norm="ortho")  # [signal, bin]
        pairs = torch.stack([spectrum.real[:, 1:(n + 1) // 2], spectrum.imag[:, 1:(n + 1) // 2]], dim=2)
        parts = [spectrum.real[:, :1], pairs.flatten(1) * math.sqrt(2)]
        if n % 2 == 0:
            parts.append(spectrum.real[:, n // 2:])
        basis = torch.cat(parts, dim=1).T
    else:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {kind!r}")
    return basis.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- config


@dataclass
class FouraConfig(PeftConfig):
    """Configuration of a FouRA adapter (PEFT method ``"foura"``); see the module docstring for the choices.

    Args:
        r: rank of the frequency-domain projections (parameters ``r * (in + out)`` per layer, as LoRA).
        foura_alpha: ``scaling = foura_alpha / r``.
        transform: ``"dct"`` (orthonormal DCT-II) or ``"rfft"`` (orthonormal real FFT), along the channels.
        token_transform: also transform along the token axis (used by the adaptive gate).
        gate: ``"none"``, ``"frozen"`` (a fixed 0/1 mask over the r components) or ``"adaptive"``.
        gate_hidden: hidden width of the adaptive gate's MLP.
        target_modules: ``nn.Linear`` or ``nn.Conv2d`` modules, as names/suffixes or a full-match regex.
        init_weights: ``True`` makes B zero (a no-op adapter); ``False`` random (for tests).
        modules_to_save: extra modules trained and saved in full.
    """

    r: int = field(default=8, metadata={"help": "Rank of the frequency-domain projections."})
    foura_alpha: float = field(default=8.0, metadata={"help": "scaling = foura_alpha / r"})
    transform: str = field(default="dct", metadata={"help": "'dct' or 'rfft', along the channel axis."})
    token_transform: bool = field(default=False, metadata={"help": "Also transform along the token axis."})
    gate: str = field(default="none", metadata={"help": "'none', 'frozen' or 'adaptive'."})
    gate_hidden: int = field(default=16, metadata={"help": "Hidden width of the adaptive gate MLP."})
    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Linear / Conv2d modules."})
    init_weights: bool = field(default=True, metadata={"help": "Zero B (no-op start); False for tests."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = FOURA
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


# ---------------------------------------------------------------------------------------------- layer


class FouraLayer(BaseTunerLayer):
    """FouRA adapter state of one wrapped layer (PEFT tuner-layer protocol)."""

    adapter_layer_names = ("foura_A", "foura_B", "foura_gate")
    other_param_names = ("r", "foura_alpha", "scaling", "transform", "token_transform", "gate_mode", "foura_mask")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.foura_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.transform: dict[str, str] = {}
        self.token_transform: dict[str, bool] = {}
        self.gate_mode: dict[str, str] = {}
        self.foura_A = nn.ParameterDict()
        self.foura_B = nn.ParameterDict()
        self.foura_gate = nn.ModuleDict()
        self.foura_mask = BufferDict(persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        # per adapter [r + 1]: tokens that used each component, then the token count (FouraModel.gate_usage)
        self.gate_usage: dict[str, torch.Tensor] | None = None
        if isinstance(base_layer, nn.Conv2d):
            self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels
            self.kernel_size: tuple[int, ...] = tuple(base_layer.kernel_size)
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
            self.kernel_size = ()

    def update_layer(self, adapter_name: str, config: FouraConfig, inference_mode: bool = False) -> None:
        r = config.r
        if self.kernel_size and config.token_transform:
            raise ValueError("token_transform transforms a token sequence; it does not apply to Conv2d layers. "
                             "Leave it off, or target Linear layers only.")
        self.r[adapter_name], self.foura_alpha[adapter_name] = r, config.foura_alpha
        self.scaling[adapter_name] = config.foura_alpha / r
        self.transform[adapter_name], self.token_transform[adapter_name] = config.transform, config.token_transform
        self.gate_mode[adapter_name] = config.gate
        self.foura_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features, *self.kernel_size))
        self.foura_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r))
        nn.init.kaiming_uniform_(self.foura_A[adapter_name], a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.foura_B[adapter_name])
        else:
            nn.init.normal_(self.foura_B[adapter_name], std=0.1)
        if config.gate == "adaptive":
            mlp = nn.Sequential(nn.Linear(r, config.gate_hidden), nn.SiLU(), nn.Linear(config.gate_hidden, r))
            nn.init.zeros_(mlp[2].weight)
            nn.init.constant_(mlp[2].bias, GATE_BIAS)
            self.foura_gate[adapter_name] = mlp
        elif config.gate == "frozen":
            self.foura_mask[adapter_name] = torch.ones(r)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """Strength of one adapter: ``scaling = scale * foura_alpha / r``."""
        if adapter_name in self.scaling:
            self.scaling[adapter_name] = scale * self.foura_alpha[adapter_name] / self.r[adapter_name]

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The projections in the signal domain: ``A F_in`` ``[r, in, *kernel]`` and ``F_out^T B`` ``[out, r]``."""
        a, b = self.foura_A[adapter_name], self.foura_B[adapter_name]
        kind = self.transform[adapter_name]
        return (torch.einsum("rf...,fi->ri...", a, frequency_basis(kind, self.in_features, a.device, a.dtype)),
                frequency_basis(kind, self.out_features, b.device, b.dtype).T @ b)

    def _adaptive_gate(self, adapter_name: str, z: torch.Tensor) -> torch.Tensor:
        token_axis = self.token_transform[adapter_name] and z.ndim >= 3
        if token_axis:
            basis = frequency_basis(self.transform[adapter_name], z.shape[-2], z.device, z.dtype)
            z = basis @ z
        soft = torch.sigmoid(self.foura_gate[adapter_name](z))
        hard = (soft > 0.5).to(z.dtype)
        if self.gate_usage is not None and adapter_name in self.gate_usage:
            flat = hard.detach().reshape(-1, hard.shape[-1])
            self.gate_usage[adapter_name] += torch.cat([flat.sum(0), flat.new_tensor([flat.shape[0]])])
        z = z * (hard + (soft - soft.detach()))  # straight-through: the value is the hard mask exactly
        return basis.T @ z if token_axis else z

    def adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """This adapter's additive contribution to the layer output."""
        a_eff, b_eff = self._factors(adapter_name)
        x = self._cast_input_dtype(x, a_eff.dtype)
        if self.kernel_size:  # channels first: the gates see [..., r] per pixel
            base = self.get_base_layer()
            z = F.conv2d(x, a_eff, None, base.stride, base.padding, base.dilation).movedim(1, -1)
        else:
            z = F.linear(x, a_eff)
        gate = self.gate_mode[adapter_name]
        if gate == "frozen":
            z = z * self.foura_mask[adapter_name]
        elif gate == "adaptive":
            z = self._adaptive_gate(adapter_name, z)
        out = F.linear(z, b_eff)
        return (out.movedim(-1, 1) if self.kernel_size else out) * self.scaling[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``dW`` ``[out, in, *kernel]`` of a mergeable (non-adaptive) adapter."""
        if self.gate_mode[adapter_name] == "adaptive":
            raise ValueError(f"FouRA adapter {adapter_name!r} has an input-adaptive gate, which is not linear in the "
                             "input and has no weight delta; it runs unmerged. Merge only the other adapters "
                             "(adapter_names=[...]) or freeze its gate first (FouraModel.freeze_gates).")
        a_eff, b_eff = self._factors(adapter_name)
        if self.gate_mode[adapter_name] == "frozen":
            a_eff = a_eff * self.foura_mask[adapter_name].view(-1, *[1] * (a_eff.ndim - 1))
        return torch.einsum("or,ri...->oi...", b_eff, a_eff) * self.scaling[adapter_name]


class FouraLinear(nn.Module, FouraLayer):
    """An ``nn.Linear`` (or, as ``FouraConv2d``, an ``nn.Conv2d``) with FouRA adapters."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, adapter_name: str, config: FouraConfig) -> None:
        super().__init__()
        FouraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.foura_A]
        deltas = {n: self.get_delta_weight(n) for n in names}  # raises for adaptive gates before any change
        weight = self.get_base_layer().weight
        for name, delta in deltas.items():
            merged = weight.data + delta.to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"Merging FouRA adapter {name!r} gives non-finite weights; the adapter is broken.")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            weight.data -= self.get_delta_weight(self.merged_adapters.pop()).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.foura_A and name not in self.merged_adapters:
                result = result + self.adapter_output(name, x).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "foura." + super().__repr__()


class FouraConv2d(FouraLinear):
    """An ``nn.Conv2d`` with FouRA adapters: A is a conv with the base kernel, B a 1 x 1 conv (module docstring);
    merging, unmerging and the forward are ``FouraLinear``'s, which dispatch on ``kernel_size``."""


# ---------------------------------------------------------------------------------------------- model


class FouraModel(BaseTuner):
    """PEFT tuner that wraps the targeted ``nn.Linear`` / ``nn.Conv2d`` layers in ``FouraLinear`` / ``FouraConv2d``."""

    prefix: str = "foura_"
    tuner_layer_cls = FouraLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _create_and_replace(self, foura_config: FouraConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **optional_kwargs) -> None:
        if isinstance(target, FouraLayer):
            target.update_layer(adapter_name, foura_config)
            return
        if isinstance(target, nn.Conv2d):
            if target.groups != 1 or target.padding_mode != "zeros":
                raise TypeError(f"FouRA adapts plain convolutions only, but {current_key!r} has groups="
                                f"{target.groups} and padding_mode={target.padding_mode!r}. Leave it out of "
                                "target_modules.")
            new_module = FouraConv2d(target, adapter_name, foura_config)
        elif isinstance(target, nn.Linear):
            new_module = FouraLinear(target, adapter_name, foura_config)
        else:
            raise TypeError(f"FouRA adapts nn.Linear and nn.Conv2d layers only, but target_modules matched "
                            f"{current_key!r} ({type(target).__name__}). Narrow target_modules to those layers.")
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is activated
        self._replace_module(parent, target_name, new_module, target)

    def _layers(self) -> Iterator[tuple[str, FouraLayer]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, FouraLayer))

    def set_strengths(self, strengths: Mapping[str, float]) -> None:
        """Per-adapter strengths for composing several active adapters (``set_adapter([...])``)."""
        for _, layer in self._layers():
            for adapter_name, strength in strengths.items():
                layer.set_scale(adapter_name, strength)

    @contextmanager
    def gate_usage(self, adapter_name: str = "default") -> Iterator[dict[str, torch.Tensor]]:
        """Record the adaptive gate's hard decisions while the block runs; on exit the yielded dict maps each
        layer to the fraction of tokens that used each rank component (its mean is the effective rank / r)."""
        usage: dict[str, torch.Tensor] = {}
        layers = [(n, m) for n, m in self._layers() if m.gate_mode.get(adapter_name) == "adaptive"]
        if not layers:
            raise ValueError(f"Adapter {adapter_name!r} has no adaptive gate.")
        for _, layer in layers:
            layer.gate_usage = {adapter_name: layer.foura_A[adapter_name].new_zeros(layer.r[adapter_name] + 1)}
        try:
            yield usage
        finally:
            for name, layer in layers:
                totals = layer.gate_usage[adapter_name]
                usage[name] = totals[:-1] / totals[-1].clamp(min=1)
                layer.gate_usage = None

    def freeze_gates(self, adapter_name: str, usage: Mapping[str, torch.Tensor], threshold: float = 0.5) -> None:
        """Turn an adaptive gate into a frozen 0/1 mask: components used by at least ``threshold`` of the
        calibration tokens (``gate_usage``) stay on. The adapter becomes mergeable."""
        layers = dict(self._layers())
        missing = [n for n, m in layers.items() if m.gate_mode.get(adapter_name) == "adaptive" and n not in usage]
        if missing:
            raise ValueError(f"No gate usage recorded for {missing[:3]}; run calibration inputs inside gate_usage().")
        for name, fraction in usage.items():
            layer = layers[name]
            layer.foura_mask[adapter_name] = (fraction >= threshold).to(layer.foura_A[adapter_name])
            del layer.foura_gate[adapter_name]
            layer.gate_mode[adapter_name] = "frozen"
        self.peft_config[adapter_name].gate = "frozen"

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: PeftConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = model.state_dict()
        for key, tensor in remapped.items():
            if key in expected and expected[key].shape != tensor.shape:
                layer = re.sub(r"\.foura_\w+.*$", "", key)
                raise ValueError(f"FouRA checkpoint tensor for {layer!r} has shape {tuple(tensor.shape)} but this "
                                 f"model expects {tuple(expected[key].shape)}: the adapter was trained for another "
                                 "model configuration (layer width) or rank. Load it into the model it was trained "
                                 "for, or train one for this model.")
        return remapped


if FOURA not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(name="foura", config_cls=FouraConfig, model_cls=FouraModel, prefix="foura_")
