import json

import imageio.v2 as imageio
import pytest
from typer.testing import CliRunner

from neodragon.cli import app
from neodragon.presets import create_random_checkpoint, reduced_official_preset

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return create_random_checkpoint(reduced_official_preset(), tmp_path_factory.mktemp("cli-model"))


def generate_args(checkpoint, out, *extra):
    return ["generate", "a red circle moving to the right", "-o", str(out), "--model", str(checkpoint),
            "--num-frames", "9", "--height", "64", "--width", "64", *extra]


def test_generate_writes_video_and_previews(checkpoint, tmp_path):
    out = tmp_path / "clip.mp4"
    result = runner.invoke(app, generate_args(checkpoint, out, "--no-sr", "--preview", str(tmp_path / "sheet.png")))
    assert result.exit_code == 0, result.output
    frames = imageio.mimread(out)
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    assert (tmp_path / "sheet.png").stat().st_size > 0
    result = runner.invoke(app, generate_args(checkpoint, tmp_path / "b.mp4", "--mode", "monolithic",
                                              "--steps", "1", "--preview", str(tmp_path / "anim.gif")))
    assert result.exit_code == 0, result.output
    assert imageio.mimread(tmp_path / "b.mp4")[0].shape == (128, 128, 3)  # SR is on by default: it has one
    assert (tmp_path / "anim.gif").read_bytes()[:3] == b"GIF"


def test_same_seed_same_video(checkpoint, tmp_path):
    for name in ("a", "b"):
        assert runner.invoke(app, generate_args(checkpoint, tmp_path / f"{name}.mp4", "--seed", "7")).exit_code == 0
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


@pytest.mark.parametrize("extra,message", [
    (["--num-frames", "10"], "1 + 8k"),
    (["--height", "60"], "multiples of 64"),
    (["--mode", "turbo"], "Unknown mode"),
    (["--dtype", "int8"], "--dtype"),
    (["--steps", "a,b"], "steps"),
])
def test_bad_input_exits_nonzero_and_writes_nothing(checkpoint, tmp_path, extra, message):
    out = tmp_path / "bad.mp4"
    result = runner.invoke(app, generate_args(checkpoint, out, *extra))
    assert result.exit_code != 0
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_empty_prompt_and_existing_output(checkpoint, tmp_path):
    result = runner.invoke(app, ["generate", " ", "-o", str(tmp_path / "x.mp4"), "--model", str(checkpoint)])
    assert result.exit_code == 1 and "non-empty" in result.output
    existing = tmp_path / "keep.mp4"
    existing.write_bytes(b"precious")
    result = runner.invoke(app, generate_args(checkpoint, existing))
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert existing.read_bytes() == b"precious"
    nowhere = str(tmp_path / "nope")
    missing = runner.invoke(app, ["generate", "a cat", "-o", str(tmp_path / "y.mp4"), "--model", nowhere])
    assert missing.exit_code == 1 and "neither a checkpoint folder" in missing.output


def test_info_lists_components(checkpoint):
    result = runner.invoke(app, ["info", str(checkpoint), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    names = {c["name"]: c for c in report["components"]}
    assert names["diffusion_transformer_320p"]["class_name"] == "PyramidMMDiT"
    assert names["diffusion_transformer_320p"]["num_elements"] > 0
    assert names["causal_video_vae"]["config"]["decoder_num_features"] == [16, 8, 8, 8]
    table = runner.invoke(app, ["info", "nano"])
    assert table.exit_code == 0 and "PyramidMMDiT" in table.output


@pytest.mark.parametrize("name", ["out.mp4", "out.png", "out.gif"])
def test_the_readme_commands_outputs_are_ignored_by_git(name):
    """The README's generate command writes out.mp4 and out.png into the checkout: they must not show up as changes."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    check = subprocess.run(["git", "check-ignore", "-q", name], cwd=root)
    assert check.returncode == 0, f"{name} is not ignored by .gitignore"
