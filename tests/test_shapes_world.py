import itertools
import re

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from neodragon.cli.data import app
from neodragon.data import (
    BACKGROUNDS,
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_MOTION,
    MAX_CAPTION_TOKENS,
    MOTIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    STYLES,
    ObjectSpec,
    SceneSpec,
    ShapesWorld,
    ShapesWorldDataset,
    caption_vocabulary,
    captions,
    collate,
    make_caption,
    preview,
    render,
    sample,
    sample_spec,
    shapes_world,
    tokenize,
)

SMALL = dict(num_frames=9, height=64, width=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors here are small: intra-op threads only add overhead (a lot of it on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one(shape="square", colour="red", size="large", motion="still", background="black", style="none"):
    return SceneSpec((ObjectSpec(shape, colour, size, motion),), background, style=style)


def colour_mask(video: torch.Tensor, colour: str, tolerance: float = 0.1) -> torch.Tensor:
    """[T, H, W]: pixels of exactly the object's colour (anti-aliased edges excluded)."""
    rgb = torch.tensor(shapes_world.RGB[colour]).view(3, 1, 1, 1) * 2 - 1
    return ((video - rgb).abs() < 2 * tolerance).all(dim=0)


def centroids(mask: torch.Tensor) -> torch.Tensor:
    """[T, 2] (x, y) centre of mass in pixels (pixel centres at +0.5)."""
    _, h, w = mask.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    area = mask.sum((1, 2)).clamp(min=1)
    return torch.stack([(mask * xs).sum((1, 2)) / area, (mask * ys).sum((1, 2)) / area], dim=1)


# ---- determinism, shape, range -------------------------------------------------------------------------------


def test_same_spec_and_seed_give_the_same_video_and_caption():
    spec = SceneSpec((ObjectSpec("star", "blue", "small", "spinning"), ObjectSpec("heart", "pink", "small", "growing")),
                     "checkered", "left_of")
    a, b, c = render(spec, 5), render(spec, 5), render(spec, 6)
    assert torch.equal(a.video, b.video) and a.caption == b.caption and a.labels == b.labels
    assert not torch.equal(a.video, c.video)
    assert torch.equal(sample("train", 3).video, sample("train", 3).video)
    assert not torch.equal(sample("train", 3).video, sample("train", 3, base_seed=1).video)
    assert not torch.equal(sample("train", 3).video, sample("eval", 3).video)


@pytest.mark.parametrize("size", [{}, dict(num_frames=1, height=64, width=64),
                                  dict(num_frames=25, height=64, width=96)])
def test_video_is_3_t_h_w_in_minus_one_one(size):
    video = sample("train", 0, **size).video
    t, h, w = size.get("num_frames", 17), size.get("height", 128), size.get("width", 128)
    assert video.shape == (3, t, h, w) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1 and video.max() - video.min() > 0.5


def test_bad_sizes_and_specs_are_refused():
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        render(one(), 0, num_frames=10)
    with pytest.raises(ValueError, match="round shapes"):
        one("circle", motion="spinning")
    with pytest.raises(ValueError, match="invisible"):
        one(colour="white", background="white")
    with pytest.raises(ValueError, match="different colours"):
        SceneSpec((ObjectSpec("star", "red", "small", "up"), ObjectSpec("ring", "red", "small", "up")), "black",
                  "above")
    with pytest.raises(ValueError, match="relation"):
        SceneSpec((ObjectSpec("star", "red", "small", "up"),), "black", "above")
    with pytest.raises(ValueError, match="not one of"):
        one(shape="blob")
    crossing = SceneSpec((ObjectSpec("star", "red", "large", "right"), ObjectSpec("ring", "blue", "large", "left")),
                         "black", "left_of")
    with pytest.raises(ValueError, match="does not fit"):
        render(crossing, 0)


# ---- labels agree with the pixels ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_object_colour_is_at_the_labelled_position(shape):
    for seed, colour in enumerate(("red", "cyan", "white")):
        s = render(one(shape, colour, "small"), seed)
        (obj,) = s.labels.objects
        assert (obj.shape, obj.colour, obj.size, obj.motion) == (SHAPES.index(shape), COLOURS.index(colour), 0, 0)
        mask = colour_mask(s.video, colour)
        radius = shapes_world.RADIUS["small"] * 128
        assert mask[0].sum() > 0.3 * radius**2  # a solid shape, not a few stray pixels
        assert torch.allclose(centroids(mask)[0], torch.tensor(obj.position) * 128, atol=0.25 * radius)
        assert not mask[:, [0, -1], :].any() and not mask[:, :, [0, -1]].any()  # inside the frame


def test_motions_are_visible_and_match_their_label():
    unit = 128
    for i, motion in enumerate(MOTIONS):
        s = render(one("star" if motion == "spinning" else "square", motion=motion), i)
        assert s.labels.objects[0].motion == MOTIONS.index(motion)
        mask = colour_mask(s.video, "red")
        (x, y), area = centroids(mask).T, mask.sum((1, 2)).float()
        assert not mask[:, [0, -1], :].any() and not mask[:, :, [0, -1]].any()
        dx, dy, growth = (x[-1] - x[0]) / unit, (y[-1] - y[0]) / unit, area[-1] / area[0]
        moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}
        if motion in moved:
            horizontal = motion in ("left", "right")
            assert moved[motion] > 0.35 and abs(dy if horizontal else dx) < 0.01
            steps = np.diff((x if horizontal else y).numpy())
            assert (np.sign(steps) == np.sign(steps[0])).all()  # steady, no jumps back
        elif motion == "still":
            assert torch.equal(s.video[:, 0], s.video[:, -1])
        elif motion in ("growing", "shrinking"):
            assert (growth > 2.5) if motion == "growing" else (growth < 0.4)
            assert abs(dx) < 0.01 and abs(dy) < 0.01
            assert (np.diff(area.numpy()) * (1 if motion == "growing" else -1) >= 0).all()
        elif motion == "spinning":
            assert abs(dx) < 0.01 and abs(dy) < 0.01 and abs(growth - 1) < 0.1
            assert (mask[4] != mask[0]).sum() > 0.1 * mask[0].sum()
        elif motion == "bouncing":
            assert abs(dy) < 0.01 and (y[0] - y.min()) / unit > 0.25  # up and back down
            assert (y[0] - y[len(y) // 2]).abs() < 1  # touches down in the middle too


def test_jitter_wobbles_each_frame_but_keeps_the_scene_and_its_labels():
    spec = one("square", motion="still", size="small")
    exact, wobbly = render(spec, 3), render(spec, 3, jitter=0.1)
    assert torch.equal(render(spec, 3, jitter=0.0).video, exact.video)
    assert wobbly.caption == exact.caption and wobbly.labels == exact.labels
    exact_mask, mask = colour_mask(exact.video, "red"), colour_mask(wobbly.video, "red")
    size = mask.sum((1, 2)).float() / exact_mask.sum((1, 2)).float()
    shift = (centroids(mask) - centroids(exact_mask)).abs()
    radius = shapes_world.RADIUS["small"] * 128
    assert size.std() > 0.02 and shift.std() > 0.05  # an independent wobble per frame ...
    assert ((size > 0.9**2 - 0.05) & (size < 1.1**2 + 0.05)).all()  # ... of up to 10% in size
    assert shift.max() <= 0.1 * radius + 0.5  # and 0.1 radii in place
    with pytest.raises(ValueError, match="jitter"):
        render(spec, 3, jitter=1.0)


def test_two_object_relation_holds_in_every_frame():
    rng = np.random.default_rng(0)
    specs = [spec for spec in (sample_spec(rng) for _ in range(80)) if len(spec.objects) == 2][:16]
    assert {spec.relation for spec in specs} == set(RELATIONS[1:])
    for seed, spec in enumerate(specs):
        spec = SceneSpec(spec.objects, "black", spec.relation)  # nothing in the background shares a colour
        s = render(spec, seed)
        masks = [colour_mask(s.video, o.colour, 0.05) for o in spec.objects]
        assert all(m.sum((1, 2)).min() > 0 for m in masks)
        boxes = []
        for m in masks:
            cols, rows = m.any(1), m.any(2)  # [T, W], [T, H]
            idx_w, idx_h = torch.arange(m.shape[2]), torch.arange(m.shape[1])
            boxes.append([torch.where(cols, idx_w, 10**4).amin(1), torch.where(cols, idx_w, -1).amax(1),
                          torch.where(rows, idx_h, 10**4).amin(1), torch.where(rows, idx_h, -1).amax(1)])
        (ax0, ax1, ay0, ay1), (bx0, bx1, by0, by1) = boxes
        apart = {"left_of": ax1 < bx0, "right_of": bx1 < ax0, "above": ay1 < by0, "below": by1 < ay0}
        assert apart[spec.relation].all(), spec  # the pixels are apart along the relation's axis
        dx, dy = (centroids(masks[1]) - centroids(masks[0])).T
        along, across = (dx, dy) if spec.relation in ("left_of", "right_of") else (dy, dx)
        assert (across.abs() < 0.75 * along.abs()).all(), spec  # and the centres well within 45 degrees of it
        assert s.labels.relation == RELATIONS.index(spec.relation) and s.labels.count == 2


# ---- splits ----------------------------------------------------------------------------------------------------


def test_heldout_combinations_never_appear_in_training():
    def pairs(objects):
        return {(o.colour, o.shape) for o in objects} | {(o.shape, o.motion) for o in objects}

    banned = set(HELDOUT_COLOUR_SHAPE) | set(HELDOUT_SHAPE_MOTION)
    seen = {name: set() for name in ("shape", "colour", "motion", "size", "background", "relation")}
    for split in ("train", "eval"):
        for i in range(1500):
            spec = sample_spec(np.random.default_rng([0, 0 if split == "train" else 1, i]), split)
            assert not pairs(spec.objects) & banned and not spec.heldout
            for o in spec.objects:
                for key in ("shape", "colour", "motion", "size"):
                    seen[key].add(getattr(o, key))
            seen["background"].add(spec.background)
            seen["relation"].add(spec.relation)
    spaces = dict(shape=SHAPES, colour=COLOURS, motion=MOTIONS, size=SIZES, background=BACKGROUNDS,
                  relation=RELATIONS)
    assert all(seen[key] == set(space) for key, space in spaces.items())  # every single value is trained
    heldout_seen = set()
    for i in range(600):
        spec = sample_spec(np.random.default_rng([0, 2, i]), "heldout")
        first = pairs(spec.objects[:1]) & banned
        assert spec.heldout and first and not pairs(spec.objects[1:]) & banned
        heldout_seen |= first
    assert heldout_seen == banned
    assert all(sample("heldout", i, **SMALL).labels.heldout for i in range(5))
    assert not any(sample("train", i, **SMALL).labels.heldout for i in range(5))


def mentions(caption: str, phrases) -> bool:
    return any(re.search(rf"\b{re.escape(p)}\b", caption) for p in phrases)


def test_captions_use_the_vocabulary_and_mention_the_labels():
    vocabulary = set(caption_vocabulary())
    assert vocabulary == set(map(str.lower, vocabulary)) and len(vocabulary) > 80
    assert set(tokenize("a red circle moving to the right")) <= vocabulary
    texts = set()
    for split, i in itertools.product(("train", "eval", "heldout"), range(150)):
        rng = np.random.default_rng([7, i])
        spec = sample_spec(rng, split)
        spec = SceneSpec(spec.objects, spec.background, spec.relation, STYLES[i % len(STYLES)])
        complete = split != "train"
        text = make_caption(spec, i, complete=complete)
        texts.add(text)
        assert set(tokenize(text)) <= vocabulary, text
        assert len(tokenize(text)) <= MAX_CAPTION_TOKENS, text
        for o in spec.objects:
            assert mentions(text, captions.SHAPE_WORDS[o.shape]), text
            assert mentions(text, captions.COLOUR_WORDS[o.colour]), text
            assert mentions(text, captions.MOTION_WORDS[o.motion][0] + captions.MOTION_WORDS[o.motion][1]), text
            assert not complete or mentions(text, captions.SIZE_WORDS[o.size]), text
        assert not complete or mentions(text, captions.BACKGROUND_WORDS[spec.background]), text
        if spec.relation != "none":
            assert mentions(text, captions.RELATION_WORDS[spec.relation]), text
        styles = captions.STYLE_WORDS[spec.style] if spec.style != "none" else []
        assert mentions(text, styles) == (spec.style != "none")
        assert not mentions(text, [p for name, ps in captions.STYLE_WORDS.items() if name != spec.style for p in ps])
    assert len(texts) == 450  # varied wording
    spec = one()
    assert make_caption(spec, 3) == make_caption(spec, 3)
    assert len({make_caption(spec, seed) for seed in range(40)}) > 20


def test_a_word_tokenizer_built_from_the_vocabulary_knows_every_caption():
    from neodragon.models.text import build_word_tokenizer

    tokenizer = build_word_tokenizer(caption_vocabulary(), 32)
    for i in range(30):
        ids = tokenizer(sample("train", i, num_frames=1, height=16, width=16).caption)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) <= 32


# ---- styles --------------------------------------------------------------------------------------------------------


def scene(labels):
    """Everything but the style."""
    return labels.objects, labels.background, labels.relation


def test_styles_change_the_image_and_carry_their_label():
    plain = render(one("diamond", "green", "large", "right", "gray"), 1)
    frames = plain.video
    for style in STYLES[1:]:
        s = render(one("diamond", "green", "large", "right", "gray", style=style), 1)
        assert s.labels.style == STYLES.index(style)
        assert scene(s.labels) == scene(plain.labels)
        assert (s.video - frames).abs().mean() > 0.005, style
        assert mentions(s.caption, captions.STYLE_WORDS[style])
        if style == "outline":  # the inside shows the background again
            x, y = (torch.tensor(s.labels.objects[0].position) * 128).long().tolist()
            assert torch.allclose(s.video[:, 0, y, x], frames[:, 0, 0, 0])
        if style == "pixel":
            block = s.video[:, 0, 6:12, 6:12]
            assert torch.equal(block, block[:, :1, :1].expand_as(block))
    assert all(sample("train", i, **SMALL).labels.style == 0 for i in range(5))
    mixed = {sample("train", i, styles=STYLES, **SMALL).labels.style for i in range(30)}
    assert mixed == set(range(len(STYLES)))
    # the style has its own random stream: an index shows the same scene in every style
    a, b = sample("train", 4, styles=("neon",)), sample("train", 4)
    assert scene(a.labels) == scene(b.labels)


# ---- datasets ------------------------------------------------------------------------------------------------------


def test_map_dataset_and_collate():
    data = ShapesWorldDataset("eval", 6, start=10, **SMALL)
    assert len(data) == 6 and torch.equal(data[2].video, sample("eval", 12, **SMALL).video)
    with pytest.raises(IndexError):
        data[6]
    videos, texts, labels = collate([data[i] for i in range(6)])
    assert videos.shape == (6, 3, 9, 64, 64) and len(texts) == 6
    assert labels["shape"].shape == (6, 2) and labels["position"].shape == (6, 2, 2)
    for key in ("background", "relation", "style", "count", "heldout"):
        assert labels[key].shape == (6,)
    single = labels["count"] == 1
    assert single.any() and (labels["shape"][single, 1] == -1).all() and (labels["relation"][single] == 0).all()
    first = labels["position"][:, 0]
    assert (labels["shape"][:, 0] >= 0).all() and ((first > 0) & (first < 1)).all()


def _indices(items, reference):
    found = []
    for s in items:
        matches = [i for i, r in enumerate(reference) if r.caption == s.caption and torch.equal(r.video, s.video)]
        assert len(matches) == 1
        found.append(matches[0])
    return found


def test_worker_and_rank_sharding_cover_every_index_once():
    size = dict(num_frames=1, height=16, width=16)
    reference = [sample("train", i, **size) for i in range(40)]
    assert _indices(ShapesWorld(length=11, start=3, **size), reference) == list(range(3, 14))
    found = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(ShapesWorld(length=23, rank=rank, world_size=2, **size), batch_size=None,
                                             num_workers=2)
        found += _indices(list(loader), reference)
    assert sorted(found) == list(range(23))
    loader = torch.utils.data.DataLoader(ShapesWorld(rank=1, world_size=3, **size), batch_size=4, collate_fn=collate)
    videos, texts, _ = next(iter(loader))  # endless stream, batched
    assert videos.shape == (4, 3, 1, 16, 16) and texts == [reference[i].caption for i in (1, 4, 7, 10)]
    with pytest.raises(ValueError, match="rank"):
        ShapesWorld(rank=2, world_size=2)


# ---- preview ---------------------------------------------------------------------------------------------------------


def test_preview_writes_a_png_and_the_cli_a_gif(tmp_path):
    path = tmp_path / "sheet.png"
    samples = preview(path, "heldout", count=3, frames=4, **SMALL)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width == 4 + 4 * (64 + 4) and image.height > 3 * 64
    assert len(samples) == 3
    with pytest.raises(FileExistsError):
        preview(path, count=1, **SMALL)

    root = typer.Typer()
    root.add_typer(app, name="data")  # as the main CLI registers it
    runner = CliRunner()
    args = ["data", "preview", str(tmp_path / "cli.png"), "--count", "2", "--num-frames", "9", "--height", "64",
            "--width", "64", "--style", "neon", "--style", "pixel", "--gif", str(tmp_path / "cli.gif")]
    result = runner.invoke(root, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "cli.gif").read_bytes()[:3] == b"GIF"
    assert runner.invoke(root, args).exit_code == 1  # no silent overwrite
    assert runner.invoke(root, [*args, "--overwrite", "--split", "nope"]).exit_code == 1


def test_coverage_marks_the_object_pixels():
    item = render(one("square", "red", "large"), 0, num_frames=9)
    assert item.coverage.shape == (9, 128, 128) and item.coverage.min() == 0 and item.coverage.max() == 1
    inside, mask = item.coverage > 0.99, colour_mask(item.video, "red")
    assert inside.sum() > 0 and (mask & inside).sum() >= 0.98 * inside.sum()  # covered pixels are the object's
    assert not (mask & (item.coverage == 0)).any()  # and no object colour outside the coverage
