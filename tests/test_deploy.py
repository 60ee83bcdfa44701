"""Deployment: static ONNX export, the ONNX Runtime pipeline, W8A16 quantisation and SQNR, on the release's layout
at reduced widths (CLIP + DT5 text stack, ContextAdapter, DiT, TAEHV decoder, QuickSRNet)."""

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from neodragon.cli import app
from neodragon.deploy.export import ATOL, RTOL, Manifest, export_model
from neodragon.deploy.quantize import mask_nodes, quantize_folder, record_feeds, sqnr_db
from neodragon.deploy.runtime import load_onnx_pipeline
from neodragon.models.first_frame import LatentFirstFrameGenerator, latent_unet
from neodragon.pipelines.neodragon import ModeDefaults, NeodragonPipeline, PipelineConfig
from neodragon.presets import create_random_checkpoint, reduced_official_preset

runner = CliRunner()
PROMPT = "a red circle moving to the right"


def _preset():
    preset = reduced_official_preset()
    pipeline = replace(preset.pipeline, height=64, width=64, num_frames=9, default_mode="monolithic",
                       modes={**preset.pipeline.modes, "monolithic": ModeDefaults([2, 1, 1], [1, 1, 1], 3.0, 2.0)})
    return replace(preset, pipeline=pipeline, modes=("monolithic",), ssd_1b=None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return create_random_checkpoint(_preset(), tmp_path_factory.mktemp("deploy-model"))


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "fp32"
    export_model(model, out)
    return out


@pytest.fixture(scope="module")
def quantised(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "w8a16"
    quantize_folder(exported, out, calibration_prompts=["a blue square", "two green triangles moving up"],
                    heldout_prompts=[PROMPT], keep_float=2)
    return out


def _video(pipe, seed=3):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="pt", super_resolution=True).frames


def test_export_writes_every_graph_type_checked_against_pytorch(exported):
    manifest = Manifest.load(exported)
    kinds = {spec.component for spec in manifest.graphs.values()}
    assert kinds == {"text_encoder", "context_adapter", "transformer", "vae_decoder", "super_resolution"}
    # 9 frames -> 2 latent frames x 3 stages, each (stage, history) shape set its own graph
    dits = [s for s in manifest.graphs.values() if s.component == "transformer"]
    assert sorted((s.unit, s.stage) for s in dits) == [(u, s) for u in range(2) for s in range(3)]
    assert manifest.dit_graph(1, 2) == "transformer_f1_s2"
    assert len(manifest.graphs["transformer_f1_s0"].inputs) == 4 + 2  # conditioning + one history clip + current
    for spec in manifest.graphs.values():
        assert (exported / spec.file).is_file()
        assert spec.check["max_abs_error"] <= ATOL + RTOL * spec.check["max_abs_output"]
        graph = onnx.load(exported / spec.file)
        assert all(d.dim_value > 0 for i in graph.graph.input for d in i.type.tensor_type.shape.dim)  # static


def test_onnx_pipeline_matches_pytorch_for_the_same_seed(model, exported):
    reference = _video(NeodragonPipeline.from_pretrained(model))
    graphs = _video(load_onnx_pipeline(exported))
    assert graphs.shape == reference.shape == (1, 9, 3, 128, 128)
    assert (graphs - reference).abs().max() < 2e-3
    assert torch.equal(_video(load_onnx_pipeline(exported)), graphs)  # same seed, same video


def test_mask_path_found_in_the_dit_only(exported):
    dit = mask_nodes(onnx.load(exported / "graphs" / "transformer_f1_s1.onnx"))
    assert any("Softmax" in name for name in dit) and any("Where" in name for name in dit)
    assert mask_nodes(onnx.load(exported / "graphs" / "vae_decoder.onnx")) == []


def test_sqnr_of_known_signals():
    x = np.ones(100, np.float32)
    assert sqnr_db([x], [x + 0.1]) == pytest.approx(20.0)
    assert sqnr_db([x, x], [x + 0.01, x - 0.01]) == pytest.approx(40.0)
    assert sqnr_db([x], [x]) == math.inf


def test_quantised_graphs_are_w8a16(quantised):
    manifest = Manifest.load(quantised)
    assert manifest.scheme == "w8a16"
    for spec in manifest.graphs.values():
        model = onnx.load(quantised / spec.file)
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        if spec.component == "text_encoder":  # kept in fp16, as the paper keeps its text encoders
            assert spec.precision == "fp16"
            assert any(a.dtype == np.float16 for a in inits.values())
            assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
            continue
        assert spec.precision == "w8a16"
        weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                     and inits[n.input[0]].dtype == np.int8]
        assert weight_dq, spec.name
        assert any(inits[n.input[1]].ndim == 1 and inits[n.input[1]].size > 1 for n in weight_dq)  # per channel
        activation_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert activation_q and all(inits[n.input[2]].dtype == np.uint16 for n in activation_q)


