"""VBench-nano (DESIGN §4): a judge trained only on real ShapesWorld videos, VBench-style metrics, fixed prompt sets.

- :mod:`.judge`: ``Judge`` (the video classifier and feature extractor), ``load_judge``, ``train_judge``.
- :mod:`.metrics`: the quality and semantic dimensions, FVD-nano, normalisation and Total, ``evaluate``.
- :mod:`.prompts`: the ``nano-eval`` and ``nano-heldout`` prompt sets (stored as JSON in ``prompt_sets/``).
- :mod:`.cli`: ``neodragon eval run`` and ``neodragon eval train-judge``.
"""

from importlib import import_module

# Loaded on first use: the judge imports diffusers, which takes seconds, and the CLI imports this package.
_LAZY = {
    **dict.fromkeys(("Judge", "decode", "export_judge", "load_judge", "real_predictions", "real_videos",
                     "scene_dict", "slot_targets", "train_judge"), "neodragon.eval.judge"),
    **dict.fromkeys(("NORMALISATION", "QUALITY", "SEMANTIC", "WEIGHTS", "accuracy_table", "bounds", "consistency",
                     "edge_energy", "evaluate", "frechet_distance", "imaging_quality", "markdown_table",
                     "motion_magnitude", "motion_smoothness", "normalise", "semantic_scores", "sqrtm_psd",
                     "temporal_flickering", "vbench_total"), "neodragon.eval.metrics"),
    **dict.fromkeys(("PROMPT_SETS", "PromptEntry", "build_prompt_set", "load_prompt_set", "save_prompt_set"),
                    "neodragon.eval.prompts"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neodragon.eval' has no attribute {name!r}")
