"""Batch generation (`neodragon generate --prompts-file FILE -o DIR`): the prompts file's rules and errors, seeds,
names and sharding; a batch on a tiny random checkpoint with its manifest; an interrupted batch resumed without
redoing a video; and 2 processes (torch.distributed.run) making the same videos, byte for byte, as one."""

import json
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import neodragon.pipelines.batch as batch
import neodragon.presets
from neodragon.cli import app
from neodragon.pipelines.batch import (
    BatchJob,
    Ranks,
    default_name,
    derive_seed,
    read_prompts_file,
    shard,
    slug,
)
from neodragon.presets import create_random_checkpoint, reduced_official_preset

runner = CliRunner()
PROMPTS = "\n".join([
    "a red circle moving to the right",
    "a small blue square slides to the left",
    '{"prompt": "a green star", "seed": 42, "name": "star"}',
    '{"prompt": "a yellow triangle spinning", "num_frames": 1}',
    "two white circles bouncing",
    '{"prompt": "a purple square", "steps": 2, "guidance": 1.5}',
    "a black circle moving up",
    "an orange star moving down",
]) + "\n"


def prompts_file(folder: Path, text: str, name: str = "prompts.txt") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the prompts file ---------------------------------------------------------------------------------------------

def test_plain_lines_are_prompts_with_derived_seeds_and_names(tmp_path):
    jobs = read_prompts_file(prompts_file(tmp_path, "a red circle\n  a blue square  \n"), base_seed=10)
    assert [(j.index, j.line, j.prompt, j.seed, j.name, j.options) for j in jobs] == [
        (0, 1, "a red circle", 10, "0000-a-red-circle", {}),
        (1, 2, "a blue square", 11, "0001-a-blue-square", {})]
    assert jobs[1].filename == "0001-a-blue-square.mp4"


def test_json_lines_set_seed_name_and_options(tmp_path):
    text = ('{"prompt": "a cat", "seed": 7, "name": "cat", "steps": [2, 2, 2], "guidance": 5}\n'
            '{"prompt": "a dog", "num_frames": 9, "video_steps": 1, "video_guidance": 1.5, "negative_prompt": "x"}\n')
    cat, dog = read_prompts_file(prompts_file(tmp_path, text, "p.jsonl"), base_seed=100)
    assert (cat.seed, cat.name, cat.options) == (7, "cat", {"steps": [2, 2, 2], "guidance": 5})
    assert (dog.seed, dog.name) == (101, "0001-a-dog")
    assert dog.options == {"num_frames": 9, "video_steps": 1, "video_guidance": 1.5, "negative_prompt": "x"}
    assert dog.settings({"num_frames": 17, "height": 64, "guidance": None}) == {
        "num_frames": 9, "height": 64, "video_steps": 1, "video_guidance": 1.5, "negative_prompt": "x"}
    mixed = read_prompts_file(prompts_file(tmp_path, 'a cat\n {"prompt": "a dog", "seed": 3}\n'))
    assert [(j.prompt, j.seed) for j in mixed] == [("a cat", 0), ("a dog", 3)]


@pytest.mark.parametrize("text", ["a\nb", "a\nb\n", "a\r\nb\r\n", "\ufeffa\nb\n"])
def test_a_final_newline_crlf_and_a_bom_are_fine(tmp_path, text):
    assert [j.prompt for j in read_prompts_file(prompts_file(tmp_path, text))] == ["a", "b"]


@pytest.mark.parametrize("text,name,words", [
    ("a\n\nb\n", "p.txt", ["p.txt line 2 is blank"]),
    ("a\n   \n", "p.txt", ["p.txt line 2 is blank"]),
    ("a\nb\n\n", "p.txt", ["p.txt line 3 is blank"]),
    ('a\n{"prompt": "b",}\n', "p.txt", ["p.txt line 2 is not valid JSON", "column"]),
    ("a red circle\n", "p.jsonl", ["p.jsonl line 1 is not valid JSON"]),
    ('["a red circle"]\n', "p.jsonl", ["p.jsonl line 1 must be a JSON object", "list"]),
    ('{"prompt": "a", "mode": "hybrid"}\n', "p.jsonl", ["line 1 has unknown keys ['mode']", "whole batch"]),
    ('{"seed": 1}\n', "p.jsonl", ['line 1 needs "prompt"']),
    ('{"prompt": "  "}\n', "p.jsonl", ['line 1 needs "prompt"']),
    ('{"prompt": "a", "seed": "1"}\n', "p.jsonl", ['"seed" must be an integer']),
    ('{"prompt": "a", "seed": -1}\n', "p.jsonl", ['"seed" must be an integer']),
    ('{"prompt": "a", "steps": [2, 0]}\n', "p.jsonl", ['"steps" must be']),
    ('{"prompt": "a", "guidance": true}\n', "p.jsonl", ['"guidance" must be a number']),
    ('{"prompt": "a", "name": "../a"}\n', "p.jsonl", ['"name" must be a file name']),
    ('{"prompt": "a", "name": "a.mp4"}\n', "p.jsonl", ["without .mp4"]),
    ('{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "x"}\n', "p.jsonl",
     ["line 2: the output name 'x' is already used by line 1"]),
    ('a cat\n{"prompt": "b", "name": "0000-A-Cat"}\n', "p.txt",
     ["line 2: the output name '0000-A-Cat' is already used by line 1 ('0000-a-cat')"]),
    ("", "p.txt", ["p.txt has no prompts"]),
    ("\n \n", "p.txt", ["p.txt has no prompts"]),
])
def test_prompts_file_errors_name_the_file_and_line(tmp_path, text, name, words):
    with pytest.raises(ValueError) as caught:
        read_prompts_file(prompts_file(tmp_path, text, name))
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert str(tmp_path / name) in str(caught.value)


