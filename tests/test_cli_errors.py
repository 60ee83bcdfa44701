"""The command line's user errors: one red line that says what to do, a non-zero exit code, no traceback, and
nothing written; the warnings and the "wrote" line of a run that works. Runs the bundled nano model at 1 frame and
1 step per stage where a run is needed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

import neodragon.presets
from neodragon.cli import app
from neodragon.cli.errors import incomplete_weight_files
from neodragon.presets import bundled_weights

runner = CliRunner()
FAST = ["--num-frames", "1", "--steps", "1"]


def lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.strip()]


def assert_one_error_line(result, *words: str, code: int | None = None) -> str:
    """Exit code non-zero (or ``code``), no traceback, exactly one non-empty line: 'error: ...' with ``words``."""
    assert result.exit_code != 0 if code is None else result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert len(lines(result)) == 1, result.output
    line = lines(result)[0]
    assert line.startswith("error: "), line
    for word in words:
        assert word in line, (word, line)
    return line


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a model fails the test: the error must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before rejecting its input")

    monkeypatch.setattr(neodragon.presets, "load_pipeline", refuse)


@pytest.fixture
def nano_copy(tmp_path) -> Path:
    return Path(shutil.copytree(bundled_weights("nano"), tmp_path / "model"))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- 1: truncated weight files ----------------------------------------------------------------------------------

def test_truncated_weights_name_every_file(nano_copy, tmp_path, no_loading):
    dit = next(nano_copy.glob("diffusion_transformer_320p*")) / "diffusion_pytorch_model.safetensors"
    vae = nano_copy / "causal_video_vae" / "diffusion_pytorch_model.safetensors"
    truncate(dit)
    out = tmp_path / "out" / "clip.mp4"
    result = runner.invoke(app, ["generate", "a red circle", "-o", str(out), "--model", str(nano_copy), *FAST])
    line = assert_one_error_line(result, str(dit), "incomplete", "re-download or re-export", code=1)
    assert str(vae) not in line
    truncate(vae)
    result = runner.invoke(app, ["generate", "a red circle", "-o", str(out), "--model", str(nano_copy), *FAST])
    assert_one_error_line(result, "2 weight files", str(dit), str(vae), "re-download or re-export", code=1)
    assert not out.parent.exists()
    assert_one_error_line(runner.invoke(app, ["info", str(nano_copy)]), str(dit), str(vae), code=1)


def test_incomplete_weight_files_names_every_file_safetensors_cannot_open(tmp_path):
    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(tmp_path / "ok.safetensors"))
    whole = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(whole[:4])
    (tmp_path / "header.safetensors").write_bytes(whole[:20])
    (tmp_path / "data.safetensors").write_bytes(whole[:-1])
    (tmp_path / "long.safetensors").write_bytes(whole + b"x")
    problems = {Path(p.split(" (")[0]).name: p for p in incomplete_weight_files(tmp_path)}
    assert set(problems) == {"short.safetensors", "header.safetensors", "data.safetensors", "long.safetensors"}
    assert "header too small" in problems["short.safetensors"] and "4 bytes" in problems["short.safetensors"]
    assert f"{len(whole) - 1:,} bytes" in problems["data.safetensors"]


# -- 2: unwritable output paths, rejected before any loading -----------------------------------------------------

@pytest.mark.parametrize("where", ["proc", "under_a_file", "preview_in_proc"])
def test_unwritable_output_fails_before_generation(where, tmp_path, no_loading):
    (tmp_path / "a_file").write_text("not a folder")
    output, preview = {"proc": ("/proc/neodragon/out.mp4", None),
                       "under_a_file": (str(tmp_path / "a_file" / "out.mp4"), None),
                       "preview_in_proc": (str(tmp_path / "out.mp4"), "/proc/sheet.png")}[where]
    args = ["generate", "a red circle", "-o", output, *FAST] + (["--preview", preview] if preview else [])
    line = assert_one_error_line(runner.invoke(app, args), "cannot write", "Choose another output path", code=1)
    assert (preview or output) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_unwritable_output_in_a_real_process_imports_no_torch():
    """The real command: exit 1, one line on stderr, and torch never imported (so nothing was generated)."""
    script = ("import sys\nfrom neodragon.cli import app\n"
              "try:\n    app(['generate', 'a red circle', '-o', '/proc/neodragon/out.mp4'], prog_name='neodragon')\n"
              "except SystemExit as end:\n    print(end.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["1", "False"], done.stdout + done.stderr
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "error: cannot write /proc/neodragon/out.mp4: cannot create the folder /proc/neodragon (No such file or "
        "directory). Choose another output path."]


def test_other_commands_check_their_outputs_first(tmp_path, no_loading):
    for args in (["data", "preview", "/proc/sheet.png"],
                 ["eval", "vae", "nano", "--out", "/proc/neodragon/vae.json"],
                 ["eval", "run", "nano", "--out", str(tmp_path / "a_file" / "r.json")],
                 ["adapter", "fuse", str(tmp_path / "a.safetensors"), "-o", "/proc/fused.safetensors"]):
        (tmp_path / "a_file").write_text("not a folder")
        assert_one_error_line(runner.invoke(app, args), "cannot write", code=1)


# -- 3 and 5: a long prompt's warning, and a clean "wrote" line -------------------------------------------------

WROTE = re.compile(r"wrote (?P<files>.+): 1 frame, 256x256 at 8 fps, monolithic mode, seed 0, "  # bundled SR
                   r"generation \d+\.\d s, whole command \d+\.\d s")


def test_long_prompt_warns_and_wrote_line_is_clean(tmp_path):
    prompt = ("a red circle moving to the right on a blue background " * 100)[:5000]
    out, sheet = tmp_path / "long.mp4", tmp_path / "long.png"
    result = runner.invoke(app, ["generate", prompt, "-o", str(out), "--preview", str(sheet), *FAST])
    assert result.exit_code == 0, result.output
    warnings = [line for line in lines(result) if line.startswith("warning:")]
    assert len(warnings) == 1, result.output
    match = re.fullmatch(r"warning: The prompt is (\d+) tokens long, but the text encoder reads only the first "
                         r"(\d+): the last (\d+) tokens are ignored\..*", warnings[0])
    assert match, warnings[0]
    total, limit, ignored = map(int, match.groups())
    assert total > 500 and total - limit == ignored > 0
    wrote = lines(result)[-1]
    assert WROTE.fullmatch(wrote), wrote
    assert WROTE.fullmatch(wrote)["files"] == f"{out} and {sheet}"
    assert lines(result).index(warnings[0]) < len(lines(result)) - 1  # shown before the result line
    assert out.stat().st_size > 0 and sheet.stat().st_size > 0

    plain = runner.invoke(app, ["generate", "a red circle", "-o", str(tmp_path / "plain.mp4"), *FAST])
    assert plain.exit_code == 0, plain.output
    assert not any(line.startswith("warning:") for line in lines(plain)), plain.output
    wrote = lines(plain)[-1]
    assert WROTE.fullmatch(wrote) and WROTE.fullmatch(wrote)["files"] == str(tmp_path / "plain.mp4"), wrote
    for line in (wrote, lines(result)[-1]):
        assert "; " not in line and "[" not in line and "\x1b" not in line


# -- 7: bad flags ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--dtype", "foo"], ["--dtype", "'foo'"]),
    (["--num-frames", "10"], ["1 + 8k", "10"]),
    (["--height", "100"], ["multiples of 64", "100"]),
    (["--steps", "a,b"], ["--steps", "'a,b'"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--video-steps", "4,x"], ["--video-steps", "'4,x'"]),
    (["--model", "nosuchthing"], ["nosuchthing", "neither a checkpoint folder nor a hub id"]),
    (["--mode", "foo"], ["Unknown mode 'foo'"]),
    (["--seed", "abc"], ["--seed", "abc", "generate --help"]),
    (["--fps", "0"], ["--fps"]),
    (["-o", "clip.avi"], ["--output", ".mp4"]),
    (["--no-such-flag"], ["No such option", "--no-such-flag"]),
])
def test_bad_flags_one_line_no_traceback(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["generate", "a red circle", "-o", str(tmp_path / "x.mp4"), *FAST, *args])
    assert_one_error_line(result, *words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,words", [
    (["generate", ""], ["prompt", "non-empty"]),
    (["generate", "   "], ["prompt", "non-empty"]),
    (["generate"], ["Missing argument", "prompt"]),
    (["no-such-command"], ["No such command"]),
])
def test_bad_arguments_one_line_no_traceback(args, words, tmp_path, monkeypatch, no_loading):
    monkeypatch.chdir(tmp_path)
    assert_one_error_line(runner.invoke(app, args), *words)
    assert list(tmp_path.iterdir()) == []


def test_bad_flag_in_a_real_process():
    done = subprocess.run([sys.executable, "-m", "neodragon", "generate", "a cat", "--steps", "a,b", "-o",
                           "/tmp/never-written.mp4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stdout == ""
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        "error: --steps takes an int or one int per pyramid stage such as 20,20,20; got 'a,b'."]


# -- 8: the other command groups -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["eval", "vae", "/nonexistent"], ["cannot load a VAE", "/nonexistent"]),
    (["eval", "run", "/nonexistent", "--out", "{tmp}/r.json"], ["/nonexistent"]),
    (["eval", "run", "nano", "--out", "{tmp}/r.json", "--steps", "x"], ["--steps", "'x'"]),
    (["eval", "run", "nano", "--out", "{tmp}/r.json", "--dtype", "int8"], ["--dtype", "int8"]),
    (["prune", "apply", "nano", "--drop", "5", "-o", "{tmp}/p"], ["must stay"]),
    (["prune", "recover", "/nonexistent", "--stage", "1", "--latents", "{tmp}", "-o", "{tmp}/r"], ["pruning.json"]),
    (["distill", "steps", "--teacher", "/nonexistent", "--latents", "{tmp}", "-o", "{tmp}/r"], ["/nonexistent"]),
    (["adapter", "info", "/nonexistent"], ["/nonexistent"]),
    (["adapter", "info", "{tmp}/garbage.safetensors"], []),
    (["adapter", "convert", "/nonexistent", "{tmp}/peft"], ["/nonexistent", "does not exist"]),
    (["adapter", "export", "/nonexistent", "-o", "{tmp}/export"], ["/nonexistent"]),
    (["adapter", "train", "/nonexistent", "--style", "neon", "-o", "{tmp}/run"], ["/nonexistent"]),
    (["train", "encode-latents", "--vae", "/nonexistent", "-o", "{tmp}/X"], ["/nonexistent"]),
    (["train", "vae", "-o", "{tmp}/X", "--style", "sepia"], ["--style", "sepia"]),
    (["train", "teacher", "--latents", "/nonexistent", "-o", "{tmp}/X", "--unit-weights", "a,b"],
     ["--unit-weights"]),
    (["data", "preview", "{tmp}/sheet.png", "--split", "nope"], ["nope"]),
    (["data", "preview", "{tmp}/sheet.jpg"], [".png"]),
])
def test_other_groups_one_line_no_traceback(args, words, tmp_path):
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    before = sorted(tmp_path.iterdir())
    result = runner.invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_one_error_line(result, *words)
    assert sorted(tmp_path.iterdir()) == before


def test_sub_apps_alone_handle_errors_too():
    from neodragon.cli.adapter import app as adapter_app
    from neodragon.cli.eval import app as eval_app

    assert_one_error_line(runner.invoke(adapter_app, ["info", "/nonexistent"]), code=1)
    assert_one_error_line(runner.invoke(eval_app, ["vae", "/nonexistent"]), "cannot load a VAE", code=1)

