"""Pyramidal flow-matching scheduler (stateless), history pyramid and training-side helpers."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

Index = int | torch.Tensor


def _resize_frames(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize every frame of a [B, C, T, H, W] tensor spatially."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)
    frames = F.interpolate(frames, size=size, mode=mode)
    return frames.reshape(b, t, c, *size).transpose(1, 2)


def _check_5d(x: torch.Tensor, name: str) -> None:
    if x.ndim != 5:
        raise ValueError(f"{name} must be [B, C, T, H, W], got shape {tuple(x.shape)}")


def _draw(kind: str, shape: Sequence[int], generator: torch.Generator | None) -> torch.Tensor:
    # Always fp32 on the generator's device, so a seed gives the same numbers whatever the working dtype.
    device = generator.device if generator is not None else torch.device("cpu")
    fn = torch.randn if kind == "randn" else torch.rand
    return fn(tuple(shape), generator=generator, device=device, dtype=torch.float32)


class PyramidFlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """Stateless pyramidal flow-matching Euler scheduler (Pyramid-Flow / Neodragon).

    Stage 0 is the lowest resolution. Each stage k integrates a local σ from 1 to 0, which maps to the
    global noise level range [start_sigmas[k], end_sigmas[k]]; the DiT sees the stage-window timestep
    (raw 0..1000 scale). Between stages the latent is upsampled (nearest 2×) and renoised with
    block-correlated noise. Also builds the autoregressive history pyramid and training targets.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        stages: int = 3,
        gamma: float = 1 / 3,
        stage_range: Sequence[float] = (0.0, 1 / 3, 2 / 3, 1.0),
    ):
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        # Σ = (1+γ)I − γ11ᵀ has eigenvalue 1 − 3γ, so it is a covariance only for γ <= 1/3.
        if not 0 < gamma <= 1 / 3 + 1e-9:
            raise ValueError(f"gamma must be in (0, 1/3], got {gamma}")
        stage_range = [float(r) for r in stage_range]
        if len(stage_range) != stages + 1 or stage_range[0] != 0.0 or stage_range[-1] != 1.0:
            raise ValueError(f"stage_range must have stages + 1 = {stages + 1} entries from 0 to 1")
        if any(a >= b for a, b in zip(stage_range[:-1], stage_range[1:], strict=True)):
            raise ValueError(f"stage_range must be strictly increasing, got {stage_range}")

        n = num_train_timesteps
        # Global grid in fp32 like the reference, so the stage end points are fp32-rounded (0.667 → 0.6669999957).
        self.timesteps = torch.linspace(1, n, n, dtype=torch.float32).flip(0)
        self.sigmas = self.timesteps / n

        self.orig_start_sigmas: list[float] = []
        self.start_sigmas: list[float] = []
        self.end_sigmas: list[float] = []
        for k in range(stages):
            start_idx = int(stage_range[k] * n)
            end_idx = int(stage_range[k + 1] * n)
            orig_start = self.sigmas[start_idx].item()
            end = self.sigmas[end_idx].item() if end_idx < n else 0.0
            start = orig_start
            if k > 0:
                # Corrected start: the signal coefficient after renoising is α·(1 − e_{k−1}).
                signal = 1 - orig_start
                alpha = 1 / (math.sqrt(1 + 1 / gamma) * (1 - signal) + signal)
                start = 1 - alpha * signal
            self.orig_start_sigmas.append(orig_start)
            self.start_sigmas.append(start)
            self.end_sigmas.append(end)

        # Timestep windows are allocated in proportion to each stage's flow length s_k − e_k.
        lengths = [s - e for s, e in zip(self.start_sigmas, self.end_sigmas, strict=True)]
        total = sum(lengths)
        self.timesteps_per_stage: list[torch.Tensor] = []
        self.sigmas_per_stage: list[torch.Tensor] = []
        for k in range(stages):
            ratio_start = sum(lengths[:k]) / total
            ratio_end = sum(lengths[: k + 1]) / total
            t_max = self.timesteps[int(ratio_start * n)]
            t_min = self.timesteps[min(int(ratio_end * n), n - 1)]
            # start + i·step in fp32 arithmetic, as the reference's numpy linspace over fp32 values
            # (the fixture's last stage-2 value is 1.385009765625, not 1.385).
            step = (t_min - t_max) / n
            self.timesteps_per_stage.append(torch.arange(n, dtype=torch.float32) * step + t_max)
            self.sigmas_per_stage.append(torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1])

        # Symmetric square root of Σ via its two eigenspaces (1/2 and its complement). Cholesky is
        # ill-defined here: at γ = 1/3, Σ is singular (every block sums to zero).
        proj = torch.full((4, 4), 0.25, dtype=torch.float64)
        eye = torch.eye(4, dtype=torch.float64)
        factor = math.sqrt(1 + gamma) * (eye - proj) + math.sqrt(max(1 - 3 * gamma, 0.0)) * proj
        self._block_factor = factor.float()

    # ------------------------------------------------------------------ validation

    def _check_stage(self, stage: int, lowest: int = 0) -> int:
        try:
            value = operator.index(stage)
        except TypeError:
            value = None
        if value is None or not lowest <= value < self.config.stages:
            raise ValueError(f"stage must be an int in [{lowest}, {self.config.stages - 1}], got {stage!r}")
        return value

    def _check_pyramid_size(self, x: torch.Tensor, levels: int) -> None:
        f = 2 ** (levels - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"H and W must be divisible by {f} for a {levels}-level pyramid, got {tuple(x.shape[-2:])}"
            )

    def _num_stages(self, num_stages: int | None) -> int:
        if num_stages is None:
            return self.config.stages
        if not 1 <= num_stages <= self.config.stages:
            raise ValueError(f"num_stages must be in [1, {self.config.stages}], got {num_stages}")
        return num_stages

    # ------------------------------------------------------------------ inference schedule

    def stage_timesteps(self, num_steps: int, stage: int) -> torch.Tensor:
        """DiT timesteps (raw 0..1000 scale) for `num_steps` Euler steps of `stage`, float32 [num_steps]."""
        stage = self._check_stage(stage)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        window = self.timesteps_per_stage[stage]
        first, last = window[0].item(), window[-1].item()
        return torch.linspace(first, last, num_steps, dtype=torch.float64).float()

    def stage_sigmas(self, num_steps: int, stage: int) -> torch.Tensor:
        """Local σ for `num_steps` steps of `stage`, float32 [num_steps + 1] from 1 down to a final 0."""
        stage = self._check_stage(stage)
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        local = self.sigmas_per_stage[stage]
        sig = torch.linspace(local[0].item(), local[-1].item(), num_steps, dtype=torch.float64)
        return torch.cat([sig, sig.new_zeros(1)]).float()

    def step(
        self,
        model_output: torch.Tensor,
        sigma: float | torch.Tensor,
        sigma_next: float | torch.Tensor,
        sample: torch.Tensor,
    ) -> torch.Tensor:
        """Euler step x + (σ_next − σ)·v; the sample is upcast to fp32, the result takes v's dtype."""
        prev = sample.float() + (sigma_next - sigma) * model_output
        return prev.to(model_output.dtype)

    # ------------------------------------------------------------------ between stages

    def renoise_coefficients(self, stage: int) -> tuple[float, float]:
        """(α, β) of x = α·Up(x) + β·n_block when entering `stage` (>= 1)."""
        stage = self._check_stage(stage, lowest=1)
        e = self.end_sigmas[stage - 1]
        gamma = self.config.gamma
        alpha = 1 / (math.sqrt(1 + 1 / gamma) * e + (1 - e))
        beta = alpha * e / math.sqrt(gamma)
        return alpha, beta

    def block_noise(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Noise whose 2×2 spatial blocks are N(0, (1+γ)I − γ11ᵀ) 4-vectors laid out row by row."""
        if len(shape) != 5:
            raise ValueError(f"block_noise shape must be [B, C, T, H, W], got {list(shape)}")
        b, c, t, h, w = (int(s) for s in shape)
        if h % 2 or w % 2:
            raise ValueError(f"block_noise needs even H and W, got H={h}, W={w}")
        z = _draw("randn", (b * c * t * (h // 2), w // 2, 4), generator)
        blocks = z @ self._block_factor.to(z.device).T
        # (rows, w/2, p, q) → (rows, p, w/2, q): element p*2+q goes to row p, column q of its block.
        # Leading dims stay merged because a high-rank permute copy is several times slower on CPU.
        noise = blocks.reshape(-1, w // 2, 2, 2).transpose(1, 2).reshape(b, c, t, h, w)
        return noise.to(device=device if device is not None else noise.device, dtype=dtype)

    def upsample_and_renoise(
        self, latents: torch.Tensor, stage: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Nearest 2× upsampling of the stage-(k−1) end point, then α·x_up + β·block noise, entering `stage`."""
        _check_5d(latents, "latents")
        stage = self._check_stage(stage, lowest=1)
        alpha, beta = self.renoise_coefficients(stage)
        up = _resize_frames(latents, (latents.shape[-2] * 2, latents.shape[-1] * 2), "nearest")
        noise = self.block_noise(up.shape, generator=generator, device=up.device, dtype=up.dtype)
        return alpha * up + beta * noise

    # ------------------------------------------------------------------ pyramids and history

    def noise_pyramid(self, noise: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        """Per-stage noise, lowest resolution first: repeated (bilinear ½ per frame, then ×2)."""
        # An exact ½ bilinear resize is 2×2 average pooling; ×2 per level restores unit variance. Resizing is
        # linear and ×2 is exact in floating point, so this equals rescaling after each resize.
        levels = self.latent_pyramid(noise, num_stages)
        return [level * 2 ** (len(levels) - 1 - i) for i, level in enumerate(levels)]

    def latent_pyramid(self, latents: torch.Tensor, num_stages: int | None = None) -> list[torch.Tensor]:
        """Clean latents per stage, lowest first: successive bilinear ½ resizes per frame (no ×2)."""
        _check_5d(latents, "latents")
        levels = self._num_stages(num_stages)
        self._check_pyramid_size(latents, levels)
        out = [latents]
        for _ in range(levels - 1):
            cur = out[-1]
            out.append(_resize_frames(cur, (cur.shape[-2] // 2, cur.shape[-1] // 2), "bilinear"))
        return out[::-1]

    def history_from_pyramids(self, pyramids: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """History clips per stage (oldest first, current latent excluded) from per-unit latent pyramids.

        `pyramids[i]` is `latent_pyramid(generated[i])`; pass cached pyramids to resize each frame once.
        From stage s, walk back one unit per step lowering the stage by one; once the stage would be 0,
        the remaining older units form one clip at stage-0 resolution.
        """
        if not pyramids:
            return [[] for _ in range(self.config.stages)]
        num_stages = len(pyramids[0])
        units = len(pyramids)
        history = []
        for s in range(num_stages):
            clips = [pyramids[units - 1][s]]
            cur, j = s, units - 1
            while j > 0:
                cur = max(cur - 1, 0)
                if cur == 0:
                    break
                j -= 1
                clips.append(pyramids[j][cur])
            if j > 0:
                clips.append(torch.cat([pyramids[i][0] for i in range(j)], dim=2))
            history.append(clips[::-1])
        return history

    def build_history(
        self, generated: Sequence[torch.Tensor], num_stages: int | None = None
    ) -> list[list[torch.Tensor]]:
        """History clips per stage (oldest first, without the current latent) from the clean generated units."""
        if not generated:
            return [[] for _ in range(self._num_stages(num_stages))]
        lengths = [g.shape[2] for g in generated]
        # One resize per level for all units together, then split back into units.
        levels = self.latent_pyramid(torch.cat(list(generated), dim=2), num_stages)
        per_level = [torch.split(level, lengths, dim=2) for level in levels]
        pyramids = [[split[u] for split in per_level] for u in range(len(generated))]
        return self.history_from_pyramids(pyramids)

    # ------------------------------------------------------------------ training side

    def sample_training_points(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        stage_ratios: Sequence[float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (stage, index): stage uniform (or ∝ `stage_ratios`), index uniform over the grid."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stages = self.config.stages
        weights = torch.ones(stages) if stage_ratios is None else torch.tensor(stage_ratios, dtype=torch.float)
        if weights.shape != (stages,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"stage_ratios must be {stages} non-negative weights with a positive sum")
        # Inverse-CDF sampling from uniforms drawn like all other random paths (fp32, generator's device).
        u = _draw("rand", (2, batch_size), generator).cpu().double()
        cdf = torch.cumsum(weights.double(), 0) / weights.sum()
        stage = torch.searchsorted(cdf, u[0], right=True).clamp(max=stages - 1)
        n = self.config.num_train_timesteps
        index = (u[1] * n).long().clamp(0, n - 1)
        return stage, index

    def training_target(
        self, clean_latents_full: torch.Tensor, noise_full: torch.Tensor, stage: int, index: Index
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy input x_τ, velocity target start − end, DiT timestep [B]) for one stage.

        Both inputs are at full resolution. The stage-k clean latent comes from `latent_pyramid` and the
        stage-k noise n from `noise_pyramid(noise_full)` (as Pyramid-Flow does: one noise draw shared by
        the start and end points of a stage). `index` is an int or a per-sample LongTensor [B].
        """
        _check_5d(clean_latents_full, "clean_latents_full")
        if noise_full.shape != clean_latents_full.shape:
            raise ValueError(
                f"noise_full shape {tuple(noise_full.shape)} != latents shape {tuple(clean_latents_full.shape)}"
            )
        stage = self._check_stage(stage)
        b = clean_latents_full.shape[0]
        n_steps = self.config.num_train_timesteps
        idx = torch.as_tensor(index).long().reshape(-1).cpu()
        if idx.numel() == 1:
            idx = idx.expand(b)
        if idx.numel() != b or (idx < 0).any() or (idx >= n_steps).any():
            raise ValueError(f"index must be a scalar or [B={b}] with values in [0, {n_steps - 1}]")

        clean = self.latent_pyramid(clean_latents_full.float())[stage]
        noise = self.noise_pyramid(noise_full.float())[stage]
        start, end = self.stage_points(clean, noise, stage)

        device = clean_latents_full.device
        tau = self.sigmas_per_stage[stage][idx].float().to(device).view(b, 1, 1, 1, 1)
        noisy = tau * start + (1 - tau) * end
        dtype = clean_latents_full.dtype
        timestep = self.timesteps_per_stage[stage][idx].to(device)
        return noisy.to(dtype), (start - end).to(dtype), timestep

    def stage_points(self, clean: torch.Tensor, noise: torch.Tensor, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) of ``stage`` for a clean latent and noise at that stage's resolution (Eq. 6-7): the start
        mixes the noise with the clean latent halved and upsampled back (pure noise at stage 0), the end mixes it
        with the clean latent itself (the clean latent at the last stage); both share one noise draw."""
        stage = self._check_stage(stage)
        s, e = self.start_sigmas[stage], self.end_sigmas[stage]
        if stage == 0:
            start = noise
        else:
            prev = _resize_frames(clean, (clean.shape[-2] // 2, clean.shape[-1] // 2), "bilinear")
            start = s * noise + (1 - s) * _resize_frames(prev, (prev.shape[-2] * 2, prev.shape[-1] * 2), "nearest")
        end = clean if stage == self.config.stages - 1 else e * noise + (1 - e) * clean
        return start, end

    def corrupt_history(
        self,
        clips: Sequence[torch.Tensor],
        generator: torch.Generator | None = None,
        max_sigma: float = 1 / 3,
    ) -> list[torch.Tensor]:
        """Noise-corrupt history clips: x ← (1−σ)·x + σ·n with σ ~ U(0, max_sigma) per sample.

        Follows Pyramid-Flow's `corrupt_ratio`: one σ per batch sample, shared by all of its clips, and
        fresh Gaussian noise per clip.
        """
        if not 0 <= max_sigma <= 1:
            raise ValueError(f"max_sigma must be in [0, 1], got {max_sigma}")
        if not clips:
            return []
        b = clips[0].shape[0]
        if any(c.shape[0] != b for c in clips):
            raise ValueError("all history clips must share the batch size")
        sigma = _draw("rand", (b,), generator) * max_sigma
        out = []
        for clip in clips:
            _check_5d(clip, "history clip")
            n = _draw("randn", clip.shape, generator).to(clip.device)
            sg = sigma.to(clip.device).view(b, 1, 1, 1, 1)
            out.append(((1 - sg) * clip.float() + sg * n).to(clip.dtype))
        return out
