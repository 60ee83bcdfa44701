"""The trained nano teacher that ships in the package: present, small, fp16, and the default model; its first-frame
generator runs hybrid mode on request."""

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neodragon.presets import bundled_weights, load_pipeline

BUDGET_BYTES = 25 * 2**20


@pytest.fixture(scope="module")
def bundle() -> Path:
    folder = bundled_weights("nano")
    assert folder is not None, "the trained nano weights must be bundled in src/neodragon/weights/nano"
    return folder


def test_bundle_is_small_fp16_safetensors(bundle):
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= BUDGET_BYTES
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    for path in weights:  # float16 everywhere; int32 only as the flat indices of shipped SHiRA adapters
        dtypes = {tensor.dtype for tensor in load_file(str(path)).values()}
        assert dtypes == {torch.float16} or (dtypes == {torch.float16, torch.int32} and "adapters" in path.parts), path


def test_default_model_is_the_bundled_teacher(bundle):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline("nano")
    assert not [w for w in caught if "random" in str(w.message)], "fell back to random weights"
    assert pipe.mode == "monolithic" and pipe.context_adapter is None
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    video = pipe("a red circle moving to the right", generator=generator, num_inference_steps=1,
                 video_num_inference_steps=1, output_type="pt").frames
    assert video.shape == (1, 17, 3, 128, 128) and torch.isfinite(video).all()



def test_bundled_hybrid_mode_makes_frame_0_with_the_first_frame_generator(bundle):
    from neodragon.models.first_frame import LatentFirstFrameGenerator

    pipe = load_pipeline("nano", mode="hybrid")
    assert isinstance(pipe.first_frame_generator, LatentFirstFrameGenerator)
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_frames=9, video_num_inference_steps=1, output_type="latent")
    latents = pipe("a red circle moving to the right", generator=torch.Generator().manual_seed(0), **run).frames
    frame0 = pipe.first_frame_generator.first_frame_latents(pipe, ["a red circle moving to the right"], "", 128, 128,
                                                            torch.Generator().manual_seed(0))
    assert latents.shape == (1, 8, 2, 16, 16)
    torch.testing.assert_close(latents[:, :, :1], frame0)
