"""Super-resolution training: pairs of decoded low-resolution frames and real high-resolution frames, stored once
on disk, and the QuickSRNet objective.

The low-resolution input carries the degradation the SR model sees at inference: the frames of a real video passed
through the VAE (encode -> posterior mean -> decode), so the network learns to undo the decoder's blur and
artefacts, not only to interpolate. The target is the same real video at twice the size.

- ShapesWorld (nano scale): the target is the scene rendered at 2x (256 x 256); the input is the VAE round trip of the
  scene rendered at 1x (128 x 128). The renderer samples coverage at pixel centres in resolution-independent units,
  so the 1x render is the 2x render reduced by 2 x 2 averaging (to a mean absolute difference of about 1e-4 on
  [-1, 1]; only a few anti-aliased edge pixels differ): the two are geometrically aligned
  (``tests/test_sr_training.py`` checks it).
- A folder of the user's own videos (official scale): the target is the video's frames (centre-cropped to a multiple
  of 16 pixels); the input is those frames reduced 2x by 2 x 2 averaging and then passed through the VAE
  (``degradation="vae"``), or reduced by antialiased bicubic interpolation without the VAE (``"bicubic"``, the
  classical SR setting, for a model meant for other decoders).

The VAE is the expensive part (about 1.6 s per 17 x 128 x 128 video on one busy CPU thread, against 40 ms for a
QuickSRNet-Small step), so every pair is made once and kept as uint8 safetensors shards (``PairStore``); the
training batches are crops read from them through memory maps.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..eval.reconstruction import reconstruct
from ..eval.upscaling import area_downsample, bicubic_downsample
from ..models.sr import QuickSRNet
from ..models.vae import AsymmetricCausalVideoVAE
from ..utils.video import atomic_path
from .clips import clip_batch, video_batch

PAIRS_META = "pairs.json"
VIDEOS_PER_SHARD = 8
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif")
DEGRADATIONS = ("vae", "bicubic")
OBJECT_CROPS = 0.75  # share of training crops placed around the objects (when the pair knows where they are)
SIZE_MULTIPLE = 16  # high-resolution frames: 2x the VAE's 8x spatial compression


# -- tensors ---------------------------------------------------------------------------------------------------------

def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] in [-1, 1] -> uint8 [B, T, C, H, W] (rounded)."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 1, 3, 4).contiguous()


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32 in [-1, 1]."""
    return frames.float() / 127.5 - 1


def object_centres(coverage: torch.Tensor) -> torch.Tensor:
    """Centroid (y, x) in pixels of the objects' coverage [B, T, H, W], per frame: [B, T, 2]; NaN where a frame shows
    no object."""
    height, width = coverage.shape[-2:]
    mass = coverage.double().sum((-2, -1))
    ys = (coverage.double().sum(-1) * (torch.arange(height, dtype=torch.float64) + 0.5)).sum(-1) / mass
    xs = (coverage.double().sum(-2) * (torch.arange(width, dtype=torch.float64) + 0.5)).sum(-1) / mass
    return torch.stack([ys, xs], -1).float()  # 0 / 0 = NaN where empty


def vae_fingerprint(vae: AsymmetricCausalVideoVAE) -> str:
    """A short hash of the VAE's weights: a pair store made with another VAE is not reused."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# -- pairs -----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def shapes_world_pairs(vae: AsymmetricCausalVideoVAE | None, split: str, indices: Sequence[int], num_frames: int = 17,
                       size: int = 128, seed: int = 0, styles: Sequence[str] = ("none",),
                       scale: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ShapesWorld SR pairs: the low-resolution input [B, 3, T, size, size] (the VAE round trip of the scene rendered
    at ``size``; the render itself with ``vae=None``), the target [B, 3, T, scale*size, scale*size] (the same scene
    rendered at ``scale * size``), both in [-1, 1], and the objects' centres [B, T, 2] in input pixels."""
    low, coverage, _ = clip_batch(split, indices, num_frames, size, None, seed, styles)
    high, _ = video_batch(split, indices, num_frames, size * scale, None, seed, styles)
    if vae is not None:
        low = reconstruct(vae, low)
    return low, high, object_centres(coverage[:, 0])


