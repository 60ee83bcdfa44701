import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from neodragon.cli.eval import app
from neodragon.data import COLOURS, MOTIONS, SHAPES, STYLES, collate, sample
from neodragon.eval.judge import (
    Judge,
    export_judge,
    grid_blur,
    item_grid_blur,
    item_jitter,
    load_judge,
    real_videos,
    scene_dict,
    slot_targets,
    train_judge,
)
from neodragon.eval.metrics import (
    DYNAMIC_THRESHOLD,
    accuracy_by_value,
    accuracy_table,
    bounds,
    by_object_count,
    consistency,
    edge_energy,
    evaluate,
    frechet_distance,
    imaging_quality,
    motion_magnitude,
    motion_smoothness,
    normalise,
    semantic_scores,
    sqrtm_psd,
    temporal_flickering,
    vbench_total,
)
from neodragon.eval.prompts import PROMPT_SETS, build_prompt_set, load_prompt_set, save_prompt_set


def moving_square(steps: list[int], size: int = 32) -> torch.Tensor:
    """[1, T, 3, H, W] in [0, 1]: a white 8x8 square on black, at x offsets ``steps``."""
    frames = torch.zeros(len(steps), 3, size, size)
    for t, x in enumerate(steps):
        frames[t, :, 12:20, x : x + 8] = 1
    return frames[None]


def obj(shape="circle", colour="red", size="small", motion="still"):
    return {"shape": shape, "colour": colour, "size": size, "motion": motion}


def scene(objects, relation="none", background="black", style="none"):
    return {"objects": objects, "relation": relation, "background": background, "style": style}


# -- quality metrics ---------------------------------------------------------------------------------------------


def test_identical_frames_are_consistent_flicker_free_and_static():
    video = moving_square([4] * 9)
    features = torch.randn(1, 1, 16).expand(2, 9, 16)
    assert consistency(features).tolist() == pytest.approx([1.0, 1.0])
    assert temporal_flickering(video).item() == 1.0
    assert motion_smoothness(video).item() == 1.0
    assert motion_magnitude(video).item() == 0.0


def test_consistency_drops_when_the_features_change():
    steady = torch.tensor([[[1.0, 0.0]] * 3])
    switch = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # (cos(f0,f1) + 1)/2 = 1, then 0
    assert consistency(steady).item() == pytest.approx(1.0)
    assert consistency(switch).item() == pytest.approx(0.5)
    assert consistency(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])).item() == 0  # negative similarity clips to 0


def test_flicker_scores_worse_than_smooth_motion():
    smooth = moving_square(list(range(0, 17, 2)))
    flicker = smooth * (0.5 + torch.rand(1, 9, 1, 1, 1, generator=torch.Generator().manual_seed(0)))
    assert temporal_flickering(flicker).item() < temporal_flickering(smooth).item() - 0.01


