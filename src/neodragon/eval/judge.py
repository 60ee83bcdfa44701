"""The VBench-nano judge: a small video classifier trained only on real ShapesWorld videos.

The judge sees a clip as 9 frames (evenly spaced) at 64x64 in two 2-D CNN streams that meet on an 8x8 map: an
appearance stream on the first frame (where ShapesWorld defines the size; shapes are easiest to see in one frame)
and a motion stream on the 8 changes f_t - f_0 stacked along the channel axis (a still object is all zeros there,
so the stream learns motion, not shapes). On that map:

- two object slots each max-pool the map under their own gate (computed from the features and the cell
  coordinates); shape, colour and size heads read a slot's appearance channels and the motion head its motion
  channels only. Held-out combinations need both: in training no square spins, and a motion head that could see
  shapes (raw frames, all channels) learnt "squares do not spin" and called held-out spinning squares still;
- the relation head reads both slot embeddings and the offset between the slots' gate centroids;
- the count head and the scene embedding (background and style heads) read the map's mean and max.

Two-object scenes: a video cannot tell which object a caption names first, so the slots are ordered by place:
slot 0 is the left object of a horizontal pair and the upper object of a vertical one (the object with the smaller
x + y: ShapesWorld keeps a pair within 35 degrees of its axis), and the relation head says which axis
("left_of" or "above": slot 0 <relation> slot 1). Scoring matches a prompt's objects to the predicted slots
(``metrics.semantic_scores``). A one-object video fills slot 0 only.

Features: the object embedding (both slot embeddings) and the scene embedding; per frame (for the consistency
metrics) they are those of a still video made of that frame, a kind of video the judge is trained on; per video
(FVD-nano) their concatenation.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data import BACKGROUNDS, COLOURS, MOTIONS, RELATIONS, SHAPES, SIZES, SPLITS, STYLES, collate, sample
from ..training.trainer import TrainConfig, Trainer, cycle_indices
from ..utils.checkpoint import package_weights

OBJECT_ATTRIBUTES = ("shape", "colour", "size", "motion")
SLOT_RELATIONS = ("none", "left_of", "above")  # slot 0 <relation> slot 1
LABEL_SPACES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "motion": MOTIONS, "background": BACKGROUNDS,
                "relation": RELATIONS, "style": STYLES}
# Unweighted, the heads learnt first (colour, count) held the shared layers and shape stalled near 30%
# for thousands of steps; these weights let every head reach its plateau in one short run.
LOSS_WEIGHTS = {"slot_shape": 4.0, "slot_motion": 2.0, "style": 2.0}
_SWAPPED = (RELATIONS.index("right_of"), RELATIONS.index("below"))  # object 1 comes first in slot order
# Generated objects wobble from frame to frame, and a judge that only saw exact renders read any wobble of a still
# object as motion. Training renders half of the videos with up to this much jitter (``render``: size and place
# per frame); the robustness check renders every video with exactly this much.
TRAIN_JITTER = 0.1
# Generated videos also come out of a VAE decoder, whose 8 x 8 latent grid smears detail, and the judge reads
# that as pixel art. ``grid_blur`` imitates it on real videos: the heldout split is measured again with this much
# of it, and ``train_judge(blur=...)`` can train on it. Training with it (docs/results/judge.md) halved the pixel-art
# readings of reconstructions but cost crisp pixel art 8 points of style accuracy, so the bundled judge has none.
GRID_BLUR_CHECK = 0.6
LATENT_GRID = 8  # pixels per latent pixel of the nano VAE


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _stages(channels: int, widths: Sequence[int], depths: Sequence[int]) -> nn.Sequential:
    """Conv stages, each halving the resolution with its first layer."""
    layers = []
    for width, depth in zip(widths, depths, strict=True):
        layers += [_conv(channels if i == 0 else width, width, 2 if i == 0 else 1) for i in range(depth)]
        channels = width
    return nn.Sequential(*layers)


class Judge(ModelMixin, ConfigMixin):
    """Video classifier and feature extractor of VBench-nano; ``calibration`` holds what training measured
    (held-out accuracy, the FVD-nano bound)."""

    @register_to_config
    def __init__(self, num_frames: int = 9, size: int = 64, widths: Sequence[int] = (48, 64, 96),
                 depths: Sequence[int] = (1, 2, 2), motion_widths: Sequence[int] = (32, 48, 64),
                 motion_depths: Sequence[int] = (1, 1, 2), slot_hidden: int = 96, slot_dim: int = 32,
                 scene_dim: int = 32, label_spaces: dict[str, Sequence[str]] | None = None,
                 calibration: dict | None = None):
        super().__init__()
        spaces = {k: list(v) for k, v in LABEL_SPACES.items()}
        if label_spaces is not None and {k: list(v) for k, v in label_spaces.items()} != spaces:
            raise ValueError("this judge was trained on other ShapesWorld label spaces; retrain it")
        self.appearance = _stages(3, widths, depths)
        self.motion = _stages(3 * (num_frames - 1), motion_widths, motion_depths)
        w2 = widths[-1] + motion_widths[-1]
        self.streams = {a: slice(widths[-1], None) if a == "motion" else slice(0, widths[-1])
                        for a in OBJECT_ATTRIBUTES}
        cells = size // 8
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, cells), torch.linspace(-1, 1, cells), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys]).flatten(1), persistent=False)  # [2, cells^2]
        self.attention = nn.Conv1d(w2 + 2, 2, 1)
        # one embedding per attribute: with a shared one, the attributes learnt first crowded out the others
        self.slot_mlps = nn.ModuleDict({a: nn.Sequential(nn.Linear(motion_widths[-1] if a == "motion" else widths[-1],
                                                                   slot_hidden), nn.ReLU(),
                                                         nn.Linear(slot_hidden, slot_dim)) for a in OBJECT_ATTRIBUTES})
        self.slot_heads = nn.ModuleDict({a: nn.Linear(slot_dim, len(spaces[a])) for a in OBJECT_ATTRIBUTES})
        self.count_head = nn.Linear(2 * w2, 2)
        self.relation_head = nn.Linear(2 * len(OBJECT_ATTRIBUTES) * slot_dim + 2, len(SLOT_RELATIONS))
        self.scene_branch = nn.Linear(2 * w2, scene_dim)
        self.scene_heads = nn.ModuleDict({a: nn.Linear(scene_dim, len(spaces[a])) for a in ("background", "style")})

    def prepare(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> the judge's input [B, 3 * num_frames, size, size]."""
        cfg = self.config
        t = video.shape[2]
        index = torch.linspace(0, t - 1, cfg.num_frames).round().long()
        frames = video[:, :, index.to(video.device)].transpose(1, 2).flatten(0, 1)
        if frames.shape[-2:] != (cfg.size, cfg.size):
            frames = F.interpolate(frames, size=(cfg.size, cfg.size), mode="area")
        return frames.reshape(video.shape[0], -1, cfg.size, cfg.size).to(self.dtype)

    def _encode(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        frames = self.prepare(video)
        first = frames[:, :3]
        changes = frames[:, 3:] - first.repeat(1, self.config.num_frames - 1, 1, 1)
        cells = torch.cat([self.appearance(first), self.motion(changes)], 1).flatten(2)  # [B, C, N]
        coords = self.coords.to(cells.dtype).expand(len(cells), -1, -1)
        # Each slot max-pools the map under its own gate (max, not mean: a small object's shape would drown in a
        # mean over the frame); the coordinates let slot 0's gate prefer the upper-left object.
        logits = self.attention(torch.cat([cells, coords], 1))  # [B, 2, N]
        pooled_slots = (logits.sigmoid()[:, :, None] * cells[:, None]).amax(-1)  # [B, 2, C]
        slots = torch.cat([mlp(pooled_slots[..., self.streams[a]]) for a, mlp in self.slot_mlps.items()], -1)
        offset = torch.einsum("bkn,bdn->bkd", logits.softmax(-1), coords).diff(dim=1).flatten(1)  # slot 1 - slot 0
        pooled = torch.cat([cells.mean(-1), cells.amax(-1)], 1)
        return {"object": slots.flatten(1), "scene": self.scene_branch(pooled), "offset": offset, "pooled": pooled}

    def embed(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Object (both slots' embeddings) and scene embeddings, [B, 8 * slot_dim] and [B, scene_dim]."""
        out = self._encode(video)
        return out["object"], out["scene"]

    def forward(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: ``slot_<attribute>`` [B, 2, classes], ``count`` [B, 2] (one, two objects), ``relation``
        [B, 3] (SLOT_RELATIONS), ``background``, ``style``; plus the ``object`` and ``scene`` embeddings."""
        enc = self._encode(video)
        slots = F.relu(enc["object"])
        parts = slots.unflatten(1, (2, -1)).split(self.config.slot_dim, -1)
        out = {f"slot_{a}": head(part) for (a, head), part in zip(self.slot_heads.items(), parts, strict=True)}
        relation = self.relation_head(torch.cat([slots, enc["offset"]], 1))
        out.update(count=self.count_head(enc["pooled"]), relation=relation, object=enc["object"], scene=enc["scene"])
        out.update({a: head(F.relu(enc["scene"])) for a, head in self.scene_heads.items()})
        return out

    @torch.no_grad()
    def predict(self, video: torch.Tensor, batch_size: int = 64) -> tuple[list[dict], torch.Tensor]:
        """Decoded scenes (``scene_dict`` form, objects in slot order) and video features [B, object + scene]."""
        scenes, features = [], []
        for chunk in video.split(batch_size):
            out = self(chunk)
            features.append(torch.cat([out["object"], out["scene"]], 1).float())
            scenes += decode(out)
        return scenes, torch.cat(features)

    @torch.no_grad()
    def frame_features(self, video: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame object and scene embeddings [B, T, D] of [B, 3, T, H, W]: each frame seen as a still video."""
        b, _, t = video.shape[:3]
        stills = video.transpose(1, 2).flatten(0, 1)[:, :, None]  # [B * T, 3, 1, H, W]; prepare repeats the frame
        objects, scenes = zip(*(self.embed(chunk) for chunk in stills.split(batch_size)), strict=True)
        return torch.cat(objects).float().view(b, t, -1), torch.cat(scenes).float().view(b, t, -1)


def decode(out: dict[str, torch.Tensor]) -> list[dict]:
    """Judge logits -> one scene dict per video (a second object only where the count head says two)."""
    two = out["count"].argmax(1) == 1
    # a two-object scene has a relation, so the relation is the better of the two axes
    axis = out["relation"][:, 1:].argmax(1) + 1
    slots = {a: out[f"slot_{a}"].argmax(2) for a in OBJECT_ATTRIBUTES}
    scenes = []
    for i in range(len(two)):
        count = 2 if two[i] else 1
        objects = [{a: LABEL_SPACES[a][slots[a][i, k]] for a in OBJECT_ATTRIBUTES} for k in range(count)]
        scenes.append({"objects": objects, "relation": SLOT_RELATIONS[axis[i]] if count == 2 else "none",
                       "background": BACKGROUNDS[out["background"][i].argmax()],
                       "style": STYLES[out["style"][i].argmax()]})
    return scenes


def scene_dict(labels: dict[str, torch.Tensor], i: int) -> dict:
    """Item ``i`` of ``collate``'s label tensors as a scene dict: names, objects in caption order."""
    objects = [{a: LABEL_SPACES[a][labels[a][i, k]] for a in OBJECT_ATTRIBUTES} for k in range(int(labels["count"][i]))]
    return {"objects": objects, **{k: LABEL_SPACES[k][labels[k][i]] for k in ("relation", "background", "style")}}


def slot_targets(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``collate``'s label tensors in the judge's slot order; -1 marks an empty second slot."""
    swap = torch.isin(labels["relation"], torch.tensor(_SWAPPED))
    targets = {f"slot_{a}": torch.where(swap[:, None], labels[a].flip(1), labels[a]) for a in OBJECT_ATTRIBUTES}
    horizontal = torch.isin(labels["relation"], torch.tensor([RELATIONS.index("left_of"), RELATIONS.index("right_of")]))
    targets["relation"] = torch.where(labels["count"] == 1, 0, torch.where(horizontal, 1, 2))
    targets["count"] = labels["count"] - 1
    targets.update(background=labels["background"], style=labels["style"])
    return targets


def judge_losses(judge: Judge, video: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weighted sum of the heads' cross-entropies (empty slots ignored) and the batch accuracy of each head."""
    out = judge(video)
    losses, logs = [], {}
    for key, target in targets.items():
        logits = out[key].flatten(0, 1) if key.startswith("slot_") else out[key]
        target = target.flatten()
        losses.append(LOSS_WEIGHTS.get(key, 1.0) * F.cross_entropy(logits.float(), target, ignore_index=-1))
        valid = target >= 0
        logs[f"acc_{key}"] = (logits.argmax(1)[valid] == target[valid]).float().mean().detach()
    return {"loss": sum(losses), **logs}


class JudgeObjective(nn.Module):
    """The judge with its loss as ``forward`` (DDP only syncs what ``forward`` runs)."""

    def __init__(self, judge: Judge):
        super().__init__()
        self.judge = judge

    def forward(self, video: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return judge_losses(self.judge, video, targets)


# --------------------------------------------------------------------------------------------------------------
# Real videos


def real_videos(split: str, indices: Sequence[int], *, styles: Sequence[str] = STYLES, num_frames: int = 17,
                size: int = 128, seed: int = 0, jitter: float = 0.0, blur: float = 0.0,
                mixed: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rendered ShapesWorld items [B, 3, T, H, W] in [-1, 1] and their label tensors (``collate``), every one with
    ``jitter`` (see ``render``) and a bilinear ``grid_blur`` of ``blur``, or, with ``mixed``, half of them (drawn
    per item) with a jitter up to ``jitter`` and, independently, half with a grid blur up to ``blur``."""
    jitters = [item_jitter(split, i, seed, jitter) if mixed else jitter for i in indices]
    videos, _, labels = collate([sample(split, i, seed, num_frames=num_frames, height=size, width=size,
                                        styles=styles, jitter=amount)
                                 for i, amount in zip(indices, jitters, strict=True)])
    if blur > 0:
        blurs = [item_grid_blur(split, i, seed, blur) if mixed else (blur, False) for i in indices]
        videos = torch.stack([grid_blur(video, amount, blocky)
                              for video, (amount, blocky) in zip(videos, blurs, strict=True)])
    return videos, labels


def item_jitter(split: str, index: int, seed: int, max_jitter: float) -> float:
    """The training jitter of an item: none for half of the items, else uniform in [0, max_jitter); a function of
    the item, so a resumed run sees the same videos."""
    clean, amount = np.random.default_rng([seed, SPLITS.index(split), index, 2]).random(2)
    return 0.0 if clean < 0.5 else float(max_jitter * amount)


def item_grid_blur(split: str, index: int, seed: int, max_blur: float) -> tuple[float, bool]:
    """The training grid blur of an item, (strength, blocky): none for half of the items, else a strength uniform
    in [0, max_blur), blocky or bilinear with equal odds; a function of the item (drawn apart from its jitter)."""
    clean, amount, blocky = np.random.default_rng([seed, SPLITS.index(split), index, 3]).random(3)
    return (0.0, False) if clean < 0.5 else (float(max_blur * amount), bool(blocky < 0.5))


def grid_blur(video: torch.Tensor, strength: float, blocky: bool = False, grid: int = LATENT_GRID) -> torch.Tensor:
    """``video`` [3, T, H, W] blended by ``strength`` with a copy rebuilt from its ``grid`` x ``grid`` block means
    (blocky: every block one colour; else bilinear, smeared): the detail a VAE decoder loses on its latent grid.
    Every frame gets the same transform, so still objects stay still."""
    if strength == 0:
        return video
    frames = video.transpose(0, 1)  # [T, 3, H, W]
    means = F.avg_pool2d(frames, grid)
    rebuilt = F.interpolate(means, size=frames.shape[-2:], mode="nearest" if blocky else "bilinear",
                            align_corners=None if blocky else False)
    return torch.lerp(frames, rebuilt, strength).transpose(0, 1)


class _RealBatches(IterableDataset):
    """(key, video, label tensors) per batch of item indices: training steps (videos already at the judge's
    size) or evaluation chunks, rendered in DataLoader workers so that the model runs meanwhile."""

    def __init__(self, split: str, batches: Sequence[Sequence[int]], keys: Sequence[int], num_frames: int,
                 size: int, downsample: bool, seed: int, jitter: float = 0.0, blur: float = 0.0,
                 mixed: bool = False):
        self.split, self.batches, self.keys, self.num_frames, self.size = split, batches, keys, num_frames, size
        self.downsample, self.seed, self.jitter, self.blur, self.mixed = downsample, seed, jitter, blur, mixed

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for key, indices in list(zip(self.keys, self.batches, strict=True))[worker::workers]:
            video, labels = real_videos(self.split, indices, num_frames=self.num_frames, size=self.size,
                                        seed=self.seed, jitter=self.jitter, blur=self.blur, mixed=self.mixed)
            if self.downsample:  # done here, once, so the training process only runs the network
                video = F.avg_pool3d(video, (1, 2, 2))
            yield key, video, labels


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _loader(dataset: _RealBatches, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=_one_thread,
                      prefetch_factor=4 if workers else None)


@torch.no_grad()
def real_predictions(judge: Judge, split: str, count: int, *, seed: int = 0, batch_size: int = 50,
                     workers: int = 1, jitter: float = 0.0,
                     blur: float = 0.0) -> tuple[list[dict], list[dict], torch.Tensor]:
    """Judge predictions, true scenes and features of items ``0 .. count - 1`` of ``split`` (every style; 17
    frames at 128x128, the nano preset's videos), rendered with ``jitter`` and a bilinear grid ``blur``."""
    judge.eval()
    batches = [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]
    predicted, truth, features = [], [], []
    data = _RealBatches(split, batches, range(len(batches)), 17, 128, False, seed, jitter, blur)
    for _, video, labels in _loader(data, workers):
        scenes, feats = judge.predict(video)
        predicted += scenes
        truth += [scene_dict(labels, i) for i in range(len(video))]
        features.append(feats)
    return predicted, truth, torch.cat(features)


@torch.no_grad()
def fvd_bound(judge: Judge, real_features: torch.Tensor, seed: int = 0) -> float:
    """FVD-nano of uniform-noise videos against real ones: the 0 of the FVD-nano score."""
    from .metrics import frechet_distance

    generator = torch.Generator().manual_seed(seed)
    noise = [judge.predict(torch.rand(len(chunk), 3, 17, 128, 128, generator=generator) * 2 - 1)[1]
             for chunk in real_features.split(50)]
    return frechet_distance(torch.cat(noise), real_features)


# --------------------------------------------------------------------------------------------------------------
# Training


def train_judge(config: TrainConfig, eval_count: int = 1000, workers: int = 1, jitter: float = TRAIN_JITTER,
                blur: float = 0.0) -> Judge:
    """Train the judge on the train split (every style; half of the videos with up to ``jitter``, with ``blur``
    half with a grid blur up to it), resuming from the newest checkpoint, then measure its accuracy on the eval and
    heldout splits (exact renders; the heldout split again with ``TRAIN_JITTER`` and again with a bilinear grid
    blur of ``GRID_BLUR_CHECK``), calibrate FVD-nano and save it to ``<output_dir>/judge``."""
    from accelerate.utils import set_seed

    from .metrics import accuracy_table

    set_seed(config.seed)  # before the judge is built: the same seed gives the same initial weights
    judge = Judge()
    batches: Iterator | None = None

    def batch_fn(step: int, rank: int, world: int) -> dict:
        nonlocal batches
        if batches is None:  # the first step of this process, after a possible resume
            steps = range(step, config.max_steps)
            data = _RealBatches("train", [cycle_indices(s, rank, world, config.batch_size) for s in steps], steps,
                                9, 128, True, config.seed, jitter, blur, mixed=True)
            batches = iter(_loader(data, workers))
        key, video, labels = next(batches)
        if key != step:
            raise RuntimeError(f"data for step {key} arrived at step {step}")
        return {"video": video, "targets": slot_targets(labels)}

    trainer = Trainer(config, {"objective": JudgeObjective(judge)}, batch_fn,
                      lambda batch: trainer.modules["objective"](batch["video"], batch["targets"]))
    trainer.resume()
    started = time.perf_counter()
    trainer.fit()
    judge = trainer.unwrap("objective").judge.eval()
    calibration: dict = {"train_steps": config.max_steps, "train_videos": config.max_steps * config.batch_size,
                         "train_s_last_process": round(time.perf_counter() - started, 1), "eval_videos": eval_count,
                         "train_jitter": jitter, "train_grid_blur": blur, "style_breakdown": {}}
    for split in ("eval", "heldout"):
        predicted, truth, features = real_predictions(judge, split, eval_count, workers=workers)
        calibration[f"accuracy_{split}"] = accuracy_table(predicted, truth)
        calibration["style_breakdown"][split] = {}
        for style in STYLES:
            pairs = [(p, t) for p, t in zip(predicted, truth, strict=True) if t["style"] == style]
            if pairs:  # a short evaluation may miss a style
                calibration["style_breakdown"][split][style] = accuracy_table(*zip(*pairs, strict=True))
        if split == "eval":
            calibration["fvd_noise"] = fvd_bound(judge, features)
    for name, perturbation in (("jittered", {"jitter": TRAIN_JITTER}), ("grid_blurred", {"blur": GRID_BLUR_CHECK})):
        predicted, truth, _ = real_predictions(judge, "heldout", eval_count, workers=workers, **perturbation)
        calibration[f"accuracy_heldout_{name}"] = accuracy_table(predicted, truth)
    judge.register_to_config(calibration=calibration, label_spaces={k: list(v) for k, v in LABEL_SPACES.items()})
    judge.save_pretrained(Path(config.output_dir) / "judge")
    return judge


def export_judge(judge: Judge, folder: str | Path) -> Path:
    """Save a float16 copy (the bundled form: a small safetensors file and config.json)."""
    copy.deepcopy(judge).half().save_pretrained(folder)
    return Path(folder)


def load_judge(path: str | Path | None = None) -> Judge:
    """A judge folder (default: the bundled one), in float32 and eval mode."""
    folder = Path(path) if path is not None else package_weights("judge")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no judge in {folder}: train one with `neodragon eval train-judge`")
    return Judge.from_pretrained(folder, torch_dtype=torch.float32).eval()