def test_seeds_names_and_slugs():
    assert [derive_seed(5, i) for i in range(3)] == [5, 6, 7]
    assert default_name(3, "A red circle, moving!", 8) == "0003-a-red-circle-moving"
    assert default_name(12345, "x", 20000) == "12345-x"
    assert default_name(7, "x", 20000) == "00007-x"
    assert slug("一只猫") == "video"
    long = slug("a very long prompt about a red circle that moves slowly to the right")
    assert long == "a-very-long-prompt-about-a-red-circle" and len(long) <= batch.SLUG_LENGTH
    assert slug("x" * 60) == "x" * batch.SLUG_LENGTH


def test_shards_split_the_jobs_by_index():
    jobs = [BatchJob(index=i, prompt=f"p{i}", seed=i, name=f"n{i}") for i in range(8)]
    parts = [shard(jobs, rank, 3) for rank in range(3)]
    assert [[j.index for j in part] for part in parts] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert shard(jobs[:2], 2, 3) == [] and shard(jobs, 0, 1) == jobs


def test_ranks_come_from_the_launchers_environment():
    assert Ranks.from_env({}) == Ranks(0, 1, 0)
    ranks = Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ranks == Ranks(3, 4, 1) and ranks.device("cuda") == "cuda:1" and ranks.device("cuda:0") == "cuda:0"
    assert Ranks().device("cuda") == "cuda" and ranks.device("cpu") == "cpu"
    for bad in ({"RANK": "x"}, {"RANK": "2", "WORLD_SIZE": "2"}):
        with pytest.raises(ValueError, match="RANK"):
            Ranks.from_env(bad)


# -- the command ---------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test model is tiny: intra-op threads only add overhead (a lot of it on a busy machine). The 2-process run
    has one thread per process too (torch.distributed.run's default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return create_random_checkpoint(reduced_official_preset(), tmp_path_factory.mktemp("batch-model"))


def batch_args(checkpoint, prompts: Path, out: Path, *extra) -> list[str]:
    return ["generate", "--prompts-file", str(prompts), "-o", str(out), "--model", str(checkpoint),
            "--num-frames", "9", "--height", "64", "--width", "64", "--seed", "3", "--no-sr", *extra]


def manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / batch.MANIFEST).read_text().splitlines()]


def videos(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != batch.MANIFEST)


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory) -> Path:
    """The 8 prompts made by one process, in the test's own process."""
    folder = tmp_path_factory.mktemp("one")
    prompts = prompts_file(folder, PROMPTS)
    result = runner.invoke(app, batch_args(checkpoint, prompts, folder / "videos"))
    assert result.exit_code == 0, result.output
    assert "wrote 8 of 8 videos" in result.output and "1 process" in result.output
    return folder / "videos"


def test_batch_writes_every_video_and_a_manifest(one_process):
    records = manifest(one_process)
    assert [r["index"] for r in records] == list(range(8)) and {r["status"] for r in records} == {"written"}
    assert videos(one_process) == sorted(r["file"] for r in records)  # and no temporary files left behind
    assert [r["seed"] for r in records] == [3, 4, 42, 6, 7, 8, 9, 10]
    assert records[2]["file"] == "star.mp4" and records[0]["file"] == "0000-a-red-circle-moving-to-the-right.mp4"
    assert records[5]["options"] == {"num_frames": 9, "height": 64, "width": 64, "steps": 2, "guidance": 1.5}
    assert len(imageio.mimread(one_process / records[3]["file"])) == 1
    frames = imageio.mimread(one_process / records[0]["file"])
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)


def test_line_one_is_the_single_commands_video(one_process, checkpoint, tmp_path):
    single = tmp_path / "single.mp4"
    args = ["generate", "a red circle moving to the right", "-o", str(single), "--model", str(checkpoint),
            "--num-frames", "9", "--height", "64", "--width", "64", "--seed", "3", "--no-sr"]
    assert runner.invoke(app, args).exit_code == 0
    assert single.read_bytes() == (one_process / "0000-a-red-circle-moving-to-the-right.mp4").read_bytes()


