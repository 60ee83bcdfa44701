"""Fixed VBench-nano prompt sets: captions, labels and seeds drawn deterministically from ShapesWorld's eval and
heldout splits, stored as JSON in ``prompt_sets/`` so that a set stays fixed.

- ``nano-eval`` (eval split, never trained on): one-object prompts until every shape, colour, motion, size and
  background appears at least 4 times; two-object prompts until every relation appears 6 times; 4 prompts per
  style, for appearance style only.
- ``nano-heldout`` (heldout split): prompts until each held-out colour x shape and shape x motion pair is object
  0 of 3 prompts.

Each entry is exactly item ``index`` of its split (``sample(split, index, styles=(style,))``): its caption, its
labels, and ``render_seed``, which renders the real video of the prompt. ``seed`` seeds the generator.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..data import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_MOTION,
    MOTIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    STYLES,
    ObjectSpec,
    SceneSpec,
    make_caption,
    render,
    sample_spec,
)

PROMPT_SETS = ("nano-eval", "nano-heldout")
OBJECT_DIMENSIONS = ("object_class", "colour", "motion", "multiple_objects", "scene")
SINGLE_QUOTA, RELATION_QUOTA, STYLE_QUOTA, HELDOUT_QUOTA = 4, 6, 4, 3


@dataclass(frozen=True)
class PromptEntry:
    """One prompt: item ``index`` of ``split``; ``scene`` holds its labels by name (objects in caption order)."""

    id: str
    caption: str
    seed: int
    split: str
    index: int
    render_seed: int
    scene: dict
    heldout: bool
    dimensions: tuple[str, ...]

    @property
    def spec(self) -> SceneSpec:
        return SceneSpec(tuple(ObjectSpec(**o) for o in self.scene["objects"]), self.scene["background"],
                         self.scene["relation"], self.scene["style"])

    def render(self, num_frames: int = 17, height: int = 128, width: int = 128, shift: int = 0) -> torch.Tensor:
        """The real video [3, T, H, W] in [-1, 1]; ``shift`` > 0 lays the same scene out at another seed."""
        return render(self.spec, (self.render_seed + shift) % 2**63, num_frames=num_frames, height=height,
                      width=width).video


def _scene(spec: SceneSpec) -> dict:
    return {"objects": [dataclasses.asdict(o) for o in spec.objects], "relation": spec.relation,
            "background": spec.background, "style": spec.style}


def _items(split: str, base_seed: int = 0) -> Iterator[tuple[int, SceneSpec, int]]:
    """(index, spec with style "none", render seed) of the items of a split, as ``sample`` draws them."""
    index = 0
    while True:
        rng = np.random.default_rng([base_seed, SPLITS.index(split), index])
        spec = sample_spec(rng, split)
        yield index, spec, int(rng.integers(2**63))
        index += 1


def _entry(split: str, index: int, spec: SceneSpec, render_seed: int, dimensions: tuple[str, ...]) -> PromptEntry:
    return PromptEntry(id=f"{split}-{index:05d}" + (f"-{spec.style}" if spec.style != "none" else ""),
                       caption=make_caption(spec, render_seed), seed=index, split=split, index=index,
                       render_seed=render_seed, scene=_scene(spec), heldout=spec.heldout, dimensions=dimensions)


def _object_dimensions(spec: SceneSpec) -> tuple[str, ...]:
    return OBJECT_DIMENSIONS + (("spatial_relationship",) if len(spec.objects) == 2 else ())


def build_prompt_set(name: str) -> list[PromptEntry]:
    """The prompt set ``name``, drawn from ShapesWorld (``load_prompt_set`` reads the stored copy)."""
    if name == "nano-eval":
        return _build_eval()
    if name == "nano-heldout":
        return _build_heldout()
    raise ValueError(f"unknown prompt set {name!r}; expected one of {PROMPT_SETS}")


def _build_eval() -> list[PromptEntry]:
    singles, pairs, styled = [], [], []
    seen, relations = Counter(), Counter()
    spaces = {"shape": SHAPES, "colour": COLOURS, "motion": MOTIONS, "size": SIZES}
    styles = STYLES[1:]
    for index, spec, seed in _items("eval"):
        if len(spec.objects) == 1:
            values = tuple((a, getattr(spec.objects[0], a)) for a in spaces) + (("background", spec.background),)
            if any(seen[v] < SINGLE_QUOTA for v in values):
                seen.update(values)
                singles.append(_entry("eval", index, spec, seed, _object_dimensions(spec)))
            elif len(styled) < STYLE_QUOTA * len(styles):
                style = styles[len(styled) % len(styles)]
                styled.append(_entry("eval", index, dataclasses.replace(spec, style=style), seed,
                                     ("appearance_style",)))
        elif relations[spec.relation] < RELATION_QUOTA:
            relations[spec.relation] += 1
            pairs.append(_entry("eval", index, spec, seed, _object_dimensions(spec)))
        wanted = [(a, v) for a, space in spaces.items() for v in space] + [("background", b) for b in BACKGROUNDS]
        if (all(seen[v] >= SINGLE_QUOTA for v in wanted) and len(styled) == STYLE_QUOTA * len(styles)
                and all(relations[r] >= RELATION_QUOTA for r in RELATIONS[1:])):
            return singles + pairs + styled
    raise AssertionError("unreachable: the eval split is endless")


def _build_heldout() -> list[PromptEntry]:
    entries, pairs = [], Counter()
    targets = HELDOUT_COLOUR_SHAPE + HELDOUT_SHAPE_MOTION
    for index, spec, seed in _items("heldout"):
        obj = spec.objects[0]
        hits = [p for p in ((obj.colour, obj.shape), (obj.shape, obj.motion)) if p in targets]
        if any(pairs[p] < HELDOUT_QUOTA for p in hits):
            pairs.update(hits)
            entries.append(_entry("heldout", index, spec, seed, _object_dimensions(spec)))
        if all(pairs[p] >= HELDOUT_QUOTA for p in targets):
            return entries
    raise AssertionError("unreachable: the heldout split is endless")


def prompt_set_path(name: str) -> Path:
    return Path(str(resources.files("neodragon"))) / "eval" / "prompt_sets" / f"{name}.json"


def save_prompt_set(entries: list[PromptEntry], path: str | Path, name: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, "entries": [dataclasses.asdict(e) for e in entries]}, indent=1) + "\n")
    return path


def load_prompt_set(name_or_path: str | Path) -> list[PromptEntry]:
    """A stored prompt set: a name from PROMPT_SETS or a JSON file in the same format."""
    path = prompt_set_path(str(name_or_path)) if str(name_or_path) in PROMPT_SETS else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt set {name_or_path!r}: use one of {PROMPT_SETS} or a JSON file")
    return [PromptEntry(**{**e, "dimensions": tuple(e["dimensions"])}) for e in json.loads(path.read_text())["entries"]]
