import shutil

import pytest
import torch
from conftest import FIXTURES, load_io
from safetensors.torch import load_file, save_file

from neodragon.models.vae import (
    AsymmetricCausalVideoVAE,
    CausalConv3d,
    CausalGroupNorm,
    CausalVideoDecoder,
    TAEHVDecoder,
)

VAE_DIR = FIXTURES / "causal_video_vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
ATOL = 1e-4
LEGACY_NAMES = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


@pytest.fixture(scope="module")
def vae() -> AsymmetricCausalVideoVAE:
    return AsymmetricCausalVideoVAE.from_pretrained(VAE_DIR).eval()


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_io("vae_io.safetensors")


def _tiny_causal_decoder() -> CausalVideoDecoder:
    return CausalVideoDecoder(
        in_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=(1, 1, 1, 1), norm_num_groups=4
    )


def _to_legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for new, old in LEGACY_NAMES.items():
            key = key.replace(f"attentions.0.{new}", f"attentions.0.{old}")
        out[key] = value
    return out


def test_fixture_loads_without_missing_or_unexpected_keys():
    _, info = AsymmetricCausalVideoVAE.from_pretrained(VAE_DIR, output_loading_info=True)
    assert info["missing_keys"] == []
    assert info["unexpected_keys"] == []
    assert info["mismatched_keys"] == []


@pytest.mark.parametrize(
    ("x", "mean", "logvar", "decoded"),
    [("video", "mean", "logvar", "decoded"), ("image", "image_mean", None, "image_decoded")],
)
@torch.no_grad()
def test_matches_reference(vae, io, x, mean, logvar, decoded):
    posterior = vae.encode(io[x]).latent_dist
    torch.testing.assert_close(posterior.mean, io[mean], atol=ATOL, rtol=0)
    if logvar is not None:
        torch.testing.assert_close(posterior.logvar, io[logvar], atol=ATOL, rtol=0)
    out = vae.decode(io[mean]).sample
    assert out.shape == io[decoded].shape
    torch.testing.assert_close(out, io[decoded], atol=ATOL, rtol=0)


@torch.no_grad()
def test_return_dict_false(vae, io):
    (posterior,) = vae.encode(io["image"], return_dict=False)
    (sample,) = vae.decode(posterior.mean, return_dict=False)
    torch.testing.assert_close(sample, io["image_decoded"], atol=ATOL, rtol=0)
    (recon,) = vae(io["image"], return_dict=False)
    torch.testing.assert_close(recon, io["image_decoded"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_save_load_round_trip(vae, io, tmp_path):
    vae.save_pretrained(tmp_path)
    reloaded = AsymmetricCausalVideoVAE.from_pretrained(tmp_path).eval()
    assert reloaded.config.decoder_type == "taehv"
    assert torch.equal(reloaded.encode(io["video"]).latent_dist.mean, vae.encode(io["video"]).latent_dist.mean)
    assert torch.equal(reloaded.decode(io["mean"]).sample, vae.decode(io["mean"]).sample)


@torch.no_grad()
def test_legacy_attention_keys_remapped_by_from_pretrained(vae, io, tmp_path):
    shutil.copy(VAE_DIR / "config.json", tmp_path / "config.json")
    legacy = _to_legacy(load_file(str(VAE_DIR / WEIGHTS)))
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    save_file(legacy, str(tmp_path / WEIGHTS))
    model, info = AsymmetricCausalVideoVAE.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    torch.testing.assert_close(model.eval().encode(io["video"]).latent_dist.mean, io["mean"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_legacy_attention_keys_remapped_by_load_state_dict(vae, io):
    model = AsymmetricCausalVideoVAE.from_config(vae.config).eval()
    model.load_state_dict(_to_legacy(vae.state_dict()), strict=True)
    torch.testing.assert_close(model.encode(io["video"]).latent_dist.mean, io["mean"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_posterior_sampling_is_reproducible_with_generator(vae, io):
    posterior = vae.encode(io["video"]).latent_dist
    a = posterior.sample(generator=torch.Generator().manual_seed(7))
    b = posterior.sample(generator=torch.Generator().manual_seed(7))
    c = posterior.sample(generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == io["mean"].shape


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 16, 32, 32), "1 \\+ 8 \\* k"),
        ((1, 3, 17, 36, 32), "divisible by 8"),
        ((1, 3, 32, 32), "5-D"),
        ((1, 4, 17, 32, 32), "3 channels"),
    ],
)
def test_encode_rejects_bad_inputs(vae, shape, match):
    with pytest.raises(ValueError, match=match):
        vae.encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 5, 3, 4, 4), (1, 4, 4, 4)])
def test_decode_rejects_bad_latents(vae, shape):
    with pytest.raises(ValueError, match="decode expects a 5-D latent"):
        vae.decode(torch.zeros(shape))