def test_an_interrupted_batch_resumes_without_redoing_videos(one_process, checkpoint, tmp_path, monkeypatch):
    prompts, out = prompts_file(tmp_path, PROMPTS), tmp_path / "videos"
    real_export, calls = batch.export_to_video, []

    def export_then_interrupt(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the 4th video is being written
        calls.append(args[1])
        return real_export(*args, **kwargs)

    monkeypatch.setattr(batch, "export_to_video", export_then_interrupt)
    assert runner.invoke(app, batch_args(checkpoint, prompts, out)).exit_code != 0
    monkeypatch.setattr(batch, "export_to_video", real_export)
    done = {path.name: path.stat().st_mtime_ns for path in calls}
    assert videos(out) == sorted(done) and len(done) == 3  # no manifest, no temporary file

    result = runner.invoke(app, batch_args(checkpoint, prompts, out))
    assert result.exit_code == 0 and "wrote 5 of 8 videos" in result.output, result.output
    assert {name: (out / name).stat().st_mtime_ns for name in done} == done
    statuses = ["skipped"] * 3 + ["written"] * 5
    assert manifest(out) == [{**r, "status": s} for r, s in zip(manifest(one_process), statuses, strict=True)]
    assert all((out / name).read_bytes() == (one_process / name).read_bytes() for name in videos(out))

    (out / "star.mp4").unlink()
    before = {name: (out / name).stat().st_mtime_ns for name in videos(out)}
    assert runner.invoke(app, batch_args(checkpoint, prompts, out)).exit_code == 0
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    assert [r["name"] for r in manifest(out) if r["status"] == "written"] == ["star"]
    assert (out / "star.mp4").read_bytes() == (one_process / "star.mp4").read_bytes()


def test_overwrite_remakes_the_videos_already_there(checkpoint, tmp_path):
    prompts, out = prompts_file(tmp_path, "a red circle\n"), tmp_path / "videos"
    assert runner.invoke(app, batch_args(checkpoint, prompts, out)).exit_code == 0
    video = out / "0000-a-red-circle.mp4"
    video.write_bytes(b"stale")
    assert runner.invoke(app, batch_args(checkpoint, prompts, out, "--overwrite")).exit_code == 0
    assert video.read_bytes() != b"stale" and manifest(out)[0]["status"] == "written"


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the command loaded a model before rejecting its input")

    monkeypatch.setattr(neodragon.presets, "load_pipeline", refuse)


@pytest.mark.parametrize("args,text,words", [
    (["a prompt too"], "a\n", ["a PROMPT or --prompts-file, not both"]),
    (["-o", "{tmp}/clip.mp4"], "a\n", ["-o names the folder"]),
    (["--preview", "{tmp}/sheet.png"], "a\n", ["--preview is for one prompt"]),
    ([], "a\n\nb\n", ["line 2 is blank"]),
    ([], '{"prompt": "a", "height": 64}\n', ["line 1 has unknown keys ['height']"]),
])
def test_batch_errors_come_before_loading_and_write_nothing(checkpoint, tmp_path, no_loading, args, text, words):
    prompts, out = prompts_file(tmp_path, text), tmp_path / "videos"
    result = runner.invoke(app, batch_args(checkpoint, prompts, out, *(arg.format(tmp=tmp_path) for arg in args)))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert all(word in result.output for word in words), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_a_line_the_model_cannot_make_stops_the_batch_before_any_video(checkpoint, tmp_path):
    prompts = prompts_file(tmp_path, 'a red circle\n{"prompt": "a blue square", "num_frames": 10}\n')
    out = tmp_path / "videos"
    result = runner.invoke(app, batch_args(checkpoint, prompts, out))
    assert result.exit_code == 1 and f"{prompts} line 2: num_frames must be 1 + 8k" in result.output, result.output
    assert not out.exists()


def test_two_processes_make_the_same_videos_as_one(one_process, checkpoint, tmp_path):
    prompts, out = prompts_file(tmp_path, PROMPTS), tmp_path / "videos"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "neodragon", *batch_args(checkpoint, prompts, out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wrote 8 of 8 videos" in done.stderr and "2 processes" in done.stderr, done.stderr[-3000:]
    assert "4/4" in done.stderr  # rank 0's bar: its half of the prompts
    assert videos(out) == videos(one_process)
    for name in videos(out):
        assert (out / name).read_bytes() == (one_process / name).read_bytes(), name
        assert np.array_equal(np.stack(imageio.mimread(out / name)), np.stack(imageio.mimread(one_process / name)))
    assert (out / batch.MANIFEST).read_bytes() == (one_process / batch.MANIFEST).read_bytes()
