"""A short Accelerate training loop shared by the recipes: seeded, logged, resumable, multi-process.

Data is a pure function of (global step, rank), so a resumed run sees exactly the batches it would have seen,
and the same code runs as one CPU process here or as DDP/FSDP processes under ``accelerate launch``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device, set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

CHECKPOINTS = "checkpoints"
LOG_FILE = "log.jsonl"
EMA_FILE = "ema.safetensors"


def cpu_only() -> bool:
    """No GPU-like device here. Accelerate must then be told ``cpu=True``: otherwise every process that
    ``accelerate launch --multi_gpu`` or ``torchrun`` starts on a CPU machine runs alone as rank 0 of 1."""
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu and xpu.is_available()))


def make_accelerator(mixed_precision: str | None = None) -> Accelerator:
    """The Accelerator of a training run (one process group over every process the launcher started). With
    ``mixed_precision`` None, the launch decides (``accelerate launch --mixed_precision bf16`` or its config file;
    fp32 without either)."""
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu_only())


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings common to every recipe."""

    output_dir: str
    max_steps: int = 1000
    batch_size: int = 4  # per process
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    save_every: int = 250
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str | None = None  # None: as `accelerate launch` or its config file says, else fp32
    max_minutes: float | None = None  # wall-time budget of one invocation (None: no limit)
    ema_decay: float | None = None  # also keep an exponential moving average of the weights (None: off)

    def __post_init__(self) -> None:
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie between 0 and 1 (e.g. 0.999), got {self.ema_decay}.")


