"""ShapesWorld: deterministic procedural captioned videos with ground-truth labels (the nano preset's world).

``render(spec, seed)`` draws one scene: a background and one or two objects, each with a shape, colour, size and
motion, optionally in a style (a post-render transform). It returns the video in [-1, 1] (the VAE's
convention) as [3, T, H, W], a caption and the labels that the VBench-nano judges learn. ``sample(split, index)``
draws the scene of one dataset item; the datasets stream items on the fly.

Geometry is in units of the frame's short side, so a scene looks the same at any resolution. Objects never
overlap and stay inside the frame in every frame. In two-object scenes the relation holds in every frame: the
objects are apart along the relation's axis, and the line between their centres is within 35 degrees of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .captions import make_caption

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "heart")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink", "white")
SIZES = ("small", "large")
MOTIONS = ("still", "left", "right", "up", "down", "growing", "shrinking", "spinning", "bouncing")
BACKGROUNDS = ("black", "white", "gray", "gradient", "checkered")
RELATIONS = ("none", "left_of", "right_of", "above", "below")  # object 0 <relation> object 1
STYLES = ("none", "neon", "stripes", "pixel", "outline")
SPLITS = ("train", "eval", "heldout")

# Never in "train" or "eval" (for any object); object 0 of every "heldout" scene has one of them. Each shape,
# and each colour but white, appears once per list, so every single attribute is still seen in training.
HELDOUT_COLOUR_SHAPE = (("orange", "circle"), ("yellow", "square"), ("green", "triangle"), ("cyan", "star"),
                        ("blue", "diamond"), ("purple", "cross"), ("pink", "ring"), ("red", "heart"))
HELDOUT_SHAPE_MOTION = (("circle", "bouncing"), ("square", "spinning"), ("triangle", "down"), ("star", "growing"),
                        ("diamond", "left"), ("cross", "up"), ("ring", "shrinking"), ("heart", "right"))

RGB = {"red": (0.9, 0.1, 0.1), "orange": (1.0, 0.5, 0.0), "yellow": (1.0, 0.9, 0.1), "green": (0.1, 0.75, 0.15),
       "cyan": (0.1, 0.9, 0.95), "blue": (0.1, 0.25, 1.0), "purple": (0.55, 0.1, 0.85), "pink": (1.0, 0.5, 0.8),
       "white": (0.97, 0.97, 0.97)}
# A rotating circle or ring looks still, so a "spinning" label on them could not be judged.
ROUND_SHAPES = ("circle", "ring")

# Geometry, in units of the frame's short side. Every shape fits in a circle of its radius.
RADIUS = {"small": 0.12, "large": 0.2}
TRAVEL = 0.4  # distance of a left/right/up/down motion over the whole video
BOUNCE = 0.3  # height of a bounce (two bounces per video)
GROW, SHRINK = 1.7, 0.55  # final scale of a growing / shrinking object
MARGIN, GAP = 0.03, 0.05  # to the frame's border; between the objects of a two-object scene
# Across the relation's axis the centres stay within ALIGN x (sum of the radii), while along it they are more than
# the sum of the radii apart: the line between the centres stays within atan(0.7) = 35 degrees of the relation's
# axis, a clear margin from the 45 degrees where another relation would start to be true.
ALIGN = 0.7
TWO_OBJECT_PROBABILITY = 1 / 3


@dataclass(frozen=True)
class ObjectSpec:
    """One object: names from SHAPES, COLOURS, SIZES and MOTIONS. Size is the size in the first frame."""

    shape: str
    colour: str
    size: str
    motion: str


@dataclass(frozen=True)
class SceneSpec:
    """What a video shows: one or two objects on a background, their relation, and a style."""

    objects: tuple[ObjectSpec, ...]
    background: str
    relation: str = "none"
    style: str = "none"

    def __post_init__(self):
        for obj in self.objects:
            for value, space in ((obj.shape, SHAPES), (obj.colour, COLOURS), (obj.size, SIZES),
                                 (obj.motion, MOTIONS)):
                _check(value, space)
            if obj.motion == "spinning" and obj.shape in ROUND_SHAPES:
                raise ValueError(f"a spinning {obj.shape} looks still; round shapes do not spin")
            if obj.colour == self.background:
                raise ValueError(f"a {obj.colour} object would be invisible on a {self.background} background")
        _check(self.background, BACKGROUNDS)
        _check(self.relation, RELATIONS)
        _check(self.style, STYLES)
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")
        if (self.relation == "none") != (len(self.objects) == 1):
            raise ValueError("two-object scenes need a relation and one-object scenes have none")
        if len(self.objects) == 2 and self.objects[0].colour == self.objects[1].colour:
            raise ValueError("the two objects of a scene have different colours, so captions can tell them apart")

    @property
    def heldout(self) -> bool:
        """Whether an object has a held-out colour x shape or shape x motion combination."""
        return any(map(_heldout, self.objects))


@dataclass(frozen=True)
class ObjectLabels:
    """Class ids of one object (indices into SHAPES, COLOURS, SIZES, MOTIONS) and its centre in the first frame
    as (x, y) fractions of the width and height."""

    shape: int
    colour: int
    size: int
    motion: int
    position: tuple[float, float]


@dataclass(frozen=True)
class Labels:
    """Ground truth of a video: per-object labels and the scene's class ids (BACKGROUNDS, RELATIONS, STYLES)."""

    objects: tuple[ObjectLabels, ...]
    background: int
    relation: int
    style: int
    heldout: bool

    @property
    def count(self) -> int:
        return len(self.objects)

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """Fixed-size tensors: per-object ids [2] (-1 where there is no second object), position [2, 2]."""
        pad = [-1] * (2 - self.count)
        tensors = {key: torch.tensor([getattr(o, key) for o in self.objects] + pad)
                   for key in ("shape", "colour", "size", "motion")}
        tensors["position"] = torch.tensor([o.position for o in self.objects] + [(-1.0, -1.0)] * len(pad))
        tensors.update({key: torch.tensor(getattr(self, key))
                        for key in ("background", "relation", "style", "count", "heldout")})
        return tensors


