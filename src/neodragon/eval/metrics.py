"""VBench-nano metrics: the quality and semantic dimensions of VBench, measured with the nano judge.

Videos here are ``[B, T, 3, H, W]`` in [0, 1] (the pipeline's ``output_type="pt"``). Every per-video metric is a
tensor function tested on known inputs; ``evaluate`` runs a generator over a prompt set and scores it against real
ShapesWorld renderings of the same prompts.

Quality: subject / background consistency (cosine similarity of the judge's per-frame object / scene embeddings to
the first and the previous frame, as VBench does with DINO / CLIP features), temporal flickering (1 - mean absolute
difference of consecutive frames), motion smoothness (1 - mean absolute error of each box-blurred odd frame
predicted as the mean of its blurred neighbours, a model-free stand-in for VBench's AMT interpolation), dynamic
degree (fraction of videos whose frames differ from the first one on more than ``DYNAMIC_THRESHOLD`` of a 32x32
thumbnail), imaging quality (RMS edge energy relative to the real video of the same prompt: min/max ratio, so blur
and noise both lose) and FVD-nano (Frechet distance between judge video features of generated and real videos).

Semantic: the judge's accuracy on generated videos against the prompt's labels (object class = shape, colour,
motion, multiple objects = count, spatial relationship, scene = background, appearance style).

Scoring as VBench: min-max normalise each dimension with ``NORMALISATION`` (VBench's bounds where VBench has the
dimension, 0-1 for accuracies and ratios; FVD-nano maps the judge's noise-video FVD to 0 and 0 to 1), clip to
[0, 1], weighted means (dynamic degree weighs 0.5) give Quality and Semantic, and Total = (4 Quality + Semantic) / 5.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .judge import OBJECT_ATTRIBUTES, Judge
from .prompts import PromptEntry

QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "dynamic_degree", "imaging_quality", "fvd_nano")
# semantic dimension -> the scene attribute the judge checks
SEMANTIC = {"object_class": "shape", "colour": "colour", "motion": "motion", "multiple_objects": "count",
            "spatial_relationship": "relation", "scene": "background", "appearance_style": "style"}
WEIGHTS = {"dynamic_degree": 0.5}
NORMALISATION = {"subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
                 "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975)}
DYNAMIC_CHANGE = 0.1  # a thumbnail pixel has changed when a channel moved by more than this (of 1)
DYNAMIC_THRESHOLD = 0.005  # a video is dynamic when more than this fraction of its thumbnail changed
INVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}


# --------------------------------------------------------------------------------------------------------------
# Quality: per-video metrics


def consistency(features: torch.Tensor) -> torch.Tensor:
    """Per video, the mean over frames t >= 1 of (cos(f_0, f_t) + cos(f_t-1, f_t)) / 2, negatives clipped to 0;
    ``features`` is [B, T, D]."""
    f = F.normalize(features.double(), dim=-1)
    first = (f[:, 1:] * f[:, :1]).sum(-1).clamp(min=0)
    previous = (f[:, 1:] * f[:, :-1]).sum(-1).clamp(min=0)
    return ((first + previous) / 2).mean(1)


def temporal_flickering(frames: torch.Tensor) -> torch.Tensor:
    """1 - mean absolute difference of consecutive frames, per video (1: no change at all)."""
    return 1 - frames.diff(dim=1).abs().flatten(1).mean(1)


def motion_smoothness(frames: torch.Tensor) -> torch.Tensor:
    """1 - mean absolute error of the odd frames predicted as the mean of their neighbours, per video.

    The frames are box-blurred first: on sharp edges the midpoint error only measures how far things moved
    (a steady drift and a jump of the same total length score the same), while on blurred edges a steady
    drift is interpolated almost exactly and a jump is not.
    """
    b, t, c, h, w = frames.shape
    kernel = 2 * (w // 16) + 1
    blurred = F.avg_pool2d(frames.flatten(0, 1).float(), kernel, 1, kernel // 2, count_include_pad=False)
    blurred = blurred.view(b, t, c, h, w)
    predicted = (blurred[:, :-2:2] + blurred[:, 2::2]) / 2
    return 1 - (blurred[:, 1:-1:2] - predicted).abs().flatten(1).mean(1)


def motion_magnitude(frames: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Per video, the largest fraction of a ``size``-square thumbnail that differs from the first frame's."""
    b, t = frames.shape[:2]
    thumbs = F.interpolate(frames.flatten(0, 1).float(), size=(size, size), mode="area").view(b, t, 3, size, size)
    changed = (thumbs - thumbs[:, :1]).abs().amax(2) > DYNAMIC_CHANGE
    return changed.float().mean((2, 3)).amax(1)