def lr_lambda(config: TrainConfig, time_used: Callable[[], float] = lambda: 0.0) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak rate. The decay follows whichever budget runs out
    first: the steps, or (with ``max_minutes``) the fraction of wall time ``time_used()`` reports."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = max((step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps), time_used())
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Trainer:
    """Runs ``loss_fn(batch_fn(step, rank, world))`` for ``max_steps``, saving resumable state periodically.

    ``loss_fn`` returns a dict of scalar tensors whose ``"loss"`` entry is optimised; the others are logged.
    """

    def __init__(self, config: TrainConfig, modules: dict[str, torch.nn.Module],
                 batch_fn: Callable[[int, int, int], dict], loss_fn: Callable[[dict], dict[str, torch.Tensor]],
                 accelerator: Accelerator | None = None):
        self.config = config
        self.accelerator = accelerator or make_accelerator(config.mixed_precision)
        set_seed(config.seed, device_specific=True)
        named = [(f"{key}.{name}", p) for key, m in modules.items() for name, p in m.named_parameters()
                 if p.requires_grad]
        if not named:
            raise ValueError("Nothing to train: every parameter is frozen.")
        self.param_names, params = [n for n, _ in named], [p for _, p in named]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self._started: float | None = None  # set when fit() starts: the time budget is per invocation
        self.time_used = 0.0  # fraction of max_minutes spent, synchronised across processes by fit()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, lambda: self.time_used))
        prepared = self.accelerator.prepare(*modules.values(), optimizer, scheduler)
        self.modules = dict(zip(modules, prepared[: len(modules)], strict=True))
        self.optimizer, self.scheduler = prepared[len(modules)], prepared[len(modules) + 1]
        self.params = params
        # made after prepare(), on the parameters' device; diffusers' EMA warms its decay up as (1 + n) / (10 + n)
        if config.ema_decay and self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError("A weight average (--ema-decay) follows each process's parameters, which FSDP shards; "
                             "train without it under FSDP, or average the saved checkpoints afterwards.")
        self.ema = EMAModel(params, decay=config.ema_decay) if config.ema_decay else None
        self.batch_fn, self.loss_fn = batch_fn, loss_fn
        self.output_dir = Path(config.output_dir)
        self.step = 0

    def unwrap(self, name: str) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.modules[name])

    def save_model(self, name: str, folder: str | Path) -> None:
        """``save_pretrained`` of module ``name`` with its full weights. Every process must call it: under FSDP the
        shards are gathered first (the main process writes)."""
        state = self.accelerator.get_state_dict(self.modules[name])
        if self.accelerator.is_main_process:
            model = self.unwrap(name)
            full = type(model).from_config(model.config).to(next(iter(state.values())).dtype)
            full.load_state_dict(state)
            full.save_pretrained(folder)
        self.accelerator.wait_for_everyone()

    # -- checkpoints ------------------------------------------------------------------------------------

    def _checkpoints(self) -> list[Path]:
        folder = self.output_dir / CHECKPOINTS
        return sorted(folder.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if folder.is_dir() else []

    def resume(self) -> int:
        """Load the newest checkpoint, if any; returns the step to continue from."""
        checkpoints = self._checkpoints()
        if checkpoints:
            self.accelerator.load_state(str(checkpoints[-1]))
            self.step = int(checkpoints[-1].name.split("_")[1])
            self._load_ema(checkpoints[-1])
        return self.step

    def _load_ema(self, checkpoint: Path) -> None:
        if self.ema is None:
            return
        path = checkpoint / EMA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{checkpoint} holds no weight average ({EMA_FILE}): it was saved without "
                                    "--ema-decay (or its save was cut short). Resume it without --ema-decay, or "
                                    "start a new run from its weights with --init-from.")
        shadow = load_file(path, device=str(self.accelerator.device))  # where the parameters it follows live
        if sorted(shadow) != sorted(self.param_names):
            raise ValueError(f"{path} does not match this model's trainable parameters.")
        self.ema.load_state_dict({"optimization_step": self.step,
                                  "shadow_params": [shadow[name] for name in self.param_names]})

    def _save_ema(self, checkpoint: Path) -> None:
        if self.ema is not None:
            save_file({name: p.detach().contiguous() for name, p in zip(self.param_names, self.ema.shadow_params,
                                                                        strict=True)}, checkpoint / EMA_FILE)

    @contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside the block the models hold the weight average (with ``ema_decay``; else their own weights)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def save(self) -> None:
        """Save the full training state (models, optimizer, scheduler, RNGs); keep the newest few."""
        target = self.output_dir / CHECKPOINTS / f"step_{self.step}"
        self.accelerator.save_state(str(target))
        if self.accelerator.is_main_process:
            self._save_ema(target)
            (self.output_dir / "train_config.json").write_text(json.dumps(asdict(self.config), indent=2))
            for old in self._checkpoints()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _out_of_time(self) -> bool:
        """Update ``time_used``; True once the time budget is spent. Processes share their largest clock, so that
        all of them use the same learning rate and stop at the same step. The clock is read at logging steps only:
        sharing it synchronises the processes and the accelerator, which every step cannot afford."""
        if self.config.max_minutes is None or self.step % self.config.log_every:
            return False
        local = torch.tensor([(time.perf_counter() - self._started) / (60 * self.config.max_minutes)],
                             device=self.accelerator.device)
        self.time_used = float(self.accelerator.reduce(local, reduction="max").item())
        return self.time_used >= 1.0

    # -- loop -------------------------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.output_dir / LOG_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    def fit(self, on_log: Callable[[Trainer, dict], None] | None = None) -> dict:
        """Train until ``max_steps`` (or until ``max_minutes`` are spent: then the state is saved as at the end);
        returns the last logged record."""
        cfg, acc = self.config, self.accelerator
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for module in self.modules.values():
            module.train()
        record: dict = {}
        started = self._started = time.perf_counter()
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not acc.is_local_main_process,
                        desc="train")
        while self.step < cfg.max_steps and not self._out_of_time():
            batch = send_to_device(self.batch_fn(self.step, acc.process_index, acc.num_processes), acc.device)
            losses = self.loss_fn(batch)
            acc.backward(losses["loss"])
            if cfg.grad_clip > 0:
                acc.clip_grad_norm_(self.params, cfg.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.step(self.params)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            progress.update()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                values = {k: acc.gather(v.detach().reshape(1)).mean().item() for k, v in losses.items()}
                record = {"step": self.step, "processes": acc.num_processes, "lr": self.scheduler.get_last_lr()[0],
                          "elapsed_s": round(time.perf_counter() - started, 2), **values}
                self._log(record)
                progress.set_postfix(loss=f"{values['loss']:.4f}")
                if on_log is not None:
                    on_log(self, record)
            if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                self.save()
        if self.step < cfg.max_steps:  # stopped by the time budget
            self.save()
        progress.close()
        return record


def read_log(output_dir: str | Path) -> list[dict]:
    """The logged records of a run, oldest first."""
    path = Path(output_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def cycle_indices(step: int, rank: int, world: int, batch_size: int) -> Iterable[int]:
    """Dataset indices of one process's batch at a global step (disjoint across ranks and steps)."""
    start = (step * world + rank) * batch_size
    return range(start, start + batch_size)