class Sample(NamedTuple):
    """A video [3, T, H, W] in [-1, 1], its caption, its labels and the objects' coverage [T, H, W] in [0, 1]
    (how much of each pixel the objects cover; training losses use it to weigh the few object pixels)."""

    video: torch.Tensor
    caption: str
    labels: Labels
    coverage: torch.Tensor | None = None


def _heldout(obj: ObjectSpec) -> bool:
    return (obj.colour, obj.shape) in HELDOUT_COLOUR_SHAPE or (obj.shape, obj.motion) in HELDOUT_SHAPE_MOTION


def _check(value: str, space: Sequence[str]) -> None:
    if value not in space:
        raise ValueError(f"{value!r} is not one of {space}")


def _check_styles(styles: Sequence[str]) -> None:
    if not styles:
        raise ValueError(f"give at least one style of {STYLES}")
    for style in styles:
        _check(style, STYLES)


# --------------------------------------------------------------------------------------------------------------
# Scenes of the splits


def sample_spec(rng: np.random.Generator, split: str = "train") -> SceneSpec:
    """A random scene of ``split`` (style "none"): "train" and "eval" never contain a held-out combination;
    in "heldout" object 0 always has one."""
    _check(split, SPLITS)
    count = 2 if rng.random() < TWO_OBJECT_PROBABILITY else 1
    while True:
        background = _pick(rng, BACKGROUNDS)
        objects = [_random_object(rng, background) for _ in range(count)]
        if split == "heldout":
            objects[0] = _heldout_object(rng, background)
        if (count == 2 and objects[0].colour == objects[1].colour) or any(
                map(_heldout, objects[1:] if split == "heldout" else objects)):
            continue
        spec = SceneSpec(tuple(objects), background, _pick(rng, RELATIONS[1:]) if count == 2 else "none")
        if _fits(spec):
            return spec


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _random_object(rng: np.random.Generator, background: str) -> ObjectSpec:
    shape = _pick(rng, SHAPES)
    return ObjectSpec(shape, _pick(rng, [c for c in COLOURS if c != background]), _pick(rng, SIZES),
                      _pick(rng, _motions(shape)))


