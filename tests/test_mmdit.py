import pytest
import torch
from conftest import FIXTURES, load_io

from neodragon.models.mmdit import PyramidMMDiT
from neodragon.presets import nano_teacher_preset


@pytest.fixture(scope="module")
def dit():
    model, info = PyramidMMDiT.from_pretrained(FIXTURES / "diffusion_transformer", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    return model


def run(model, io, case, clips, **overrides):
    kwargs = dict(encoder_hidden_states=io["ctx"], encoder_attention_mask=io["mask"],
                  pooled_projections=io["pooled"], timestep_ratio=io[f"{case}_t"])
    kwargs.update(overrides)
    with torch.no_grad():
        return model(sample=[[io[c] for c in clips]], **kwargs)[0]


@pytest.mark.parametrize("case,clips", [("c0", ["c0_in0"]), ("c1", ["c1_in0", "c1_in1", "c1_in2", "c1_in3"])])
def test_matches_reference(dit, case, clips):
    io = load_io("dit_io.safetensors")
    out = run(dit, io, case, clips)
    torch.testing.assert_close(out, io[f"{case}_out0"], atol=1e-4, rtol=0)


def test_history_and_padding_change_the_output(dit):
    io = load_io("dit_io.safetensors")
    clips = ["c1_in0", "c1_in1", "c1_in2", "c1_in3"]
    base = run(dit, io, "c1", clips)
    io_hist = dict(io, c1_in2=io["c1_in2"] + 1.0)
    assert not torch.allclose(base, run(dit, io_hist, "c1", clips))
    # padded text tokens are masked out: changing them does not change the prediction of sample 1
    ctx = io["ctx"].clone()
    ctx[1, 4:] += 5.0
    torch.testing.assert_close(run(dit, io, "c1", clips, encoder_hidden_states=ctx)[1], base[1])


def test_packed_stages_equal_separate_calls(dit):
    io = load_io("dit_io.safetensors")
    c0 = [io["c0_in0"]]
    c1 = [io[c] for c in ["c1_in0", "c1_in1", "c1_in2", "c1_in3"]]
    t = torch.stack([io["c0_t"], io["c1_t"]], dim=1).flatten()  # interleaved by stage
    interleave = lambda x: torch.stack([x, x], dim=1).flatten(0, 1)  # noqa: E731
    with torch.no_grad():
        packed = dit(sample=[c0, c1], encoder_hidden_states=interleave(io["ctx"]),
                     encoder_attention_mask=interleave(io["mask"]), pooled_projections=interleave(io["pooled"]),
                     timestep_ratio=t)
    torch.testing.assert_close(packed[0], io["c0_out0"], atol=1e-4, rtol=0)
    torch.testing.assert_close(packed[1], io["c1_out0"], atol=1e-4, rtol=0)


def test_save_load_round_trip_and_context_embedder(dit, tmp_path):
    io = load_io("dit_io.safetensors")
    dit.save_pretrained(tmp_path / "dit")
    again = PyramidMMDiT.from_pretrained(tmp_path / "dit")
    torch.testing.assert_close(run(again, io, "c0", ["c0_in0"]), run(dit, io, "c0", ["c0_in0"]), atol=0, rtol=0)

    teacher = PyramidMMDiT.from_config(dit.config, use_context_embedder=True, joint_attention_dim=12)
    teacher.save_pretrained(tmp_path / "teacher")
    loaded = PyramidMMDiT.from_pretrained(tmp_path / "teacher")
    assert loaded.context_embedder is not None and loaded.context_embedder.in_features == 12
    raw = torch.randn(2, 6, 12)
    out = run(loaded, io, "c0", ["c0_in0"], encoder_hidden_states=raw)
    assert out.shape == io["c0_out0"].shape


def test_gradient_checkpointing_matches(dit):
    io = load_io("dit_io.safetensors")
    model = PyramidMMDiT.from_config(dit.config)
    model.load_state_dict(dit.state_dict())
    kwargs = dict(sample=[[io["c0_in0"]]], encoder_hidden_states=io["ctx"], encoder_attention_mask=io["mask"],
                  pooled_projections=io["pooled"], timestep_ratio=io["c0_t"])
    plain = model(**kwargs)[0].square().mean()
    plain.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(**kwargs)[0].square().mean().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_official_parameter_count():
    with torch.device("meta"):
        model = PyramidMMDiT()
    learnable = sum(p.numel() for p in model.parameters())
    assert learnable == 1_512_155_200
    assert model.pos_embed.pos_embed.shape == (1, 192 * 192, 1536)


@pytest.mark.parametrize("bad", [
    lambda io: [[io["c0_in0"][:, :3]]],  # wrong channels
    lambda io: [[io["c0_in0"][..., :7, :7]]],  # not a multiple of the patch size
    lambda io: [[]],
    lambda io: [],
])
def test_bad_inputs(dit, bad):
    io = load_io("dit_io.safetensors")
    with pytest.raises(ValueError):
        dit(sample=bad(io), encoder_hidden_states=io["ctx"], encoder_attention_mask=io["mask"],
            pooled_projections=io["pooled"], timestep_ratio=io["c0_t"])


def test_unsupported_config():
    with pytest.raises(NotImplementedError, match="pos_embed_type"):
        PyramidMMDiT(num_layers=1, num_attention_heads=1, attention_head_dim=8, pos_embed_type="rope")


def test_compile_repeated_blocks_compiles_each_transformer_block_and_keeps_the_keys():
    dit = PyramidMMDiT(**nano_teacher_preset().dit)
    keys = list(dit.state_dict())
    dit.compile_repeated_blocks(dynamic=True)  # lazy: nothing compiles until the first forward
    compiled = [m for m in dit.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled == list(dit.transformer_blocks)
    assert list(dit.state_dict()) == keys  # checkpoints of a compiled run load into a plain DiT