def test_quantisation_report_and_generation(quantised, exported):
    report = json.loads((quantised / "sqnr.json").read_text())
    assert set(report["graphs"]) == set(Manifest.load(exported).graphs)
    assert all(math.isfinite(row["sqnr_db"]) and row["sqnr_db"] > 0 for row in report["graphs"].values())
    assert report["sensitivity"]["graph"] == report["worst_graph"] and report["sensitivity"]["activations"]
    assert report["lift"]["graph"] == report["worst_graph"]
    assert "| graph | precision" in (quantised / "sqnr.md").read_text()
    video = _video(load_onnx_pipeline(quantised))
    reference = _video(load_onnx_pipeline(exported))
    assert sqnr_db([reference.numpy()], [video.numpy()]) > 10


def test_generate_cli_runs_the_graphs(exported, tmp_path):
    out = tmp_path / "clip.mp4"
    result = runner.invoke(app, ["generate", PROMPT, "--model", str(exported), "--backend", "onnxruntime",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and "monolithic mode" in result.output


def test_clear_errors(model, exported, tmp_path):
    def generate(folder, *extra):
        return runner.invoke(app, ["generate", PROMPT, "--model", str(folder), "-o", str(tmp_path / "x.mp4"), *extra])

    assert "--backend onnxruntime" in generate(exported).output
    assert "deploy export" in generate(model, "--backend", "onnxruntime").output
    assert "exported for another video size" in generate(exported, "--backend", "onnxruntime", "--num-frames",
                                                         "17").output
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "graphs" / "vae_decoder.onnx").unlink()
    result = generate(broken, "--backend", "onnxruntime")
    assert result.exit_code != 0 and "vae_decoder.onnx" in result.output and "missing" in result.output
    shutil.copy2(exported / "graphs" / "vae_decoder.onnx", broken / "graphs" / "vae_decoder.onnx")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["graphs"]["vae_decoder"]["inputs"][0]["shape"][-1] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert "does not match its manifest" in generate(broken, "--backend", "onnxruntime").output
    (broken / "manifest.json").write_text("{}")
    assert "not a valid deployment manifest" in generate(broken, "--backend", "onnxruntime").output
    assert "already quantised" in str(_raises(lambda: quantize_folder(_quantised_copy(exported, tmp_path),
                                                                       tmp_path / "q2", calibration_prompts=["a"],
                                                                       heldout_prompts=["b"])))


def _raises(call) -> Exception:
    with pytest.raises(ValueError) as info:
        call()
    return info.value


def _quantised_copy(exported, tmp_path):
    folder = tmp_path / "marked"
    shutil.copytree(exported, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["scheme"] = "w8a16"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_hybrid_mode_exports_the_first_frame_unet(model, tmp_path):
    hybrid = tmp_path / "hybrid"
    shutil.copytree(model, hybrid)
    torch.manual_seed(0)
    LatentFirstFrameGenerator(latent_unet(16, 20, 24, 8, (16, 32))).save_pretrained(hybrid)
    PipelineConfig.load(hybrid).with_latent_first_frame(2, 3.0).save(hybrid)
    manifest = export_model(hybrid, tmp_path / "fp32")
    assert manifest.mode == "hybrid" and manifest.graphs["first_frame"].component == "first_frame"
    units = {s.unit for s in manifest.graphs.values() if s.component == "transformer"}
    assert units == {1}  # frame 0 comes from the UNet
    reference = NeodragonPipeline.from_pretrained(hybrid)
    assert reference.mode == "hybrid"
    assert (_video(load_onnx_pipeline(tmp_path / "fp32")) - _video(reference)).abs().max() < 2e-3
    assert any("Softmax" in n for n in mask_nodes(onnx.load(tmp_path / "fp32" / "graphs" / "first_frame.onnx")))
    feeds = record_feeds(tmp_path / "fp32", [PROMPT])
    assert len(feeds["first_frame"]) == 2 * 2  # 2 Euler steps x (negative, prompt) rows: calibration sees it


def test_info_lists_the_graphs(quantised):
    result = runner.invoke(app, ["info", str(quantised), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["scheme"] == "w8a16" and info["video"] == [9, 64, 64]
    assert {g["graph"] for g in info["graphs"]} == set(Manifest.load(quantised).graphs)
    assert all(g["sqnr_db"] > 0 and g["bytes"] > 0 for g in info["graphs"])
    assert "transformer_f1_s2" in runner.invoke(app, ["info", str(quantised)]).output


def _hybrid_preset(**pipeline):
    preset = reduced_official_preset()
    return replace(preset, pipeline=replace(preset.pipeline, height=64, width=64, num_frames=9, **pipeline))


def test_hybrid_mode_with_ssd1b_first_frame(tmp_path):
    model = create_random_checkpoint(_hybrid_preset(), tmp_path / "model")  # the release's hybrid layout
    manifest = export_model(model, tmp_path / "fp32")
    kinds = {spec.component for spec in manifest.graphs.values()}
    assert {"first_frame_text_encoder", "first_frame_unet", "first_frame_vae_decoder", "vae_encoder"} <= kinds
    assert {s.unit for s in manifest.graphs.values() if s.component == "transformer"} == {1}
    assert (_video(load_onnx_pipeline(tmp_path / "fp32"))
            - _video(NeodragonPipeline.from_pretrained(model))).abs().max() < 2e-3
    feeds = record_feeds(tmp_path / "fp32", [PROMPT])
    assert len(feeds["first_frame_unet"]) == 4 and len(feeds["vae_encoder"]) == 1  # 4 LCM steps, one image

    report = quantize_folder(tmp_path / "fp32", tmp_path / "w8a16", calibration_prompts=["a blue square"],
                             heldout_prompts=[PROMPT])
    precision = {name: row["precision"] for name, row in report["graphs"].items()}
    assert precision["first_frame_text_encoder_1"] == precision["first_frame_text_encoder_2"] == "fp16"
    assert precision["first_frame_unet"] == precision["first_frame_vae_decoder"] == precision["vae_encoder"] == "w8a16"
    table = (tmp_path / "w8a16" / "sqnr.md").read_text()
    assert "| first_frame_unet | w8a16 |" in table and "| 33 |" in table and "| 40 |" in table
    video = _video(load_onnx_pipeline(tmp_path / "w8a16"))
    assert video.shape == (1, 9, 3, 128, 128) and torch.isfinite(video).all()


def test_hybrid_mode_with_the_pyramid_dit_first_frame(tmp_path):
    monolithic = ModeDefaults([2, 1, 1], [1, 1, 1], 3.0, 2.0)
    preset = replace(_hybrid_preset(first_frame="pyramid_dit", modes={**reduced_official_preset().pipeline.modes,
                                                                       "monolithic": monolithic}), ssd_1b=None)
    model = create_random_checkpoint(preset, tmp_path / "model")  # the nano student's hybrid layout
    manifest = export_model(model, tmp_path / "fp32")
    first_frame = [s for s in manifest.graphs.values() if s.component == "first_frame_transformer"]
    assert sorted((s.unit, s.stage) for s in first_frame) == [(0, 0), (0, 1), (0, 2)]
    assert "first_frame_context_adapter" in manifest.graphs
    assert (_video(load_onnx_pipeline(tmp_path / "fp32"))
            - _video(NeodragonPipeline.from_pretrained(model))).abs().max() < 2e-3
    feeds = record_feeds(tmp_path / "fp32", [PROMPT])
    assert len(feeds["first_frame_transformer_f0_s0"]) == 2 * 2  # 2 steps x (negative, prompt): CFG 3 on frame 0


def test_ssd1b_unet_with_a_guidance_embedding(tmp_path):
    """An LCM-distilled SDXL UNet embeds the guidance scale (``time_cond_proj_dim``): the graph takes it as an
    input and the runtime feeds what SDXL's pipeline computes."""
    from diffusers import UNet2DConditionModel

    model = create_random_checkpoint(_hybrid_preset(), tmp_path / "model")
    config = {k: v for k, v in UNet2DConditionModel.load_config(model / "ssd_1b_unet").items()
              if not k.startswith("_")}
    torch.manual_seed(1)
    UNet2DConditionModel(**{**config, "time_cond_proj_dim": 8}).save_pretrained(model / "ssd_1b_unet")
    manifest = export_model(model, tmp_path / "fp32")
    assert manifest.graphs["first_frame_unet"].inputs[-1].name == "timestep_cond"
    assert (_video(load_onnx_pipeline(tmp_path / "fp32"))
            - _video(NeodragonPipeline.from_pretrained(model))).abs().max() < 2e-3