def _heldout_object(rng: np.random.Generator, background: str) -> ObjectSpec:
    pairs = HELDOUT_COLOUR_SHAPE + HELDOUT_SHAPE_MOTION
    first, second = pairs[int(rng.integers(len(pairs)))]
    if first in COLOURS:
        return ObjectSpec(second, first, _pick(rng, SIZES), _pick(rng, _motions(second)))
    return ObjectSpec(first, _pick(rng, [c for c in COLOURS if c != background]), _pick(rng, SIZES), second)


def _motions(shape: str) -> tuple[str, ...]:
    return tuple(m for m in MOTIONS if not (m == "spinning" and shape in ROUND_SHAPES))


def _fits(spec: SceneSpec) -> bool:
    """Whether the scene can be laid out in a square frame (then it fits any frame: the short side is 1). Every
    motion's extremes (the ends, the bounce tops at t = 1/4 and 3/4) are frames of any 1 + 8k video, so 17 frames
    stand for all lengths."""
    return _layout(spec, np.linspace(0, 1, 17), 1.0, 1.0, np.random.default_rng(0)) is not None


def sample(split: str, index: int, base_seed: int = 0, *, num_frames: int = 17, height: int = 128,
           width: int = 128, styles: Sequence[str] = ("none",), jitter: float = 0.0) -> Sample:
    """Item ``index`` of ``split``: deterministic per (split, index, base_seed). The style is drawn from
    ``styles`` by its own random stream, so an index shows the same scene whatever the styles. "train" captions
    sometimes leave out sizes or the background; "eval" and "heldout" captions mention everything. ``jitter``:
    see ``render``."""
    spec, seed = _scene(split, index, base_seed, styles)
    return render(spec, seed, num_frames=num_frames, height=height, width=width, complete_caption=split != "train",
                  jitter=jitter)


def _scene(split: str, index: int, base_seed: int, styles: Sequence[str]) -> tuple[SceneSpec, int]:
    """The scene (with its style) and render seed of item ``index`` of ``split``."""
    _check(split, SPLITS)
    _check_styles(styles)
    rng = np.random.default_rng([base_seed, SPLITS.index(split), index])
    spec = sample_spec(rng, split)
    seed = int(rng.integers(2**63))
    style = _pick(np.random.default_rng([base_seed, SPLITS.index(split), index, 1]), styles)
    return dataclasses.replace(spec, style=style), seed


# --------------------------------------------------------------------------------------------------------------
# Rendering