def test_jerky_motion_is_less_smooth_than_steady_motion():
    steady = moving_square([2 * t for t in range(17)], size=48)  # 2 px per frame
    jerky = moving_square([8 * (t // 4) for t in range(17)], size=48)  # same path, 8 px jumps every 4 frames
    assert steady[0, -1].sum() == jerky[0, -1].sum()
    assert motion_smoothness(jerky).item() < motion_smoothness(steady).item() - 0.005


def test_dynamic_degree_separates_real_still_and_moving_videos():
    magnitudes = {}
    for i in range(40):
        item = sample("eval", i, num_frames=9, height=64, width=64, styles=STYLES)
        still = all(o.motion == MOTIONS.index("still") for o in item.labels.objects)
        magnitudes.setdefault(still, []).append(motion_magnitude((item.video.transpose(0, 1)[None] + 1) / 2).item())
    assert max(magnitudes[True]) <= DYNAMIC_THRESHOLD < min(magnitudes[False])


def test_imaging_quality_prefers_the_sharpness_of_the_real_video():
    real = moving_square([4] * 9)
    blurred = torch.nn.functional.avg_pool2d(real[0], 5, 1, 2)[None]
    noisy = (real + 0.3 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    reference = edge_energy(real)
    assert imaging_quality(edge_energy(real), reference).item() == 1.0
    assert imaging_quality(edge_energy(blurred), reference).item() < 0.8
    assert imaging_quality(edge_energy(noisy), reference).item() < 0.8


# -- FVD-nano ------------------------------------------------------------------------------------------------------


def test_sqrtm_psd_on_known_matrices():
    torch.testing.assert_close(sqrtm_psd(torch.tensor([[5.0, 4.0], [4.0, 5.0]])),
                               torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    a = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    singular = a @ a.T  # rank 3: rounding makes some eigenvalues slightly negative
    root = sqrtm_psd(singular)
    torch.testing.assert_close(root @ root, singular, atol=1e-9, rtol=1e-9)


def test_frechet_distance_is_zero_on_itself_and_grows_with_a_mean_shift():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    x = x - x.mean(0)  # centred, so that scaling x moves only the covariance
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    shifts = [frechet_distance(x, x + s) for s in (0.5, 1.0, 2.0)]
    assert shifts == pytest.approx([8 * 0.25, 8 * 1.0, 8 * 4.0], rel=1e-6)  # |mean shift|^2, same covariance
    wider = frechet_distance(x, 2 * x)  # same mean, covariance scaled by 4: trace term (1 - 2)^2 tr(S)
    assert wider == pytest.approx(torch.cov(x.double().T).trace().item(), rel=1e-6)
    few = frechet_distance(x[:5], x[5:10])  # fewer samples than dimensions: singular covariances, still finite
    assert math.isfinite(few) and few > 0


# -- semantic ------------------------------------------------------------------------------------------------------


def test_semantic_scores_on_hand_made_predictions():
    expected = scene([obj("circle", "red", motion="left"), obj("square", "blue", "large")], "right_of", "gray")
    # the judge orders slots by place: the red circle is right of the blue square, so it is in slot 1
    right = scene([obj("square", "blue", "large"), obj("circle", "red", motion="left")], "left_of", "gray")
    scores = semantic_scores(right, expected)
    assert scores == {"shape": 1, "colour": 1, "size": 1, "motion": 1, "count": 1, "relation": 1, "background": 1,
                      "style": 1, "combination": 1}
    swapped = scene([obj("circle", "red", motion="left"), obj("square", "blue", "large")], "left_of", "gray")
    assert semantic_scores(swapped, expected)["relation"] == 0  # right objects, wrong places
    vertical = scene(right["objects"], "above", "gray")
    assert semantic_scores(vertical, expected)["relation"] == 0
    one = scene([obj("circle", "green", motion="left")], background="white", style="neon")
    scores = semantic_scores(one, expected)  # only the circle is there (wrong colour), and no relation
    assert (scores["shape"], scores["colour"], scores["motion"], scores["count"]) == (0.5, 0, 0.5, 0)
    assert (scores["relation"], scores["background"], scores["style"], scores["combination"]) == (0, 0, 0, 0)
    single = semantic_scores(scene([obj()]), scene([obj(motion="up")]))
    assert single["relation"] is None and single["motion"] == 0 and single["shape"] == 1
    table = accuracy_table([right, one], [expected, expected])
    assert table["colour"] == pytest.approx(0.5) and table["relation"] == pytest.approx(0.5)


def test_normalisation_and_total_follow_vbench():
    assert normalise(0.6293, 0.6293, 1.0) == 0 and normalise(0.8, 0.6, 1.0) == pytest.approx(0.5)
    assert normalise(2.0, 0.0, 1.0) == 1 and normalise(30.0, 20.0, 0.0) == 0  # clipped; FVD's bounds run downward
    limits = bounds(fvd_noise=20.0)
    assert limits["fvd_nano"] == (20.0, 0.0) and limits["subject_consistency"] == (0.1462, 1.0)
    scores = {"subject_consistency": 1.0, "background_consistency": 1.0, "temporal_flickering": 1.0,
              "motion_smoothness": 0.9975, "dynamic_degree": 0.0, "imaging_quality": 0.5, "fvd_nano": 5.0,
              "object_class": 1.0, "colour": 0.5, "motion": 0.0, "multiple_objects": 1.0,
              "spatial_relationship": None, "scene": 0.5, "appearance_style": 1.0}
    result = vbench_total(scores, limits)
    quality = (1 + 1 + 1 + 1 + 0.5 * 0 + 0.5 + 0.75) / 6.5
    semantic = (1 + 0.5 + 0 + 1 + 0.5 + 1) / 6  # the missing relation is left out
    assert result["quality"] == pytest.approx(quality) and result["semantic"] == pytest.approx(semantic)
    assert result["total"] == pytest.approx((4 * quality + semantic) / 5)
    assert result["fvd_nano_normalised"] == pytest.approx(0.75)


# -- judge ---------------------------------------------------------------------------------------------------------


def test_slot_targets_order_objects_by_place():
    videos, labels = real_videos("eval", range(12), num_frames=1, size=16)
    targets = slot_targets(labels)
    for i in range(12):
        truth = scene_dict(labels, i)
        objects = truth["objects"]
        if truth["relation"] in ("right_of", "below"):
            objects = objects[::-1]
        assert [SHAPES[s] for s in targets["slot_shape"][i] if s >= 0] == [o["shape"] for o in objects]
        relation = {"none": 0, "left_of": 1, "right_of": 1, "above": 2, "below": 2}[truth["relation"]]
        assert targets["relation"][i] == relation and targets["count"][i] == len(objects) - 1


def test_training_jitter_is_a_function_of_the_item_and_spares_half():
    amounts = [item_jitter("train", i, 0, 0.1) for i in range(400)]
    assert amounts == [item_jitter("train", i, 0, 0.1) for i in range(400)]
    assert 0.4 < amounts.count(0.0) / 400 < 0.6 and 0 < max(amounts) < 0.1
    videos, _ = real_videos("train", range(4), num_frames=9, size=32, jitter=0.1, mixed=True)
    exact, _ = real_videos("train", range(4), num_frames=9, size=32)
    changed = [not torch.equal(a, b) for a, b in zip(videos, exact, strict=True)]
    assert changed == [amount > 0 for amount in amounts[:4]]


def test_grid_blur_is_a_function_of_the_item_spares_half_and_keeps_still_frames_still():
    draws = [item_grid_blur("train", i, 0, 0.6) for i in range(400)]
    assert draws == [item_grid_blur("train", i, 0, 0.6) for i in range(400)]
    strengths = [amount for amount, _ in draws]
    assert 0.4 < strengths.count(0.0) / 400 < 0.6 and 0 < max(strengths) < 0.6
    assert 0.3 < sum(blocky for amount, blocky in draws if amount > 0) / sum(a > 0 for a in strengths) < 0.7
    video = torch.rand(3, 1, 16, 24).repeat(1, 5, 1, 1)  # a still video
    assert torch.equal(grid_blur(video, 0.0), video)
    for blocky in (True, False):
        blurred = grid_blur(video, 0.5, blocky)
        assert torch.equal(blurred[:, 1:], blurred[:, :1].expand_as(blurred[:, 1:])), "frames must stay equal"
        assert not torch.allclose(blurred, video)
    blocks = grid_blur(video, 1.0, blocky=True)
    assert torch.allclose(blocks, torch.nn.functional.avg_pool2d(video, 8).repeat_interleave(8, -1)
                          .repeat_interleave(8, -2))
    mixed, _ = real_videos("train", range(6), num_frames=9, size=32, blur=0.6, mixed=True)
    exact, _ = real_videos("train", range(6), num_frames=9, size=32)
    changed = [not torch.equal(a, b) for a, b in zip(mixed, exact, strict=True)]
    assert changed == [amount > 0 for amount in strengths[:6]]


def test_train_judge_runs_saves_and_records_its_calibration(tmp_path):
    from neodragon.training.trainer import TrainConfig

    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, learning_rate=1e-3, save_every=1,
                         log_every=1, seed=0)
    judge = train_judge(config, eval_count=2, workers=0, jitter=0.1, blur=0.6)
    calibration = load_judge(tmp_path / "judge").config.calibration
    assert calibration["train_jitter"] == 0.1 and calibration["train_grid_blur"] == 0.6
    assert calibration["train_videos"] == 4
    assert {"accuracy_eval", "accuracy_heldout", "accuracy_heldout_jittered",
            "accuracy_heldout_grid_blurred"} <= set(calibration)
    assert calibration["fvd_noise"] > 0 and (tmp_path / "checkpoints").is_dir()
    assert not judge.training


def test_train_judge_starts_from_the_seeds_weights_whatever_ran_before(tmp_path):
    from neodragon.training.trainer import TrainConfig

    states = []
    for run in range(2):
        torch.manual_seed(100 + run)  # what ran before in the process must not matter
        config = TrainConfig(output_dir=str(tmp_path / str(run)), max_steps=0, batch_size=2, seed=3)
        states.append(train_judge(config, eval_count=1, workers=0).state_dict())
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_judge_save_load_round_trip(tmp_path):
    judge = Judge(widths=(8, 8, 8), motion_widths=(8, 8, 8), slot_hidden=16, slot_dim=8, scene_dim=4,
                  calibration={"fvd_noise": 3.0}).eval()
    video = torch.rand(2, 3, 17, 64, 64) * 2 - 1
    judge.save_pretrained(tmp_path / "full")
    loaded = load_judge(tmp_path / "full")
    torch.testing.assert_close(loaded(video)["slot_colour"], judge(video)["slot_colour"])
    assert loaded.config.calibration == {"fvd_noise": 3.0}
    export_judge(judge, tmp_path / "half")
    saved = load_file(tmp_path / "half" / "diffusion_pytorch_model.safetensors").values()
    assert {t.dtype for t in saved if t.is_floating_point()} == {torch.float16}
    torch.testing.assert_close(load_judge(tmp_path / "half")(video)["object"], judge(video)["object"], atol=0.05,
                               rtol=0.05)
    with pytest.raises(ValueError, match="label spaces"):
        Judge(label_spaces={"shape": ["circle"]})


def test_bundled_judge_reads_real_heldout_videos():
    judge = load_judge()
    assert judge.config.calibration["accuracy_heldout"]["shape"] >= 0.9
    videos, labels = real_videos("heldout", range(16), styles=("none",))
    predicted, _ = judge.predict(videos)
    table = accuracy_table(predicted, [scene_dict(labels, i) for i in range(16)])
    assert min(table.values()) >= 0.8
    objects, scenes = judge.frame_features(videos[:2])
    assert objects.shape[:2] == scenes.shape[:2] == (2, 17)


# -- prompt sets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PROMPT_SETS)
def test_prompt_sets_are_fixed_deterministic_and_match_the_dataset(name, tmp_path):
    built = build_prompt_set(name)
    assert built == build_prompt_set(name)
    assert load_prompt_set(name) == built
    assert load_prompt_set(save_prompt_set(built, tmp_path / "copy.json", name)) == built
    assert len({e.id for e in built}) == len(built)
    for entry in built[:: max(1, len(built) // 6)]:
        item = sample(entry.split, entry.index, num_frames=1, height=16, width=16, styles=(entry.scene["style"],))
        assert item.caption == entry.caption
        assert scene_dict(collate([item])[2], 0) == entry.scene
        torch.testing.assert_close(entry.render(1, 16, 16), item.video)


def test_nano_eval_covers_every_attribute_value():
    entries = load_prompt_set("nano-eval")
    plain = [e for e in entries if e.scene["style"] == "none"]
    for attribute, space in (("shape", SHAPES), ("colour", COLOURS), ("motion", MOTIONS)):
        assert {o[attribute] for e in plain for o in e.scene["objects"]} == set(space)
    assert {e.scene["background"] for e in plain} == {"black", "white", "gray", "gradient", "checkered"}
    assert {e.scene["relation"] for e in plain} == {"none", "left_of", "right_of", "above", "below"}
    assert {e.scene["style"] for e in entries} == set(STYLES)
    assert all(e.dimensions == ("appearance_style",) for e in entries if e.scene["style"] != "none")


def test_nano_heldout_covers_every_heldout_pair():
    from neodragon.data import HELDOUT_COLOUR_SHAPE, HELDOUT_SHAPE_MOTION

    entries = load_prompt_set("nano-heldout")
    assert all(e.heldout for e in entries)
    firsts = [e.scene["objects"][0] for e in entries]
    pairs = {(o["colour"], o["shape"]) for o in firsts} | {(o["shape"], o["motion"]) for o in firsts}
    assert set(HELDOUT_COLOUR_SHAPE + HELDOUT_SHAPE_MOTION) <= pairs


# -- end to end ----------------------------------------------------------------------------------------------------


def test_by_object_count_splits_object_prompts_and_leaves_out_style_prompts():
    entries = load_prompt_set("nano-eval")
    one = next(e for e in entries if len(e.scene["objects"]) == 1 and "object_class" in e.dimensions)
    two = next(e for e in entries if len(e.scene["objects"]) == 2)
    styled = next(e for e in entries if e.dimensions == ("appearance_style",))

    def row(value: float, count: float = 1.0) -> dict:
        return {"shape": value, "colour": 1.0, "size": 0.0, "motion": value, "count": count}

    # the second one-object video split its object: it counts in the plain row, not in if_count_right
    table = by_object_count([row(0.0), row(0.5), row(1.0, count=0.0), row(0.0)], [one, two, one, styled])
    assert table == {
        "1": {"prompts": 2, "shape": 0.5, "colour": 1.0, "size": 0.0, "motion": 0.5, "count": 0.5,
              "if_count_right": {"prompts": 1, "shape": 0.0, "colour": 1.0, "size": 0.0, "motion": 0.0}},
        "2": {"prompts": 1, "shape": 0.5, "colour": 1.0, "size": 0.0, "motion": 0.5, "count": 1.0,
              "if_count_right": {"prompts": 1, "shape": 0.5, "colour": 1.0, "size": 0.0, "motion": 0.5}}}
    none_right = by_object_count([row(1.0, count=0.0)], [one])["1"]["if_count_right"]
    assert none_right == {"prompts": 0, "shape": None, "colour": None, "size": None, "motion": None}


def test_accuracy_by_value_counts_each_prompted_object_under_its_value():
    from neodragon.eval.prompts import OBJECT_DIMENSIONS, PromptEntry

    def entry(objects: list[dict], dimensions: tuple[str, ...] = OBJECT_DIMENSIONS) -> PromptEntry:
        scene = {"objects": objects, "relation": "none", "background": "black", "style": "none"}
        return PromptEntry("x", "c", 0, "eval", 0, 0, scene, False, dimensions)

    red_still = {"shape": "square", "colour": "red", "size": "large", "motion": "still"}
    blue_left = {"shape": "star", "colour": "blue", "size": "small", "motion": "left"}
    entries = [entry([red_still]), entry([red_still, blue_left]), entry([blue_left], ("appearance_style",))]
    predicted = [{"objects": [{**red_still, "motion": "growing"}]},  # a still object read as growing
                 {"objects": [dict(blue_left)]},  # the red square is missing
                 {"objects": []}]  # a style-only prompt: not counted
    table = accuracy_by_value(predicted, entries)
    assert table["motion"] == {"left": [1, 1], "still": [0, 2]}
    assert table["colour"] == {"blue": [1, 1], "red": [1, 2]}
    assert table["shape"] == {"square": [1, 2], "star": [1, 1]}


def test_evaluate_scores_real_videos_as_near_perfect():
    entries = load_prompt_set("nano-eval")[:3]
    judge = load_judge()
    by_seed = {e.seed: e for e in entries}

    def real(caption: str, seed: int) -> torch.Tensor:  # a perfect generator: the scene at another layout
        return (by_seed[seed].render(17, 128, 128, shift=7).transpose(0, 1) + 1) / 2

    perfect = evaluate(real, entries, judge, progress=False)
    noise = evaluate(lambda caption, seed: torch.rand(17, 3, 128, 128, generator=torch.Generator().manual_seed(seed)),
                     entries, judge, progress=False)
    assert perfect["generated"]["total"] > noise["generated"]["total"] + 0.2
    assert perfect["generated"]["dimensions"]["colour"] == 1.0
    assert noise["generated"]["dimensions"]["temporal_flickering"] < 0.8


def test_cli_run_writes_json_and_markdown(tmp_path):
    from neodragon.presets import create_random_checkpoint, nano_student_preset

    checkpoint = create_random_checkpoint(nano_student_preset(), tmp_path / "model")
    prompts = save_prompt_set(load_prompt_set("nano-eval")[:2], tmp_path / "two.json", "two")
    out = tmp_path / "results.json"
    args = ["run", str(checkpoint), "--prompt-set", str(prompts), "--out", str(out), "--steps", "1",
            "--guidance", "1", "--video-guidance", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["prompts"] == 2 and len(data["per_prompt"]) == 2 and data["git_revision"]
    assert set(data["judge_accuracy_real"]) >= {"prompt_set", "accuracy_eval", "accuracy_heldout"}
    assert 0 <= data["generated"]["total"] <= 1
    assert "| **total** |" in out.with_suffix(".md").read_text()
    assert sum(group["prompts"] for group in data["by_object_count"]["generated"].values()) == 2
    assert "per prompted value" in out.with_suffix(".md").read_text()
    assert CliRunner().invoke(app, args).exit_code == 1  # no overwrite without --overwrite


def test_cli_vae_scores_reconstructions_per_style(tmp_path):
    out = tmp_path / "vae.json"
    result = CliRunner().invoke(app, ["vae", "nano", "--videos", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["real"]["shape"] == 1.0 and 10 < data["psnr_db"] < 60
    by_style = data["reconstructed_by_style"]
    assert set(by_style) <= set(STYLES) and sum(s["videos"] for s in by_style.values()) == 6
    style_hits = sum(s["style"] * s["videos"] for s in by_style.values())
    assert math.isclose(style_hits / 6, data["reconstructed"]["style"])  # the split adds up to the whole
    assert CliRunner().invoke(app, ["vae", "nano", "--videos", "1", "--out", str(out)]).exit_code == 1
    missing = CliRunner().invoke(app, ["vae", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "cannot load a VAE" in missing.output
