"""The command line's help: fast (no torch), complete (every option says what it does), plain (no <bool>), and
`info` describing every component of the bundled model, the text encoder it references included."""

import json
import re
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from neodragon.cli import app

runner = CliRunner()
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate")


def commands(command=None, path=()):
    """(path, click command) of every command and group under the app, the app first."""
    command = command or typer.main.get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


ALL_PATHS = [list(path) for path, _ in commands()]


def test_every_option_and_argument_has_help():
    missing = [f"neodragon {' '.join(path)} {'/'.join(param.opts)}"
               for path, command in commands() for param in command.params
               if param.name != "help" and not (getattr(param, "help", None) or "").strip()]
    assert missing == []
    undocumented = [" ".join(path) for path, command in commands() if not (command.help or "").strip()]
    assert undocumented == []


@pytest.mark.parametrize("path", ALL_PATHS, ids=lambda p: " ".join(p) or "neodragon")
def test_help_is_plain(path):
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output and "Traceback" not in result.output
    assert not re.search(r"\[default: *\]", result.output)  # an empty default from eaten markup


def test_help_imports_no_torch():
    """Every command's --help in a fresh process leaves torch and the model libraries unimported."""
    script = ("import json, sys\nfrom typer.testing import CliRunner\nfrom neodragon.cli import app\n"
              f"codes = [CliRunner().invoke(app, [*p, '--help']).exit_code for p in {ALL_PATHS!r}]\n"
              f"print(json.dumps([codes, [m for m in {HEAVY!r} if m in sys.modules]]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    codes, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == [0] * len(ALL_PATHS) and heavy == [], done.stderr


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"]])
def test_real_help_process_imports_no_torch(args):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "neodragon", *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "Usage" in done.stdout, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


def test_info_counts_the_referenced_text_encoder():
    result = runner.invoke(app, ["info", "nano", "--json"])
    assert result.exit_code == 0, result.output
    encoder = {c["name"]: c for c in json.loads(result.output)["components"]}["text_encoder"]
    assert "MiniLM" in encoder["referenced"]
    assert encoder["num_elements"] > 10_000_000 and encoder["bytes_on_disk"] > 10 * 2**20  # all-MiniLM-L6-v2: 22.7M
    table = runner.invoke(app, ["info", "nano"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    row = next(line for line in table.output.splitlines() if "text_encoder" in line)
    assert f"{encoder['num_elements']:,}" in row and f"{encoder['bytes_on_disk'] / 2**20:.2f} MiB" in row
    assert "0.00 MiB" not in row and " - " not in row