def render(spec: SceneSpec, seed: int, *, num_frames: int = 17, height: int = 128, width: int = 128,
           complete_caption: bool = True, jitter: float = 0.0) -> Sample:
    """The video of ``spec``; ``seed`` sets the positions, the spin direction and the caption's wording.

    ``jitter`` > 0 wobbles every object independently per frame: its size by up to ``jitter`` (relative) and its
    centre by up to ``jitter`` radii along each axis, a nuisance that leaves every label true (the judge learns to
    read motion as the trend, not as frame-to-frame noise). It draws from its own random stream, after the layout,
    so the scene and its caption are those of ``jitter`` = 0, and an object may cross the margin by a pixel or two.
    """
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    if num_frames < 1 or (num_frames - 1) % 8:
        raise ValueError(f"num_frames must be 1 + 8k, got {num_frames}")
    if min(height, width) < 16:
        raise ValueError(f"height and width must be at least 16, got {height}x{width}")
    rng = np.random.default_rng([seed, 0])
    t = np.linspace(0, 1, num_frames)
    unit = min(height, width)
    starts = _layout(spec, t, width / unit, height / unit, rng)
    if starts is None:
        raise ValueError(f"{spec} does not fit in the frame: use smaller objects or motions that keep the relation")
    xs = np.arange(width, dtype=np.float32) + 0.5  # pixel centres
    ys = np.arange(height, dtype=np.float32) + 0.5
    alpha = np.zeros((num_frames, height, width), np.float32)
    paint = np.zeros((3, num_frames, height, width), np.float32)
    wobble = np.random.default_rng([seed, 1]) if jitter else None
    for obj, (x0, y0) in zip(spec.objects, starts, strict=True):
        dx, dy, scale = _trajectory(obj.motion, t)
        if wobble is not None:
            dx, dy, scale = (dx + jitter * RADIUS[obj.size] * wobble.uniform(-1, 1, num_frames),
                             dy + jitter * RADIUS[obj.size] * wobble.uniform(-1, 1, num_frames),
                             scale * (1 + jitter * wobble.uniform(-1, 1, num_frames)))
        angle = np.pi * t * (1 if rng.random() < 0.5 else -1) if obj.motion == "spinning" else None
        cx, cy, radius = (x0 + dx) * unit, (y0 + dy) * unit, RADIUS[obj.size] * scale * unit
        cols = slice(max(0, math.floor((cx - radius).min())), math.ceil((cx + radius).max()))
        rows = slice(max(0, math.floor((cy - radius).min())), math.ceil((cy + radius).max()))
        cover = _coverage(obj.shape, xs[cols], ys[rows], cx, cy, radius, angle)
        alpha[:, rows, cols] += cover
        colour = np.asarray(RGB[obj.colour], np.float32)[:, None, None, None]
        paint[:, :, rows, cols] = np.where(cover > 0, colour, paint[:, :, rows, cols])
    frames = STYLE_TRANSFORMS[spec.style](_background(spec.background, height, width), paint, alpha, unit)
    frames = np.ascontiguousarray(frames, np.float32)
    frames *= 2
    frames -= 1
    video = torch.from_numpy(np.clip(frames, -1, 1, out=frames))  # numpy: torch's threads only add overhead here
    labels = Labels(
        objects=tuple(ObjectLabels(SHAPES.index(o.shape), COLOURS.index(o.colour), SIZES.index(o.size),
                                   MOTIONS.index(o.motion), (float(x * unit / width), float(y * unit / height)))
                      for o, (x, y) in zip(spec.objects, starts, strict=True)),
        background=BACKGROUNDS.index(spec.background), relation=RELATIONS.index(spec.relation),
        style=STYLES.index(spec.style), heldout=spec.heldout)
    coverage = torch.from_numpy(np.minimum(alpha, 1.0))
    return Sample(video, make_caption(spec, seed, complete=complete_caption), labels, coverage)


