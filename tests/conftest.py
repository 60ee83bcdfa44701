from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "reference-v1"


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
