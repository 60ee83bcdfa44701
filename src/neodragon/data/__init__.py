"""ShapesWorld, the procedural captioned-video world of the nano preset (DESIGN §3)."""

from .captions import MAX_CAPTION_TOKENS, caption_vocabulary, make_caption, tokenize
from .shapes_world import (
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
    Labels,
    ObjectLabels,
    ObjectSpec,
    Sample,
    SceneSpec,
    ShapesWorld,
    ShapesWorldDataset,
    animation,
    collate,
    preview,
    preview_sheet,
    render,
    sample,
    sample_spec,
    to_images,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "HELDOUT_COLOUR_SHAPE", "HELDOUT_SHAPE_MOTION", "MAX_CAPTION_TOKENS", "MOTIONS",
    "RELATIONS", "SHAPES", "SIZES", "SPLITS", "STYLES", "Labels", "ObjectLabels", "ObjectSpec", "Sample", "SceneSpec",
    "ShapesWorld", "ShapesWorldDataset", "animation", "caption_vocabulary", "collate", "make_caption", "preview",
    "preview_sheet", "render", "sample", "sample_spec", "to_images",
    "tokenize",
]