def _trajectory(motion: str, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offset (dx, dy) from the start and scale of the object over time ``t`` in [0, 1]."""
    zero, one = np.zeros_like(t), np.ones_like(t)
    dx = {"left": -TRAVEL * t, "right": TRAVEL * t}.get(motion, zero)
    dy = {"up": -TRAVEL * t, "down": TRAVEL * t, "bouncing": -BOUNCE * np.abs(np.sin(2 * np.pi * t))}.get(motion, zero)
    scale = {"growing": 1 + (GROW - 1) * t, "shrinking": 1 + (SHRINK - 1) * t}.get(motion, one)
    return dx, dy, scale


def _layout(spec: SceneSpec, t: np.ndarray, width: float, height: float,
            rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Start centres (x, y) that keep the objects in frame and the relation true in every frame; None if the
    scene cannot be laid out. Sizes are in units of the short side."""
    paths = []
    for obj in spec.objects:
        dx, dy, scale = _trajectory(obj.motion, t)
        paths.append(((dx, dy), RADIUS[obj.size] * scale))
    limits = (width, height)

    def span(offset: np.ndarray, extent: np.ndarray, axis: int) -> tuple[float, float]:
        # start coordinates that keep the object inside [MARGIN, limit - MARGIN] along an axis
        return MARGIN - (offset - extent).min(), limits[axis] - MARGIN - (offset + extent).max()

    if len(paths) == 1:
        ((dx, dy), extent), = paths
        ranges = [span(dx, extent, 0), span(dy, extent, 1)]
        if any(lo > hi for lo, hi in ranges):
            return None
        return [tuple(rng.uniform(lo, hi) for lo, hi in ranges)]

    first, second = paths if spec.relation in ("left_of", "above") else paths[::-1]
    apart = 0 if spec.relation in ("left_of", "right_of") else 1
    along = 1 - apart
    (a, ea), (b, eb) = first, second
    start = [[0.0, 0.0], [0.0, 0.0]]
    # Along the relation's axis, `first` ends before `second` begins, in every frame.
    (a_lo, a_hi), (b_lo, b_hi) = span(a[apart], ea, apart), span(b[apart], eb, apart)
    distance = (a[apart] - b[apart] + ea + eb).max() + GAP
    a_hi = min(a_hi, b_hi - distance)
    if a_lo > a_hi:
        return None
    start[0][apart] = rng.uniform(a_lo, a_hi)
    start[1][apart] = rng.uniform(max(b_lo, start[0][apart] + distance), b_hi)
    # Along the other axis their centres stay close (ALIGN) in every frame.
    (a_lo, a_hi), (b_lo, b_hi) = span(a[along], ea, along), span(b[along], eb, along)
    drift, reach = a[along] - b[along], ALIGN * (ea + eb)
    lo, hi = max((-reach - drift).max(), a_lo - b_hi), min((reach - drift).min(), a_hi - b_lo)
    if lo > hi or a_lo > a_hi or b_lo > b_hi:
        return None
    offset = rng.uniform(lo, hi)
    start[1][along] = rng.uniform(max(b_lo, a_lo - offset), min(b_hi, a_hi - offset))
    start[0][along] = start[1][along] + offset
    ordered = start if spec.relation in ("left_of", "above") else start[::-1]
    return [tuple(p) for p in ordered]


def _coverage(shape: str, xs: np.ndarray, ys: np.ndarray, cx: np.ndarray, cy: np.ndarray, radius: np.ndarray,
              angle: np.ndarray | None) -> np.ndarray:
    """Anti-aliased coverage [T, len(ys), len(xs)] of the shape, from its signed distance in pixels."""
    r = radius.astype(np.float32)[:, None, None]
    u = (xs[None, None, :] - cx.astype(np.float32)[:, None, None]) / r
    v = (cy.astype(np.float32)[:, None, None] - ys[None, :, None]) / r  # y up, so shapes point up
    if angle is not None:
        cos, sin = np.cos(angle).astype(np.float32)[:, None, None], np.sin(angle).astype(np.float32)[:, None, None]
        u, v = cos * u + sin * v, cos * v - sin * u
    return np.clip(0.5 - _sdf(shape, u, v) * r, 0, 1)


def _sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to a shape inside the unit circle; exact 2-D distances after
    Inigo Quilez (https://iquilezles.org/articles/distfunctions2d/)."""
    x, y = np.broadcast_arrays(x, y)
    if shape == "circle":
        return np.hypot(x, y) - 0.8
    if shape == "ring":
        return np.abs(np.hypot(x, y) - 0.67) - 0.28
    if shape == "square":
        qx, qy = np.abs(x) - 0.66, np.abs(y) - 0.66
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    if shape == "diamond":
        bx, by = 0.6, 0.95
        px, py = np.abs(x), np.abs(y)
        h = np.clip(((bx - 2 * px) * bx - (by - 2 * py) * by) / (bx * bx + by * by), -1, 1)
        return np.hypot(px - 0.5 * bx * (1 - h), py - 0.5 * by * (1 + h)) * np.sign(px * by + py * bx - bx * by)
    if shape == "triangle":  # equilateral, centroid at 0, apex at (0, 1)
        k, r = math.sqrt(3), math.sqrt(3) / 2
        px, py = np.abs(x) - r, y + r / k
        fold = px + k * py > 0
        px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
        px = px - np.clip(px, -2 * r, 0)
        return -np.hypot(px, py) * np.sign(py)
    if shape == "star":  # five points, outer radius 1
        k1x, k1y = 0.809016994375, -0.587785252292
        px, py = np.abs(x), y
        for kx in (k1x, -k1x):  # fold every point onto the upper one
            d = 2 * np.maximum(kx * px + k1y * py, 0)
            px, py = px - d * kx, py - d * k1y
        px, py = np.abs(px), py - 1
        bx, by = -k1y * 0.45, k1x * 0.45 - 1
        h = np.clip((px * bx + py * by) / (bx * bx + by * by), 0, 1)
        return np.hypot(px - bx * h, py - by * h) * np.sign(py * bx - px * by)
    if shape == "cross":
        bx, by = 0.9, 0.3
        px, py = np.abs(x), np.abs(y)
        px, py = np.maximum(px, py), np.minimum(px, py)
        qx, qy = px - bx, py - by
        k = np.maximum(qx, qy)
        wx, wy = np.where(k > 0, qx, by - px), np.where(k > 0, qy, -k)
        return np.sign(k) * np.hypot(np.maximum(wx, 0), np.maximum(wy, 0))
    if shape == "heart":  # Quilez's heart (tip at 0, height ~1.1) scaled by 0.7 into the unit circle
        s = 0.7
        px, py = np.abs(x) * s, y * s + 0.55
        upper = np.hypot(px - 0.25, py - 0.75) - math.sqrt(2) / 4
        m = 0.5 * np.maximum(px + py, 0)
        lower = np.sqrt(np.minimum(px**2 + (py - 1) ** 2, (px - m) ** 2 + (py - m) ** 2)) * np.sign(px - py)
        return np.where(px + py > 1, upper, lower) / s
    raise ValueError(f"unknown shape {shape!r}")


def _background(name: str, height: int, width: int) -> np.ndarray:
    """The background as [3, 1, H, W] in [0, 1]."""
    unit = min(height, width)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if name == "gradient":  # dark violet at the top to dark teal at the bottom
        top, bottom = np.array([0.12, 0.04, 0.3], np.float32), np.array([0.02, 0.25, 0.3], np.float32)
        w = (ys / height)[None]
        image = top[:, None, None] * (1 - w) + bottom[:, None, None] * w
    elif name == "checkered":  # 8 cells along the short side
        cells = (np.floor(xs * 8 / unit) + np.floor(ys * 8 / unit)) % 2
        image = np.repeat((0.15 + 0.17 * cells)[None], 3, axis=0)
    else:
        level = {"black": 0.03, "white": 0.95, "gray": 0.45}[name]
        image = np.full((3, height, width), level, np.float32)
    return image[:, None].astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Styles: post-render transforms of (background [3, 1, H, W], paint [3, T, H, W] = the colour of the object
# covering each pixel, alpha [T, H, W] = object coverage, unit = the short side in pixels) -> frames [3, T, H, W].


def _plain(background: np.ndarray, paint: np.ndarray, alpha: np.ndarray, unit: int) -> np.ndarray:
    frames = paint - background
    frames *= alpha
    frames += background
    return frames


def _neon(background: np.ndarray, paint: np.ndarray, alpha: np.ndarray, unit: int) -> np.ndarray:
    """Dimmed scene; objects become a whitish tube of light in their colour with a soft glow around it."""
    band = alpha - _erode(alpha, max(1, round(unit / 40)))
    # A glow has no fine detail: blur at half resolution (4x cheaper), then scale back up.
    k, (h, w) = max(1, round(unit / 64)), alpha.shape[1:]
    glow = _blur(_blur(paint[..., ::2, ::2] * band[:, ::2, ::2], k), k)
    glow = glow.repeat(2, axis=-2).repeat(2, axis=-1)[..., :h, :w]
    return np.clip(0.15 * background * (1 - band) + (0.5 + 0.5 * paint) * band + 1.5 * glow, 0, 1)


def _stripes(background: np.ndarray, paint: np.ndarray, alpha: np.ndarray, unit: int) -> np.ndarray:
    """Dark diagonal stripes across the objects (fixed in the frame, 10 per short side, anti-aliased)."""
    period = unit / 10
    ys, xs = np.mgrid[0 : alpha.shape[1], 0 : alpha.shape[2]].astype(np.float32) + 0.5
    across = np.abs(((xs + ys) / period) % 1 - 0.5) * period / math.sqrt(2)  # pixels from the stripe's middle
    stripe = np.clip(period / (4 * math.sqrt(2)) - across + 0.5, 0, 1)
    return _plain(background, paint * (1 - 0.7 * stripe), alpha, unit)


def _pixel(background: np.ndarray, paint: np.ndarray, alpha: np.ndarray, unit: int) -> np.ndarray:
    """Mosaic of about 21 blocks along the short side: each block is the mean colour of its pixels."""
    frames = _plain(background, paint, alpha, unit)
    block = max(2, round(unit / 21))
    _, t, h, w = frames.shape
    rows, cols = -(-h // block), -(-w // block)
    padded = np.pad(frames, ((0, 0), (0, 0), (0, rows * block - h), (0, cols * block - w)), mode="edge")
    blocks = padded.reshape(3, t, rows, block, cols, block).mean(axis=(3, 5))
    return blocks.repeat(block, axis=2).repeat(block, axis=3)[:, :, :h, :w]


def _outline(background: np.ndarray, paint: np.ndarray, alpha: np.ndarray, unit: int) -> np.ndarray:
    """Only a band along each object's edge is drawn; the inside shows the background."""
    return _plain(background, paint, alpha - _erode(alpha, max(1, round(unit / 40))), unit)


def _erode(alpha: np.ndarray, k: int) -> np.ndarray:
    """Minimum over a (2k + 1)^2 window of the last two axes (zero outside the frame)."""
    for _ in range(2):  # along the last axis, then along the other one (swapped into last place)
        n = alpha.shape[-1]
        padded = np.pad(alpha, [(0, 0)] * (alpha.ndim - 1) + [(k, k)])
        alpha = padded[..., :n].copy()
        for i in range(1, 2 * k + 1):
            np.minimum(alpha, padded[..., i : i + n], out=alpha)
        alpha = alpha.swapaxes(-1, -2)
    return alpha


def _blur(image: np.ndarray, k: int) -> np.ndarray:
    """Mean over a (2k + 1)^2 window of the last two axes (zero outside the frame), from running sums."""
    for _ in range(2):
        padded = np.pad(image, [(0, 0)] * (image.ndim - 1) + [(k + 1, k)]).cumsum(-1)
        image = ((padded[..., 2 * k + 1 :] - padded[..., : -2 * k - 1]) / (2 * k + 1)).swapaxes(-1, -2)
    return image


STYLE_TRANSFORMS = {"none": _plain, "neon": _neon, "stripes": _stripes, "pixel": _pixel, "outline": _outline}


# --------------------------------------------------------------------------------------------------------------
# Datasets


class _Items:
    """Settings shared by the datasets: which items, at what size, in which styles."""

    def __init__(self, split: str, base_seed: int, start: int, num_frames: int, height: int, width: int,
                 styles: Sequence[str]):
        _check(split, SPLITS)
        _check_styles(styles)
        self.split, self.base_seed, self.start, self.styles = split, base_seed, start, tuple(styles)
        self.size = dict(num_frames=num_frames, height=height, width=width)

    def item(self, index: int) -> Sample:
        return sample(self.split, index, self.base_seed, styles=self.styles, **self.size)


class ShapesWorldDataset(_Items, Dataset):
    """Items ``start .. start + length - 1`` of a split, rendered on access (map-style)."""

    def __init__(self, split: str = "train", length: int = 1024, *, start: int = 0, base_seed: int = 0,
                 num_frames: int = 17, height: int = 128, width: int = 128, styles: Sequence[str] = ("none",)):
        super().__init__(split, base_seed, start, num_frames, height, width, styles)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return self.item(self.start + index)


class ShapesWorld(_Items, IterableDataset):
    """A stream of items ``start, start + 1, ...`` of a split (endless unless ``length`` is given).

    The indices are dealt round-robin to ``world_size`` ranks (pass the DDP rank, or leave the defaults when
    Accelerate shards the loader) and, within a rank, to the DataLoader's workers: every index goes to exactly
    one (rank, worker). To resume a run, pass ``start`` = the number of items already consumed.
    """

    def __init__(self, split: str = "train", length: int | None = None, *, start: int = 0, base_seed: int = 0,
                 num_frames: int = 17, height: int = 128, width: int = 128, styles: Sequence[str] = ("none",),
                 rank: int = 0, world_size: int = 1):
        super().__init__(split, base_seed, start, num_frames, height, width, styles)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        first, shards = self.start + self.rank * workers + worker, self.world_size * workers
        if self.length is None:
            indices = itertools.count(first, shards)
        else:
            indices = range(first, self.start + self.length, shards)
        for index in indices:
            yield self.item(index)


def collate(batch: Sequence[Sample]) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """Videos [B, 3, T, H, W], captions, and the labels' tensors stacked along a new first axis."""
    tensors = [s.labels.as_tensors() for s in batch]
    return (torch.stack([s.video for s in batch]), [s.caption for s in batch],
            {key: torch.stack([t[key] for t in tensors]) for key in tensors[0]})


# --------------------------------------------------------------------------------------------------------------
# Previews


def to_images(video: torch.Tensor) -> list[Image.Image]:
    """The frames of a [3, T, H, W] video in [-1, 1] as PIL images."""
    pixels = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    return [Image.fromarray(frame) for frame in pixels]


def preview_sheet(samples: Sequence[Sample], frames: int = 6, pad: int = 4) -> Image.Image:
    """One row per video: its caption, then ``frames`` frames evenly spaced from first to last."""
    font = ImageFont.load_default()
    _, t, h, w = samples[0].video.shape
    picks = sorted({round(i * (t - 1) / max(frames - 1, 1)) for i in range(frames)})
    sheet_width = pad + len(picks) * (w + pad)
    line_height = 12
    rows = [(textwrap.wrap(s.caption, width=max(10, (sheet_width - 2 * pad) // 6)), s) for s in samples]
    height = pad + sum(len(lines) * line_height + h + 2 * pad for lines, _ in rows)
    sheet = Image.new("RGB", (sheet_width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    y = pad
    for lines, s in rows:
        for line in lines:
            draw.text((pad, y), line, fill=(230, 230, 230), font=font)
            y += line_height
        y += pad
        images = to_images(s.video)
        for column, frame in enumerate(picks):
            sheet.paste(images[frame], (pad + column * (w + pad), y))
        y += h + pad
    return sheet


def animation(samples: Sequence[Sample], columns: int = 4, pad: int = 2) -> list[Image.Image]:
    """The videos side by side on a grid, one image per time step (for an animated GIF)."""
    _, t, h, w = samples[0].video.shape
    columns = min(columns, len(samples))
    rows = -(-len(samples) // columns)
    videos = [to_images(s.video) for s in samples]
    out = []
    for frame in range(t):
        grid = Image.new("RGB", (pad + columns * (w + pad), pad + rows * (h + pad)), (32, 32, 32))
        for i, images in enumerate(videos):
            grid.paste(images[frame], (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
        out.append(grid)
    return out


def preview(path: str | Path, split: str = "train", count: int = 8, frames: int = 6, *, start: int = 0,
            base_seed: int = 0, num_frames: int = 17, height: int = 128, width: int = 128,
            styles: Sequence[str] = ("none",), overwrite: bool = False) -> list[Sample]:
    """Write a contact sheet PNG of items ``start .. start + count - 1`` of ``split`` (atomically); returns them."""
    from ..utils.video import atomic_path

    dataset = ShapesWorldDataset(split, count, start=start, base_seed=base_seed, num_frames=num_frames,
                                 height=height, width=width, styles=styles)
    samples = [dataset[i] for i in range(count)]
    with atomic_path(path, overwrite) as tmp:
        preview_sheet(samples, frames).save(tmp, format="PNG")
    return samples
