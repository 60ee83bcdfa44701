import pytest
import torch
import torch.nn.functional as F

from neodragon.models.sr import QuickSRNet


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_param_counts_at_2x():
    assert _count(QuickSRNet.small()) == 22_860
    assert _count(QuickSRNet.medium()) == 50_604
    large = QuickSRNet.large()
    assert _count(large) == 414_960
    assert abs(_count(large) - 414_900) / 414_900 < 0.005
    assert large.config.num_channels == 64 and large.config.use_ito_connection


def test_image_and_video_shapes():
    model = QuickSRNet.small()
    image = torch.rand(2, 3, 8, 12) * 2 - 1
    out = model(image)
    assert out.shape == (2, 3, 16, 24)
    assert out.min() >= -1 and out.max() <= 1
    video = torch.rand(2, 3, 4, 8, 12) * 2 - 1
    out_video = model(video)
    assert out_video.shape == (2, 3, 4, 16, 24)
    # frames are independent: a video equals its frames upscaled one by one
    torch.testing.assert_close(out_video[:, :, 2], model(video[:, :, 2]))


def test_untrained_anchor_model_is_nearest_upsampling():
    model = QuickSRNet.large()
    x = torch.rand(1, 3, 6, 5) * 2 - 1
    torch.testing.assert_close(model(x), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_scale_factor_3():
    model = QuickSRNet.medium(scale_factor=3)
    assert model(torch.zeros(1, 3, 4, 4)).shape == (1, 3, 12, 12)


def test_input_validation():
    model = QuickSRNet.small()
    with pytest.raises(ValueError):
        model(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError):
        model(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError):
        QuickSRNet(activation="nope")


def test_save_load_round_trip(tmp_path):
    model = QuickSRNet.large(num_channels=8, num_intermediate_layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = QuickSRNet.from_pretrained(tmp_path)
    public = [k for k in model.config if not k.startswith("_")]
    assert {k: loaded.config[k] for k in public} == {k: model.config[k] for k in public}
    x = torch.rand(1, 3, 5, 7) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