def test_frame_count_helpers(vae):
    assert [vae.num_latent_frames(n) for n in (1, 9, 17, 49)] == [1, 2, 3, 7]
    assert [vae.num_frames(k) for k in (1, 2, 3, 7)] == [1, 9, 17, 49]
    with pytest.raises(ValueError):
        vae.num_latent_frames(16)
    with pytest.raises(ValueError):
        vae.num_frames(0)


def test_bad_decoder_type():
    with pytest.raises(ValueError, match="decoder_type"):
        AsymmetricCausalVideoVAE(decoder_type="vqgan")


def test_causal_conv_pads_in_front_only():
    conv = CausalConv3d(1, 1, 3)
    torch.nn.init.ones_(conv.conv.weight)
    torch.nn.init.zeros_(conv.conv.bias)
    x = torch.zeros(1, 1, 4, 5, 5)
    x[:, :, 2] = 1
    y = conv(x)
    assert y.shape == x.shape
    assert y[:, :, :2].abs().max() == 0 and y[:, :, 2:].abs().min() > 0


def test_causal_group_norm_is_per_frame():
    norm = CausalGroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 5, 5)
    y = norm(x)
    x2 = x.clone()
    x2[:, :, 2] *= 10
    torch.testing.assert_close(norm(x2)[:, :, :2], y[:, :, :2])


def test_taehv_decoder_parameter_count_at_official_defaults():
    assert sum(p.numel() for p in TAEHVDecoder().parameters()) == 9_910_147


@pytest.mark.parametrize("make_decoder", [_tiny_causal_decoder, lambda: TAEHVDecoder(4, (16, 8, 8, 8))])
@pytest.mark.parametrize(("latent_frames", "frames"), [(3, 17), (1, 1)])
@torch.no_grad()
def test_decoder_shapes(make_decoder, latent_frames, frames):
    out = make_decoder().eval()(torch.randn(2, 4, latent_frames, 4, 6))
    assert out.shape == (2, 3, frames, 32, 48)


@pytest.mark.parametrize("make_decoder", [_tiny_causal_decoder, lambda: TAEHVDecoder(4, (16, 8, 8, 8))])
@torch.no_grad()
def test_decoder_is_causal(make_decoder):
    decoder = make_decoder().eval()
    z = torch.randn(1, 4, 3, 4, 4)
    changed = z.clone()
    changed[:, :, 2] += 1.0
    a, b = decoder(z), decoder(changed)
    # latent frames 0 and 1 produce output frames 0..8; latent frame 2 produces frames 9..16
    torch.testing.assert_close(a[:, :, :9], b[:, :, :9], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, :, 9:], b[:, :, 9:])


def test_causal_decoder_gradients_flow():
    decoder = _tiny_causal_decoder()
    z = torch.randn(1, 4, 2, 4, 4, requires_grad=True)
    decoder(z).square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for name, param in decoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


@torch.no_grad()
def test_vae_with_causal_decoder_round_trip_shapes(tmp_path):
    vae = AsymmetricCausalVideoVAE(
        encoder_out_channels=4,
        encoder_layers_per_block=(1, 1, 1, 1),
        encoder_block_out_channels=(8, 16, 16, 16),
        encoder_norm_num_groups=4,
        decoder_type="causal",
        decoder_block_out_channels=(8, 16, 16, 16),
        decoder_layers_per_block=(1, 1, 1, 1),
        decoder_norm_num_groups=4,
    ).eval()
    x = torch.rand(1, 3, 9, 16, 24) * 2 - 1
    z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
    assert z.shape == (1, 4, 2, 2, 3)
    out = vae.decode(z).sample
    assert out.shape == x.shape
    vae.save_pretrained(tmp_path)
    reloaded = AsymmetricCausalVideoVAE.from_pretrained(tmp_path).eval()
    assert reloaded.config.decoder_type == "causal"
    assert torch.equal(reloaded.decode(z).sample, out)


@torch.no_grad()
def test_zero_norm_groups_builds_an_encoder_without_normalisation(tmp_path):
    vae = AsymmetricCausalVideoVAE(encoder_out_channels=4, encoder_layers_per_block=(1, 1, 1, 1),
                                   encoder_block_out_channels=(8, 16, 16, 16), encoder_norm_num_groups=0,
                                   decoder_num_features=(16, 8, 8, 8)).eval()
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in vae.encoder.modules())
    assert not any("norm" in key for key in vae.encoder.state_dict())
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    mean = vae.encode(x).latent_dist.mean
    vae.save_pretrained(tmp_path)
    torch.testing.assert_close(AsymmetricCausalVideoVAE.from_pretrained(tmp_path).encode(x).latent_dist.mean, mean)
