import numpy as np
import pytest
import torch

from neodragon.models.sentence import SentenceTextEncoder, packaged_model_dir
from neodragon.pipelines import NeodragonPipeline
from neodragon.presets import create_random_checkpoint, nano_teacher_preset


@pytest.fixture(scope="module")
def encoder():
    return SentenceTextEncoder.from_source("all-MiniLM-L6-v2", max_sequence_length=16)


def test_packaged_minilm_encodes_offline(encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = encoder.encode(["a red circle moving to the right", "a blue square"])
    assert enc.tokens.shape == (2, 16, 384) and enc.pooled.shape == (2, 384)
    assert enc.mask.sum(1).tolist()[1] < enc.mask.sum(1).tolist()[0]
    # the pooled vector is the mean of the real tokens only
    real = enc.mask[1].bool()
    torch.testing.assert_close(enc.pooled[1], enc.tokens[1][real].mean(0))
    # a real pretrained encoder: paraphrases are closer than unrelated captions
    captions = ["a red circle moving right", "a red disc going to the right", "a green star spinning"]
    a, b, c = encoder.encode(captions).pooled
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > cos(a, c, dim=0)


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown packaged"):
        packaged_model_dir("gpt-17")
    with pytest.raises(FileNotFoundError):
        SentenceTextEncoder.from_source("/no/such/folder")


def test_teacher_checkpoint_generates_with_context_embedder(tmp_path):
    root = create_random_checkpoint(nano_teacher_preset(), tmp_path / "teacher")
    assert not (root / "context_adapter_multistep_t2v").exists()
    assert (root / "text_encoder" / "sentence_encoder.json").is_file()
    assert not list((root / "text_encoder").glob("*.safetensors"))  # weights come from the package
    pipe = NeodragonPipeline.from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.mode == "monolithic" and pipe.context_adapter is None
    assert pipe.transformer.context_embedder.in_features == 384
    frames = pipe("a red circle", num_frames=9, num_inference_steps=1, video_num_inference_steps=1,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (1, 9, 128, 128, 3) and np.isfinite(frames).all()
    with pytest.raises(FileNotFoundError, match="mode='monolithic'"):
        NeodragonPipeline.from_pretrained(root, mode="hybrid")