def edge_energy(frames: torch.Tensor) -> torch.Tensor:
    """Root-mean-square horizontal + vertical gradient of the luminance, per video.

    Squared, not absolute: blurring a step edge keeps the sum of absolute differences (the total variation)
    and only spreads it, so an L1 energy would not see blur.
    """
    luma = (frames * frames.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(2)
    return sum(luma.diff(dim=dim).square().flatten(1).mean(1).sqrt() for dim in (-1, -2))


def imaging_quality(energy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """min/max ratio of edge energies: 1 when a video is as sharp as its real counterpart."""
    return torch.minimum(energy, reference) / torch.maximum(energy, reference).clamp(min=1e-12)


# --------------------------------------------------------------------------------------------------------------
# FVD-nano


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix, from its eigendecomposition (float64); tiny
    negative eigenvalues from rounding are clipped to 0."""
    m = matrix.double()
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets [N, D] and [M, D].

    tr sqrt(S_x S_y) is computed as tr sqrt(S_x^1/2 S_y S_x^1/2), a symmetric PSD matrix, so it stays real and
    stable when the covariances are singular (fewer videos than feature dimensions).
    """
    x, y = x.double(), y.double()
    cov_x, cov_y = (torch.atleast_2d(torch.cov(v.T)) if len(v) > 1 else v.new_zeros(v.shape[1], v.shape[1])
                    for v in (x, y))
    root = sqrtm_psd(cov_x)
    middle = root @ cov_y @ root
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (x.mean(0) - y.mean(0)).square().sum() + cov_x.trace() + cov_y.trace() - 2 * cross
    return max(distance.item(), 0.0)


# --------------------------------------------------------------------------------------------------------------
# Semantic


def match_objects(expected: Sequence[dict], predicted: Sequence[dict]) -> tuple[int | None, ...]:
    """For each expected object, the predicted object it is judged against (None: no object left for it): the
    one-to-one assignment that agrees on the most attributes, caption order first on ties."""
    slots = list(range(len(predicted))) + [None] * len(expected)
    best, best_score = None, -1
    for assignment in itertools.permutations(slots, len(expected)):
        score = sum(expected[i][a] == predicted[p][a] for i, p in enumerate(assignment) if p is not None
                    for a in OBJECT_ATTRIBUTES)
        if score > best_score:
            best, best_score = assignment, score
    return best


def semantic_scores(predicted: dict, expected: dict) -> dict[str, float | None]:
    """Per-attribute correctness of one video's judged scene (``judge.decode`` form) against the prompt's scene.

    Object attributes are the fraction of the prompt's objects whose matched object has the right value (an
    object with no match is wrong); ``relation`` (None for one-object prompts) holds when the matched objects
    stand in the prompt's relation; ``combination``: object 0 has its shape, colour and motion all right.
    """
    assignment = match_objects(expected["objects"], predicted["objects"])
    scores: dict[str, float | None] = {}
    for a in OBJECT_ATTRIBUTES:
        hits = [p is not None and predicted["objects"][p][a] == obj[a]
                for obj, p in zip(expected["objects"], assignment, strict=True)]
        scores[a] = sum(hits) / len(hits)
    scores["count"] = float(len(predicted["objects"]) == len(expected["objects"]))
    scores["relation"] = None
    if len(expected["objects"]) == 2:
        relation = None
        if assignment == (0, 1):
            relation = predicted["relation"]
        elif assignment == (1, 0):
            relation = INVERSE_RELATION[predicted["relation"]]
        scores["relation"] = float(relation == expected["relation"])
    scores["background"] = float(predicted["background"] == expected["background"])
    scores["style"] = float(predicted["style"] == expected["style"])
    first = assignment[0]
    scores["combination"] = float(first is not None and all(
        predicted["objects"][first][a] == expected["objects"][0][a] for a in ("shape", "colour", "motion")))
    return scores


def accuracy_table(predicted: Sequence[dict], expected: Sequence[dict]) -> dict[str, float]:
    """Mean of each ``semantic_scores`` entry over videos (None entries left out): the judge's accuracy."""
    rows = [semantic_scores(p, e) for p, e in zip(predicted, expected, strict=True)]
    table = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            table[key] = sum(values) / len(values)
    return table


# --------------------------------------------------------------------------------------------------------------
# Scoring


def bounds(fvd_noise: float) -> dict[str, tuple[float, float]]:
    """(min, max) of every dimension; FVD-nano's min is the FVD of noise videos and its max 0 (lower is better)."""
    table = {d: NORMALISATION.get(d, (0.0, 1.0)) for d in (*QUALITY, *SEMANTIC)}
    table["fvd_nano"] = (fvd_noise, 0.0)
    return table


def normalise(value: float, low: float, high: float) -> float:
    """(value - min) / (max - min), clipped to [0, 1]."""
    return min(max((value - low) / (high - low), 0.0), 1.0)


def vbench_total(scores: dict[str, float | None], limits: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Normalised dimensions, Quality and Semantic (weighted means of the dimensions that have a value) and
    Total = (4 Quality + Semantic) / 5."""
    result = {}
    for group, dims in (("quality", QUALITY), ("semantic", tuple(SEMANTIC))):
        present = [d for d in dims if scores.get(d) is not None]
        weights = [WEIGHTS.get(d, 1.0) for d in present]
        values = [normalise(scores[d], *limits[d]) for d in present]
        result.update({f"{d}_normalised": v for d, v in zip(present, values, strict=True)})
        result[group] = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights) if present else math.nan
    result["total"] = (4 * result["quality"] + result["semantic"]) / 5
    return result


# --------------------------------------------------------------------------------------------------------------
# Evaluation


def _to_judge(frames: torch.Tensor) -> torch.Tensor:
    """[B, T, 3, H, W] in [0, 1] -> the judge's [B, 3, T, H, W] in [-1, 1]."""
    return frames.transpose(1, 2) * 2 - 1


@torch.no_grad()
def _video_metrics(frames: torch.Tensor, judge: Judge) -> dict[str, torch.Tensor]:
    objects, scenes = judge.frame_features(_to_judge(frames))
    return {"subject_consistency": consistency(objects), "background_consistency": consistency(scenes),
            "temporal_flickering": temporal_flickering(frames), "motion_smoothness": motion_smoothness(frames),
            "motion_magnitude": motion_magnitude(frames), "edge_energy": edge_energy(frames)}


def _dimension_scores(frames: torch.Tensor, reference: torch.Tensor, judge: Judge, entries: Sequence[PromptEntry],
                      reference_features: torch.Tensor) -> tuple[dict, list[dict], list[dict]]:
    """Raw dimension values of ``frames`` against real ``reference`` videos of the same prompts."""
    per_video = _video_metrics(frames, judge)
    scenes, features = judge.predict(_to_judge(frames))
    rows = [semantic_scores(p, e.scene) for p, e in zip(scenes, entries, strict=True)]
    scores: dict[str, float | None] = {d: per_video[d].mean().item() for d in (
        "subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness")}
    scores["dynamic_degree"] = (per_video["motion_magnitude"] > DYNAMIC_THRESHOLD).float().mean().item()
    scores["imaging_quality"] = imaging_quality(per_video["edge_energy"], edge_energy(reference)).mean().item()
    scores["fvd_nano"] = frechet_distance(features, reference_features)
    for dim, key in SEMANTIC.items():
        values = [r[key] for r, e in zip(rows, entries, strict=True) if dim in e.dimensions and r[key] is not None]
        scores[dim] = sum(values) / len(values) if values else None
    scores["size"] = sum(r["size"] for r in rows) / len(rows)
    held = [r["combination"] for r, e in zip(rows, entries, strict=True) if e.heldout]
    scores["heldout_combination"] = sum(held) / len(held) if held else None
    return scores, scenes, rows


def real_frames(entries: Sequence[PromptEntry], num_frames: int, height: int, width: int,
                shift: int = 0) -> torch.Tensor:
    """Real renderings [B, T, 3, H, W] in [0, 1] of the prompts (``shift`` > 0: other positions, same scenes)."""
    return torch.stack([(e.render(num_frames, height, width, shift).transpose(0, 1) + 1) / 2 for e in entries])


def evaluate(generate: Callable[[str, int], torch.Tensor], entries: Sequence[PromptEntry], judge: Judge,
             progress: bool = True) -> dict:
    """Generate one video per prompt (``generate(caption, seed)`` -> [T, 3, H, W] in [0, 1]) and score it.

    Real videos of the same prompts are rendered twice (at the prompt's seed, the FVD / imaging reference, and at
    another seed, scored like a generator as the "real" row: the ceiling of every dimension under this judge).
    """
    if not (judge.config.calibration or {}).get("fvd_noise"):
        raise ValueError("this judge has no calibration (FVD-nano bound): use one made by `train-judge`")
    generated = torch.stack([generate(e.caption, e.seed).float().cpu().clamp(0, 1)
                             for e in tqdm(entries, desc="generate", disable=not progress)])
    num_frames, _, height, width = generated.shape[1:]
    reference = real_frames(entries, num_frames, height, width)
    real = real_frames(entries, num_frames, height, width, shift=1)
    _, reference_features = judge.predict(_to_judge(reference))
    limits = bounds(judge.config.calibration["fvd_noise"])
    results: dict = {"bounds": {d: list(b) for d, b in limits.items()},
                     "weights": {d: WEIGHTS.get(d, 1.0) for d in (*QUALITY, *SEMANTIC)},
                     "geometry": {"num_frames": num_frames, "height": height, "width": width}}
    per_prompt = []
    for name, frames in (("generated", generated), ("real", real)):
        scores, scenes, rows = _dimension_scores(frames, reference, judge, entries, reference_features)
        results[name] = {"dimensions": scores, **vbench_total(scores, limits)}
        per_prompt.append((scenes, rows))
    results["by_object_count"] = {name: by_object_count(rows, entries)
                                  for name, (_, rows) in zip(("generated", "real"), per_prompt, strict=True)}
    results["by_value"] = accuracy_by_value(per_prompt[0][0], entries)
    results["judge_accuracy_real"] = {
        "prompt_set": accuracy_table(per_prompt[1][0], [e.scene for e in entries]),
        **{k: v for k, v in judge.config.calibration.items() if k.startswith("accuracy_")}}
    results["per_prompt"] = [
        {"id": e.id, "caption": e.caption, "seed": e.seed, "expected": e.scene, "predicted": scene, "correct": row,
         "judge_on_real": real_scene}
        for e, scene, row, real_scene in zip(entries, *per_prompt[0], per_prompt[1][0], strict=True)]
    return results


def by_object_count(rows: Sequence[dict], entries: Sequence[PromptEntry]) -> dict[str, dict]:
    """Object-attribute accuracies (``semantic_scores`` rows) over the object prompts, split by how many objects
    the prompt has: a two-object scene can fail where one object succeeds (one object's colour on both).

    ``if_count_right`` repeats the attributes over the videos judged to show the prompted number of objects
    (None where there are none): an object split into several gives the matching several guesses at its shape
    or colour, which this reading leaves out."""
    groups: dict[str, list[dict]] = {}
    for row, entry in zip(rows, entries, strict=True):
        if "object_class" in entry.dimensions:
            groups.setdefault(str(len(entry.scene["objects"])), []).append(row)

    def means(group: list[dict]) -> dict[str, float | None]:
        return {a: sum(r[a] for r in group) / len(group) if group else None for a in OBJECT_ATTRIBUTES}

    return {n: {"prompts": len(group), **means(group), "count": sum(r["count"] for r in group) / len(group),
                "if_count_right": {"prompts": sum(r["count"] == 1.0 for r in group),
                                   **means([r for r in group if r["count"] == 1.0])}}
            for n, group in sorted(groups.items())}


def accuracy_by_value(predicted: Sequence[dict], entries: Sequence[PromptEntry]) -> dict[str, dict[str, list[int]]]:
    """[right, total] per attribute and prompted value over the object prompts' objects (matched as in
    ``semantic_scores``): which shapes, colours or motions fail, e.g. still objects read as moving."""
    table: dict[str, dict[str, list[int]]] = {a: {} for a in OBJECT_ATTRIBUTES}
    for scene, entry in zip(predicted, entries, strict=True):
        if "object_class" not in entry.dimensions:
            continue
        expected = entry.scene["objects"]
        for obj, p in zip(expected, match_objects(expected, scene["objects"]), strict=True):
            for a in OBJECT_ATTRIBUTES:
                count = table[a].setdefault(obj[a], [0, 0])
                count[0] += p is not None and scene["objects"][p][a] == obj[a]
                count[1] += 1
    return {a: dict(sorted(values.items())) for a, values in table.items()}


def markdown_table(results: dict) -> str:
    """The dimensions, Quality / Semantic / Total and the judge's accuracy on real videos, as markdown."""
    lines = ["| dimension | group | generated | normalised | real videos | normalised | bounds (min, max) |",
             "|---|---|---:|---:|---:|---:|---|"]
    for dim in (*QUALITY, *SEMANTIC):
        row = [dim, "quality" if dim in QUALITY else "semantic"]
        for name in ("generated", "real"):
            value = results[name]["dimensions"][dim]
            row += ["-", "-"] if value is None else [f"{value:.4f}", f"{results[name][f'{dim}_normalised']:.4f}"]
        low, high = results["bounds"][dim]
        lines.append("| " + " | ".join([*row, f"{low:.4g}, {high:.4g}"]) + " |")
    for name in ("quality", "semantic", "total"):
        lines.append(f"| **{name}** | | | **{results['generated'][name]:.4f}** | | **{results['real'][name]:.4f}** | |")
    for extra in ("size", "heldout_combination"):
        generated, real = (results[n]["dimensions"][extra] for n in ("generated", "real"))
        if generated is not None:
            lines.append(f"| {extra} (not in the total) | semantic | {generated:.4f} | | {real:.4f} | | |")
    columns = (*OBJECT_ATTRIBUTES, "count")
    lines += ["", "Object attributes by the number of objects in the prompt (generated videos; real in brackets):", "",
              "| objects | prompts | " + " | ".join(columns) + " |", "|---:|---:|" + "---:|" * len(columns)]
    real = results["by_object_count"]["real"]
    for n, table in results["by_object_count"]["generated"].items():
        cells = [f"{table[a]:.4f} ({real[n][a]:.4f})" for a in columns]
        lines.append(f"| {n} | {table['prompts']} | " + " | ".join(cells) + " |")
    lines += ["", "The same on the videos judged to show the prompted number of objects (a split object cannot add "
              "guesses):", "", "| objects | prompts | " + " | ".join(OBJECT_ATTRIBUTES) + " |",
              "|---:|---:|" + "---:|" * len(OBJECT_ATTRIBUTES)]
    for n, table in results["by_object_count"]["generated"].items():
        right = table["if_count_right"]
        cells = ["-" if right[a] is None else f"{right[a]:.4f}" for a in OBJECT_ATTRIBUTES]
        lines.append(f"| {n} | {right['prompts']} | " + " | ".join(cells) + " |")
    lines += ["", "Generated objects judged right, per prompted value (right / objects):", ""]
    lines += [f"- {a}: " + ", ".join(f"{v} {r}/{n}" for v, (r, n) in values.items())
              for a, values in results["by_value"].items()]
    accuracy = results["judge_accuracy_real"]
    keys = list(accuracy["prompt_set"])
    lines += ["", "Judge accuracy on real held-out videos (the bound on what the semantic dimensions can say):", "",
              "| real videos | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for source, table in accuracy.items():
        lines.append(f"| {source} | " + " | ".join(f"{table[k]:.4f}" if k in table else "-" for k in keys) + " |")
    return "\n".join(lines) + "\n"
