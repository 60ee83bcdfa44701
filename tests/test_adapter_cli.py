import json

import torch
from peft import get_peft_model
from test_shira import randomized, tiny_dit
from typer.testing import CliRunner

from neodragon.adapters.foura import FouraConfig
from neodragon.adapters.lora import lora_param_count, matching_lora_config, matching_lora_ranks
from neodragon.adapters.shira import MaskSpec, ShiraAdapter, build_shira
from neodragon.cli.adapter import app
from neodragon.models.mmdit import DIT_TARGETS, PyramidMMDiT
from neodragon.presets import nano_student_preset

runner = CliRunner()


def test_lora_and_foura_baselines_get_the_same_budget():
    adapter = build_shira(tiny_dit(), MaskSpec(r=2))
    lora = get_peft_model(tiny_dit(), matching_lora_config(adapter))
    assert lora_param_count(lora) == adapter.num_params
    foura = get_peft_model(tiny_dit(), FouraConfig(r=2, target_modules=DIT_TARGETS))
    assert sum(p.numel() for p in foura.parameters() if p.requires_grad) == adapter.num_params
    # a density budget gets the nearest rank per layer: 102 / (32 + 32) -> 2, 410 / (32 + 128) -> 3
    dense = build_shira(tiny_dit(), MaskSpec(density=0.1))
    ranks = matching_lora_ranks(dense)
    assert {ranks[n] for n in ranks if "ff" in n} == {3} and {ranks[n] for n in ranks if "ff" not in n} == {2}
    lora = get_peft_model(tiny_dit(), matching_lora_config(dense))
    assert lora_param_count(lora) == sum(ranks[n] * sum(dense.shapes[n]) for n in ranks)


def test_info_convert_and_fuse(tmp_path):
    torch.manual_seed(0)
    nano = PyramidMMDiT(**nano_student_preset().dit)
    a = randomized(build_shira(nano, MaskSpec(r=1, strategy="wm")), seed=1)
    b = randomized(build_shira(nano, MaskSpec(r=1, strategy="random", target_modules=["to_q", "to_k"])), seed=2)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")

    result = runner.invoke(app, ["info", str(tmp_path / "a.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["parameters"] == a.num_params and summary["metadata"]["strategy"] == "wm"
    assert summary["bytes_per_entry"] < 9

    assert runner.invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "peft")]).exit_code == 0
    result = runner.invoke(app, ["info", str(tmp_path / "peft"), "--json"])
    assert json.loads(result.output)["format"] == "PEFT SHIRA" and json.loads(result.output)["r"] == 1
    result = runner.invoke(app, ["convert", str(tmp_path / "peft"), str(tmp_path / "back.safetensors")])
    assert result.exit_code == 0, result.output
    back = ShiraAdapter.load(tmp_path / "back.safetensors")
    assert all(torch.equal(back.indices[n], a.indices[n]) and torch.equal(back.values[n], a.values[n])
               for n in a.indices)

    result = runner.invoke(app, ["fuse", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                 "-o", str(tmp_path / "ab.safetensors"), "--weights", "1,0.5", "--metrics"])
    assert result.exit_code == 0, result.output
    assert "AWOM" in result.output
    fused = ShiraAdapter.load(tmp_path / "ab.safetensors")
    assert fused.shapes == a.shapes and fused.metadata["weights"] == [1.0, 0.5]

    result = runner.invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "peft")])
    assert result.exit_code == 1 and "already exists" in " ".join(result.output.split())
    result = runner.invoke(app, ["convert", str(tmp_path / "peft"), str(tmp_path / "x.safetensors"), "--model",
                                 "official"])
    assert result.exit_code == 1 and "different model configuration" in " ".join(result.output.split())
