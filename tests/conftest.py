import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "reference-v1"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def load_io(name: str) -> dict[str, torch.Tensor]:
    """Golden tensors of the reference implementation (see fixtures/reference-v1/README.md)."""
    return load_file(str(FIXTURES / name))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield


def run_two_processes(run_dir: Path, *cli_args: str, config_file: Path | None = None) -> list[dict]:
    """``neodragon <cli_args> -o run_dir`` under ``accelerate launch`` with two CPU processes (DDP, or what
    ``config_file`` says); checks that it succeeded as one process group of two and returns the run's log."""
    from neodragon.training.trainer import read_log

    strategy = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *strategy, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "neodragon", *cli_args, "-o", str(run_dir)]
    result = subprocess.run(command, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(run_dir)
    assert log[-1]["processes"] == 2
    return log
