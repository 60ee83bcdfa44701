"""Recipe 4, pyramidal DMD step distillation (Neodragon §5): a generator that crosses each pyramid stage in one
Euler step, trained against a frozen multistep real score (with CFG) and an online fake score.

Per stage s of unit u (drawn per step, as in flow matching), with history from ground-truth latents:

- the generator reads the stage's noisy latent at one of the sampler's points (``student_steps`` evenly spaced
  local sigmas, the first of which is the stage start that 1-1-1 sampling uses) and takes one Euler step to the
  stage end; with the noise it was built from, that end gives the stage's clean estimate z_theta;
- z_theta is re-noised inside the stage's window at a uniform local sigma (Eq. 8-10); the real score (CFG) and
  the fake score predict velocities there, and z_theta moves along (v_real - v_fake), each sample's step divided by
  the real score's mean absolute velocity error on that point;
- a Cauchy regression log(1 + mse(z_theta, Down(z))) to the ground truth (weight 0.5) keeps the generator near
  the data;
- the fake score learns pyramidal flow matching on the generator's (detached) clean estimates.

One Trainer step is either a fake-score update or a generator update: ``fake_updates`` of the first, then one of
the second (the paper's 2:1). A single optimiser holds both networks; a step only gives gradients to its network,
and AdamW leaves parameters without gradients untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.text import TextEncoding
from ..schedulers import PyramidFlowMatchScheduler
from .flow_matching import corrupted_history


@dataclass
class DMDConfig:
    """Settings of pyramidal DMD."""

    student_steps: int = 4  # the generator's inputs: the points of a sampler with this many steps per stage
    fake_updates: int = 2  # fake-score updates per generator update
    regression_weight: float = 0.5  # the Cauchy regression to the ground-truth latent
    guidance_scale: float | None = 5.0  # the real score's CFG on frame 0 (unit 0); None: the teacher's own
    video_guidance_scale: float | None = 4.0  # and on later frames
    history_corruption: float = 1 / 3

    def __post_init__(self) -> None:
        if self.student_steps < 1 or self.fake_updates < 0:
            raise ValueError(f"student_steps must be >= 1 and fake_updates >= 0, got {self.student_steps} and "
                             f"{self.fake_updates}.")

    def role(self, step: int) -> str:
        """Which network the Trainer step ``step`` (0-based) updates."""
        return "generator" if step % (self.fake_updates + 1) == self.fake_updates else "fake"


def student_indices(scheduler: PyramidFlowMatchScheduler, steps: int) -> torch.Tensor:
    """Grid indices of the sampler's points with ``steps`` steps per stage (its local sigmas run from 1 down)."""
    last = scheduler.config.num_train_timesteps - 1
    return torch.linspace(0, last, steps, dtype=torch.float64).round().long()


def _point(scheduler: PyramidFlowMatchScheduler, start: torch.Tensor, end: torch.Tensor, stage: int,
           index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The interpolant at per-sample grid ``index``, its local sigma ``[B, 1, 1, 1, 1]`` and its DiT timestep."""
    sigma = scheduler.sigmas_per_stage[stage][index].float().to(start.device).view(-1, 1, 1, 1, 1)
    timestep = scheduler.timesteps_per_stage[stage][index].to(start.device)
    return sigma * start + (1 - sigma) * end, sigma, timestep


def _velocity(dit: nn.Module, clips: list[torch.Tensor], x: torch.Tensor, enc: TextEncoding,
              timestep: torch.Tensor) -> torch.Tensor:
    return dit([clips + [x]], enc.tokens, enc.mask, enc.pooled, timestep)[0].float()


def _guided_velocity(dit: nn.Module, clips: list[torch.Tensor], x: torch.Tensor, cond: TextEncoding,
                     uncond: TextEncoding, timestep: torch.Tensor, scale: float) -> torch.Tensor:
    if scale <= 1.0:
        return _velocity(dit, clips, x, cond, timestep)
    both = TextEncoding(*(torch.cat([getattr(uncond, k), getattr(cond, k)]) for k in ("tokens", "mask", "pooled")))
    doubled = [torch.cat([clip, clip]) for clip in clips]
    v_uncond, v_cond = _velocity(dit, doubled, torch.cat([x, x]), both, timestep.repeat(2)).chunk(2)
    return v_uncond + scale * (v_cond - v_uncond)


def dmd_losses(generator: nn.Module, fake_score: nn.Module, real_score: nn.Module,
               scheduler: PyramidFlowMatchScheduler, batch: dict, config: DMDConfig,
               role: str) -> dict[str, torch.Tensor]:
    """The loss of one Trainer step (``role``: "generator" or "fake") on a flow-matching batch (``latents``,
    ``encoding``, ``unit``, ``stage``, ``generator``) that also holds ``uncond``, the negative prompt's encoding."""
    latents, enc, unit, stage, rng = (batch[k] for k in ("latents", "encoding", "unit", "stage", "generator"))
    history = corrupted_history(scheduler, latents, unit, stage, rng, config.history_corruption)
    clean = scheduler.latent_pyramid(latents[:, :, unit : unit + 1].float())[stage]
    noise = torch.randn(clean.shape, generator=rng).to(clean)
    start, end = scheduler.stage_points(clean, noise, stage)
    points = student_indices(scheduler, config.student_steps)
    index = points[torch.randint(len(points), (clean.shape[0],), generator=rng)]
    x, sigma, timestep = _point(scheduler, start, end, stage, index)
    with torch.set_grad_enabled(role == "generator"):
        stage_end = x - sigma * _velocity(generator, history, x.to(latents.dtype), enc, timestep)
        end_sigma = scheduler.end_sigmas[stage]
        estimate = (stage_end - end_sigma * noise) / (1 - end_sigma)  # z_theta: the stage's clean estimate

    renoise = torch.randn(clean.shape, generator=rng).to(clean)
    renoise_index = torch.randint(scheduler.config.num_train_timesteps, (clean.shape[0],), generator=rng)
    y_start, y_end = scheduler.stage_points(estimate.detach(), renoise, stage)
    z, _, renoise_timestep = _point(scheduler, y_start, y_end, stage, renoise_index)
    flow = y_start - y_end
    if role == "fake":
        loss = F.mse_loss(_velocity(fake_score, history, z.detach().to(latents.dtype), enc, renoise_timestep), flow)
        return {"loss": loss, "fake_fm": loss.detach()}

    z_in = z.detach().to(latents.dtype)
    scale = config.guidance_scale if unit == 0 else config.video_guidance_scale
    with torch.no_grad():
        v_real = _guided_velocity(real_score, history, z_in, enc, batch["uncond"], renoise_timestep, scale)
        v_fake = _velocity(fake_score, history, z_in, enc, renoise_timestep)
        weight = 1.0 / (v_real - flow).abs().mean(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-6)
        direction = (v_real - v_fake) * weight
    dmd = 0.5 * F.mse_loss(estimate, (estimate - direction).detach())
    regression = torch.log1p((estimate - clean).pow(2).mean(dim=(1, 2, 3, 4))).mean()
    return {"loss": dmd + config.regression_weight * regression, "dmd": dmd.detach(),
            "regression": regression.detach(), "real_fake_gap": (v_real - v_fake).abs().mean()}
