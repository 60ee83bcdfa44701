"""ShapesWorld captions: natural templates with synonyms over a closed vocabulary, deterministic per seed.

Every caption is written from the tables below, so ``caption_vocabulary()`` (the words of every table and
template) is complete: a word-level tokenizer built from it never meets an unknown word.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .shapes_world import ObjectSpec, SceneSpec

# The word-level text encoders of the nano preset read 32 tokens, two of which are special tokens.
MAX_CAPTION_TOKENS = 30

# The first option of every table is the canonical one: plain, and short enough that the canonical caption of any
# scene (at most 22 tokens) fits MAX_CAPTION_TOKENS.
SHAPE_WORDS = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "donut"),
    "heart": ("heart",),
}
COLOUR_WORDS = {
    "red": ("red",), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
    "cyan": ("cyan", "turquoise"), "blue": ("blue",), "purple": ("purple", "violet"), "pink": ("pink",),
    "white": ("white",),
}
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big", "huge")}
BACKGROUND_WORDS = {
    "black": ("black",), "white": ("white",), "gray": ("gray", "grey"), "gradient": ("gradient", "shaded"),
    "checkered": ("checkered", "checkerboard"),
}
MOTION_WORDS = {  # (participles: "a circle moving left", finite verbs: "a circle moves left")
    "still": (("staying still", "standing still", "resting", "remaining still"),
              ("stays still", "stands still", "rests", "remains still")),
    "left": (("moving left", "moving to the left", "sliding to the left", "drifting left", "going left"),
             ("moves left", "moves to the left", "slides to the left", "drifts left", "goes left")),
    "right": (("moving right", "moving to the right", "sliding to the right", "drifting right", "going right"),
              ("moves right", "moves to the right", "slides to the right", "drifts right", "goes right")),
    "up": (("moving up", "moving upward", "rising", "drifting up", "going up"),
           ("moves up", "moves upward", "rises", "drifts up", "goes up")),
    "down": (("moving down", "moving downward", "falling", "sinking", "going down"),
             ("moves down", "moves downward", "falls", "sinks", "goes down")),
    "growing": (("growing", "growing bigger", "getting bigger", "expanding"),
                ("grows", "grows bigger", "gets bigger", "expands")),
    "shrinking": (("shrinking", "getting smaller", "contracting"), ("shrinks", "gets smaller", "contracts")),
    "spinning": (("spinning", "rotating", "spinning around", "turning"), ("spins", "rotates", "spins around", "turns")),
    "bouncing": (("bouncing", "bouncing up and down", "hopping"), ("bounces", "bounces up and down", "hops")),
}
RELATION_WORDS = {
    "left_of": ("left of", "to the left of", "on the left of"),
    "right_of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}
STYLE_WORDS = {
    "neon": ("in neon style", "in a neon glow style", "with a neon glow", "glowing like neon"),
    "stripes": ("in stripes style", "in a striped style", "with stripes", "covered in stripes"),
    "pixel": ("in pixel art style", "as pixel art", "in a pixel mosaic style", "in mosaic style"),
    "outline": ("in outline style", "drawn as an outline", "as an outline only", "in an outline style"),
}
WHERE = ("on a {bg} background", "against a {bg} background", "in front of a {bg} background", "on a {bg} backdrop")
ONE_OBJECT = ("{np} {moving}{where}", "{np} {moves}{where}", "{np} is {moving}{where}",
              "there is {np} {moving}{where}", "{np}{where}, {moving}")
TWO_OBJECTS = (
    "{np0} {moving0} {rel} {np1} {moving1}{where}",
    "{np0} is {rel} {np1}{where}, the {ref0} {moves0} and the {ref1} {moves1}",
    "{np0} is {rel} {np1}{where}. the {ref0} is {moving0} and the {ref1} is {moving1}",
    "there is {np0} {rel} {np1}{where}, the {ref0} {moves0} while the {ref1} {moves1}",
)
STYLED = ("{caption} {style}", "{caption}, {style}", "{style}, {caption}")
# Partial (training) captions leave out an object's size or the background this often.
OMIT_PROBABILITY = 0.25


def tokenize(caption: str) -> list[str]:
    """Lower-cased words with punctuation split off, as the word-level tokenizers of ``neodragon.models.text``."""
    return re.findall(r"\w+|[^\w\s]", caption.lower())


def caption_vocabulary() -> list[str]:
    """Every word (and punctuation mark) any caption can contain, sorted."""
    phrases = [*WHERE, *ONE_OBJECT, *TWO_OBJECTS, *STYLED, "a", "an"]
    for table in (SHAPE_WORDS, COLOUR_WORDS, SIZE_WORDS, BACKGROUND_WORDS, RELATION_WORDS, STYLE_WORDS):
        phrases += [p for options in table.values() for p in options]
    phrases += [p for forms in MOTION_WORDS.values() for options in forms for p in options]
    return sorted({word for phrase in phrases for word in tokenize(re.sub(r"\{\w+\}", " ", phrase))})


def make_caption(spec: SceneSpec, seed: int, complete: bool = True) -> str:
    """A caption of ``spec``: mentions shape, colour, motion, relation and style, and, when ``complete``, every
    object's size and the background (partial captions leave each out with ``OMIT_PROBABILITY``)."""
    rng = np.random.default_rng([seed, 1])
    for _ in range(8):
        caption = _write(spec, rng, complete)
        if len(tokenize(caption)) <= MAX_CAPTION_TOKENS:
            return caption
    return _write(spec, None, complete=True)  # canonical phrasing, always short enough


def _write(spec: SceneSpec, rng: np.random.Generator | None, complete: bool) -> str:
    """Fill a random template with random synonyms (``rng``) or, without ``rng``, the first template with the
    canonical words."""

    def pick(options: Sequence[str]) -> str:
        return options[0] if rng is None else options[int(rng.integers(len(options)))]

    def keep() -> bool:
        return complete or rng is None or rng.random() >= OMIT_PROBABILITY

    fields: dict[str, str] = {}
    for i, obj in enumerate(spec.objects):
        fields[f"np{i}"], fields[f"ref{i}"] = _noun_phrase(obj, pick, keep())
        fields[f"moving{i}"], fields[f"moves{i}"] = (pick(forms) for forms in MOTION_WORDS[obj.motion])
    fields["where"] = " " + pick(WHERE).format(bg=pick(BACKGROUND_WORDS[spec.background])) if keep() else ""
    if len(spec.objects) == 1:
        template = pick(ONE_OBJECT)
        fields.update(np=fields["np0"], moving=fields["moving0"], moves=fields["moves0"])
    else:
        template = pick(TWO_OBJECTS)
        fields["rel"] = pick(RELATION_WORDS[spec.relation])
    caption = template.format(**fields)
    if spec.style != "none":
        caption = pick(STYLED).format(caption=caption, style=pick(STYLE_WORDS[spec.style]))
    return caption


def _noun_phrase(obj: ObjectSpec, pick: Callable[[Sequence[str]], str], with_size: bool) -> tuple[str, str]:
    """("a small red circle", "red circle"): the phrase that introduces an object and the one that refers back."""
    ref = f"{pick(COLOUR_WORDS[obj.colour])} {pick(SHAPE_WORDS[obj.shape])}"
    phrase = f"{pick(SIZE_WORDS[obj.size])} {ref}" if with_size else ref
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}", ref