def list_videos(folder: str | Path) -> list[Path]:
    """The video files directly in ``folder`` (by suffix), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} does not exist")
    videos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise FileNotFoundError(f"{folder} holds no videos ({', '.join(VIDEO_SUFFIXES)})")
    return videos


def read_video(path: str | Path) -> torch.Tensor:
    """Every frame of a video file as uint8 [T, H, W, 3] (imageio; grey and RGBA frames become RGB)."""
    import imageio.v2 as imageio

    try:
        frames = imageio.mimread(path, memtest=False)
    except Exception as err:  # imageio raises a variety of errors for unreadable files
        raise ValueError(f"cannot read the video {path}: {err}") from err
    if not frames:
        raise ValueError(f"{path} has no frames")
    rgb = []
    for frame in frames:
        frame = np.asarray(frame)
        if frame.ndim == 2:
            frame = np.repeat(frame[..., None], 3, -1)
        rgb.append(frame[..., :3].astype(np.uint8))
    return torch.from_numpy(np.stack(rgb))


def video_clips(frames: torch.Tensor, num_frames: int = 17, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """A video's frames uint8 [T, H, W, 3] as clips [N, 3, F, H', W'] in [-1, 1]: centre-cropped to multiples of
    ``multiple`` pixels and cut into consecutive clips of ``num_frames`` frames (the rest is dropped; a video shorter
    than one clip gives one clip of the most frames of the form 1 + 8k it has)."""
    t, h, w, _ = frames.shape
    ch, cw = h - h % multiple, w - w % multiple
    if ch < multiple or cw < multiple:
        raise ValueError(f"a {h}x{w} video is too small: frames need at least {multiple}x{multiple} pixels")
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    video = from_uint8(frames[:, y0 : y0 + ch, x0 : x0 + cw].permute(3, 0, 1, 2))  # [3, T, H, W]
    length = num_frames if t >= num_frames else 1 + 8 * ((t - 1) // 8)
    count = t // length
    return torch.stack([video[:, k * length : (k + 1) * length] for k in range(count)])


@torch.no_grad()
def folder_pairs(vae: AsymmetricCausalVideoVAE | None, clips: torch.Tensor, degradation: str = "vae",
                 scale: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SR pairs of real clips [N, 3, T, H, W] (the targets): the input is the clips reduced ``scale`` times by
    averaging and passed through ``vae`` (``degradation="vae"``) or reduced by antialiased bicubic interpolation
    (``"bicubic"``). The centres are unknown (NaN), so crops are drawn uniformly."""
    if degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r}; expected one of {', '.join(DEGRADATIONS)}")
    if degradation == "vae":
        if vae is None:
            raise ValueError("the 'vae' degradation needs a VAE")
        low = reconstruct(vae, area_downsample(clips, scale), batch_size=1)
    else:
        low = bicubic_downsample(clips, scale)
    centres = torch.full((clips.shape[0], clips.shape[2], 2), float("nan"))
    return low, clips, centres


# -- the pair store ---------------------------------------------------------------------------------------------------

def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def _save_shard(path: Path, low: torch.Tensor, high: torch.Tensor, centres: torch.Tensor) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        save_file({"lr": to_uint8(low), "hr": to_uint8(high), "centre": centres.float().contiguous()}, tmp)


def write_pairs(folder: str | Path, meta: dict, shards: dict[str, Callable[[], tuple]], rank: int = 0,
                world: int = 1, progress: bool = True) -> Path:
    """Make this process's share of ``shards`` (name -> a function returning (input, target, centres)) in
    ``folder``, skipping those already there, after checking (and writing) ``folder``'s ``pairs.json``, which
    records ``meta`` and the shard names. Every process writes the same ``pairs.json``; shards are written whole
    (temporary file, then rename), so an interrupted build resumes."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {**meta, "shards": sorted(shards)}
    existing = folder / PAIRS_META
    if existing.is_file():
        found = json.loads(existing.read_text())
        if found != record:
            changed = sorted(k for k in {*found, *record} if found.get(k) != record.get(k))
            raise ValueError(f"{folder} holds SR pairs made differently (differs in {', '.join(changed)}): choose "
                             "another pairs folder, or delete it to rebuild.")
    else:
        _write_json(existing, record)
    mine = [name for k, name in enumerate(sorted(shards)) if k % world == rank and not (folder / name).is_file()]
    for name in tqdm(mine, desc="SR pairs", disable=not progress or not mine):
        _save_shard(folder / name, *shards[name]())
    return folder


def build_shapes_world_pairs(folder: str | Path, vae: AsymmetricCausalVideoVAE | None, count: int,
                             num_frames: int = 17, size: int = 128, seed: int = 0,
                             styles: Sequence[str] = ("none",), scale: int = 2, rank: int = 0, world: int = 1,
                             progress: bool = True) -> Path:
    """``count`` training-split ShapesWorld pairs (``shapes_world_pairs``) in ``folder``, in shards of
    ``VIDEOS_PER_SHARD`` videos, shared out across ``world`` processes."""
    if count < 1:
        raise ValueError(f"the pair store needs at least one video, got {count}")
    meta = {"source": "shapes_world", "split": "train", "videos": count, "num_frames": num_frames, "size": size,
            "scale": scale, "seed": seed, "styles": list(styles), "degradation": "vae" if vae is not None else "none",
            "vae": vae_fingerprint(vae) if vae is not None else None}
    starts = range(0, count, VIDEOS_PER_SHARD)
    shards = {f"shard_{k // VIDEOS_PER_SHARD:05d}.safetensors":
              (lambda k=k: shapes_world_pairs(vae, "train", range(k, min(k + VIDEOS_PER_SHARD, count)), num_frames,
                                              size, seed, styles, scale)) for k in starts}
    return write_pairs(folder, meta, shards, rank, world, progress)


def build_folder_pairs(folder: str | Path, videos_dir: str | Path, vae: AsymmetricCausalVideoVAE | None,
                       num_frames: int = 17, degradation: str = "vae", scale: int = 2, rank: int = 0, world: int = 1,
                       progress: bool = True) -> Path:
    """SR pairs of every video in ``videos_dir`` (``folder_pairs``; one shard per video, its clips), shared out
    across ``world`` processes."""
    if degradation not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {degradation!r}; expected one of {', '.join(DEGRADATIONS)}")
    videos = list_videos(videos_dir)
    meta = {"source": "videos", "videos": [f"{p.name}:{p.stat().st_size}" for p in videos], "num_frames": num_frames,
            "scale": scale, "degradation": degradation,
            "vae": vae_fingerprint(vae) if degradation == "vae" and vae is not None else None}
    shards = {f"video_{k:05d}.safetensors":
              (lambda path=path: folder_pairs(vae, video_clips(read_video(path), num_frames), degradation, scale))
              for k, path in enumerate(videos)}
    return write_pairs(folder, meta, shards, rank, world, progress)


class PairStore:
    """The SR pairs of a folder made by ``write_pairs``, read through memory maps: ``batch`` draws crops of random
    frames, a pure function of (step, rank, seed), so a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_path = self.folder / PAIRS_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{self.folder} holds no SR pairs ({PAIRS_META} is missing)")
        self.meta = json.loads(meta_path.read_text())
        missing = [name for name in self.meta["shards"] if not (self.folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.folder} lacks {len(missing)} pair shards (e.g. {missing[0]}): its build "
                                    "was interrupted; run the same command again to finish it.")
        self.scale = int(self.meta["scale"])
        self._handles = [safe_open(str(self.folder / name), framework="pt") for name in self.meta["shards"]]
        frames = []  # (shard, clip, frame) of every frame
        self.sizes = set()
        for s, handle in enumerate(self._handles):
            clips, length, _, height, width = handle.get_slice("lr").get_shape()
            self.sizes.add((height, width))
            frames += [(s, c, t) for c in range(clips) for t in range(length)]
        if not frames:
            raise ValueError(f"{self.folder} holds no frames")
        self.frames = np.asarray(frames)

    def __len__(self) -> int:
        return len(self.frames)

    def _frame(self, s: int, c: int, t: int, name: str, box: tuple[int, int, int, int]) -> torch.Tensor:
        """Frame ``t`` of clip ``c`` of shard ``s`` (``name``: "lr" or "hr"), cropped to ``box`` (y0, x0, h, w)."""
        y0, x0, h, w = box
        return from_uint8(self._handles[s].get_slice(name)[c : c + 1, t : t + 1, :, y0 : y0 + h, x0 : x0 + w][0, 0])

    def batch(self, step: int, rank: int, batch_size: int, crop: int | None, seed: int = 0) -> dict[str, torch.Tensor]:
        """``batch_size`` pairs {"lr": [B, 3, c, c], "hr": [B, 3, s*c, s*c]}: random frames, each cropped to ``crop``
        input pixels (None: whole frames, which needs frames of one size), around the objects for
        ``OBJECT_CROPS`` of the crops whose frame knows them, elsewhere uniformly."""
        rng = np.random.default_rng([seed, step, rank, 17])
        if crop is None and len(self.sizes) > 1:
            raise ValueError(f"frames of several sizes ({sorted(self.sizes)}) need a crop size")
        lows, highs = [], []
        for k in rng.integers(len(self), size=batch_size):
            s, c, t = (int(v) for v in self.frames[k])
            _, _, _, height, width = self._handles[s].get_slice("lr").get_shape()
            size_y, size_x = (height, width) if crop is None else (min(crop, height), min(crop, width))
            centre = self._handles[s].get_slice("centre")[c : c + 1, t : t + 1][0, 0]
            near_objects = bool(torch.isfinite(centre).all()) and rng.random() < OBJECT_CROPS
            if near_objects:
                jitter = rng.uniform(-0.5, 0.5, 2) * (size_y, size_x)
                y0, x0 = (int(np.clip(round(float(centre[i]) - n / 2 + j), 0, limit - n))
                          for i, n, j, limit in ((0, size_y, jitter[0], height), (1, size_x, jitter[1], width)))
            else:
                y0, x0 = int(rng.integers(height - size_y + 1)), int(rng.integers(width - size_x + 1))
            lows.append(self._frame(s, c, t, "lr", (y0, x0, size_y, size_x)))
            f = self.scale
            highs.append(self._frame(s, c, t, "hr", (y0 * f, x0 * f, size_y * f, size_x * f)))
        return {"lr": torch.stack(lows), "hr": torch.stack(highs)}


# -- objective --------------------------------------------------------------------------------------------------------

def sr_losses(upscaled: torch.Tensor, target: torch.Tensor, edge_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """L1 between the upscaled and the real frames [B, 3, H, W], plus ``edge_weight`` times the L1 of their
    horizontal and vertical finite differences (sharp edges; off by default)."""
    l1 = F.l1_loss(upscaled, target)
    terms = {"loss": l1, "l1": l1.detach()}
    if edge_weight:
        edge = sum(F.l1_loss(torch.diff(upscaled, dim=d), torch.diff(target, dim=d)) for d in (-1, -2)) / 2
        terms["loss"] = l1 + edge_weight * edge
        terms["edge"] = edge.detach()
    return terms


class SRObjective(nn.Module):
    """A QuickSRNet with its training loss (``sr_losses``) as ``forward``, which is what DDP wraps."""

    def __init__(self, model: QuickSRNet, edge_weight: float = 0.0):
        super().__init__()
        self.model, self.edge_weight = model, edge_weight

    def forward(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        return sr_losses(self.model(lr), hr, self.edge_weight)
