"""Post-training W8A16 quantisation of an exported folder with ONNX Runtime's static QDQ quantiser, SQNR per graph
and per-layer sensitivity (the paper's §4.2, with ONNX Runtime in place of AIMET).

- Weights: 8-bit, symmetric, per output channel. Activations: 16-bit, asymmetric, min-max ranges from calibration
  feeds, i.e. the inputs every graph receives while the fp32 graphs generate videos for the calibration prompts.
- The text encoder stays fp16, as in the paper (its weights in fp16, inputs and outputs in float32).
- The additive attention mask (``-inf``, the dtype's lowest value or -10000 where attention is blocked) cannot
  share a 16-bit grid with attention scores, so the mask, the score + mask sums and the softmax reading them stay
  in float; the paper instead lowered the mask value (§7.1, trick 4).
- SQNR = 20 log10(||x|| / ||x - y||) between the fp32 graph's outputs x and the quantised graph's y, over all the
  feeds of held-out prompts (the evaluation prompts, never used for calibration).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from ..utils.video import atomic_folder
from .export import GraphSpec, Manifest, copy_runtime_files
from .runtime import load_onnx_pipeline, session

SCHEMES = ("w8a16",)
FP16_COMPONENTS = ("text_encoder", "first_frame_text_encoder")  # the paper keeps CLIP-L, CLIP-G and DT5 in fp16
# The paper's deployed SQNR per graph kind (§4.2, Table 9); DiT stages lowest to highest resolution. A pyramid-DiT
# first frame is the same network kind as the video DiT (the paper has none; its frame 0 comes from SSD-1B).
PAPER_SQNR_DB = {"vae_decoder": 35.0, "vae_encoder": 40.0, "transformer": (29.0, 22.0, 24.0),
                 "first_frame_transformer": (29.0, 22.0, 24.0), "first_frame_unet": 33.0,
                 "first_frame_vae_decoder": 31.0, "super_resolution": 48.0}
MASK_VALUE = 1e4  # a constant at least this large in a Where or Mul that feeds an attention sum is a mask fill

Feeds = list[dict[str, np.ndarray]]


def calibration_prompt_set(count: int, seed: int = 0) -> list[str]:
    """The documented calibration set: ``count`` prompts from ShapesWorld's caption grammar (every split, style and
    phrasing; ``distillation_prompts`` with seed ``seed + 1``), never a prompt of nano-eval or nano-heldout."""
    from ..eval.prompts import load_prompt_set
    from ..training.text_distillation import distillation_prompts

    exclude = [e.caption for name in ("nano-eval", "nano-heldout") for e in load_prompt_set(name)]
    return distillation_prompts(count, seed=seed + 1, exclude=exclude)


def heldout_prompt_set(count: int) -> list[str]:
    """The first ``count`` prompts of nano-eval (disjoint from the calibration set) for the SQNR."""
    from ..eval.prompts import load_prompt_set

    return [e.caption for e in load_prompt_set("nano-eval")[:count]]


def record_feeds(folder: str | Path, prompts: Sequence[str], seed: int = 0, max_feeds: int | None = None,
                 threads: int | None = None) -> dict[str, Feeds]:
    """The inputs each graph of ``folder`` receives while generating ``prompts`` (seed ``seed + i``), with SR when
    the folder has it; at most ``max_feeds`` per graph, taken evenly over the run."""
    pipe = load_onnx_pipeline(folder, threads)
    pipe.set_progress_bar_config(disable=True)
    graphs = list(pipe.onnx_graphs.values())
    for graph in graphs:
        graph.recorder = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + index)
        pipe(prompt, generator=generator, output_type="pt", super_resolution=pipe.super_resolution is not None)
    return {g.spec.name: _evenly(g.recorder, max_feeds) for g in graphs}


def _evenly(items: list, count: int | None) -> list:
    if count is None or len(items) <= count:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int)]


class _Reader(CalibrationDataReader):
    """Recorded feeds as ONNX Runtime's calibration reader."""

    def __init__(self, feeds: Feeds):
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def mask_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes carrying an additive attention mask: a Where or Mul with a huge constant, and everything downstream of
    it up to and including the Softmax that reads it."""
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)

    def is_fill(name: str) -> bool:
        value = constants.get(name)
        return value is not None and value.dtype.kind == "f" and bool(np.abs(value).max(initial=0) >= MASK_VALUE)

    # the DiT fills blocked positions with a Where, diffusers' UNet scales (1 - mask) by -10000 with a Mul
    front = [n for n in model.graph.node if n.op_type in ("Where", "Mul") and any(is_fill(i) for i in n.input)]
    found: dict[str, None] = {}
    while front:
        node = front.pop()
        if node.name in found:
            continue
        found[node.name] = None
        if node.op_type != "Softmax":
            front += [user for out in node.output for user in users.get(out, [])]
    return list(found)


def quantize_graph(source: Path, target: Path, calibration: Feeds, float_nodes: Iterable[str] = ()) -> list[str]:
    """W8A16 QDQ copy of one graph; returns the nodes left in float (the mask path and ``float_nodes``)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    keep = list(dict.fromkeys([*mask_nodes(onnx.load(source, load_external_data=False)), *float_nodes]))
    large = source.with_suffix(".onnx.data").exists()
    with _quiet_root_logger():  # one warning per 1-D weight (no channel axis: per-tensor scale) and call
        quantize_static(source, target, _Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt16, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                        use_external_data_format=large,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return keep


@contextmanager
def _quiet_root_logger():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fp16_graph(source: Path, target: Path) -> None:
    """fp16 weights and compute, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(source), keep_io_types=True)
    onnx.save(model, target, save_as_external_data=source.with_suffix(".onnx.data").exists())


def sqnr_db(reference: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """20 log10(||x|| / ||x - y||) over all elements of all pairs (inf when identical)."""
    signal = math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64))) for x in reference))
    noise = math.sqrt(sum(float(np.sum(np.square(x.astype(np.float64) - y))) for x, y in zip(reference, test,
                                                                                          strict=True)))
    return math.inf if noise == 0 else 20 * math.log10(signal / noise)


def graph_sqnr(reference: Path, test: Path, feeds: Feeds, threads: int | None = None) -> float:
    """SQNR of ``test``'s first output against ``reference``'s on the same feeds."""
    ref_session, test_session = session(reference, threads), session(test, threads)
    outputs = [(ref_session.run(None, f)[0], test_session.run(None, f)[0]) for f in feeds]
    return sqnr_db([x for x, _ in outputs], [y for _, y in outputs])


def quantize_folder(source: str | Path, out: str | Path, scheme: str = "w8a16", calibration_prompts: Sequence[str] = (),
                    heldout_prompts: Sequence[str] = (), max_calibration_feeds: int = 300, max_heldout_feeds: int = 64,
                    keep_float: int = 0, seed: int = 0, threads: int | None = None, overwrite: bool = False) -> dict:
    """Quantise every graph of an exported fp32 folder into ``out`` and write ``sqnr.json`` / ``sqnr.md`` there.

    The graph with the lowest SQNR gets a per-layer ``sensitivity`` analysis; with ``keep_float > 0`` it is quantised
    again with the nodes reading its ``keep_float`` most sensitive weights left in float, the better of the two is
    kept and both SQNRs are reported.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown scheme {scheme!r}; supported: {', '.join(SCHEMES)}.")
    if not calibration_prompts or not heldout_prompts:
        raise ValueError("Quantisation needs calibration prompts and held-out prompts (for the SQNR).")
    source, out = Path(source), Path(out)
    manifest = Manifest.load(source)
    if manifest.scheme != "fp32":
        raise ValueError(f"{source} is already quantised ({manifest.scheme}); quantise the fp32 export.")
    calibration = record_feeds(source, calibration_prompts, seed, max_calibration_feeds, threads)
    heldout = record_feeds(source, heldout_prompts, seed + 10_000, max_heldout_feeds, threads)
    with atomic_folder(out, overwrite) as tmp:
        copy_runtime_files(source, tmp)
        (tmp / "graphs").mkdir()
        rows = {}
        for name, spec in manifest.graphs.items():
            rows[name] = _quantize_one(source, tmp, spec, calibration[name], heldout[name], threads)
        worst = min((n for n in rows if rows[n]["precision"] == scheme), key=lambda n: rows[n]["sqnr_db"])
        report = {"scheme": scheme, "source": str(source), "calibration": {
            "prompts": len(calibration_prompts), "seed": seed, "max_feeds_per_graph": max_calibration_feeds,
            "feeds": {n: len(f) for n, f in calibration.items()}}, "heldout_prompts": len(heldout_prompts),
            "graphs": rows, "worst_graph": worst}
        report["sensitivity"] = sensitivity(source / manifest.graphs[worst].file, tmp / manifest.graphs[worst].file,
                                            heldout[worst][:8], threads)
        if keep_float:
            report["lift"] = _lift(source, tmp, manifest.graphs[worst], report, calibration[worst], heldout[worst],
                                   keep_float, threads)
        manifest.scheme = scheme
        manifest.save(tmp)
        (tmp / "sqnr.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "sqnr.md").write_text(sqnr_table(report))
    return report


def _quantize_one(source: Path, target: Path, spec: GraphSpec, calibration: Feeds, heldout: Feeds,
                  threads: int | None) -> dict:
    src, dst = source / spec.file, target / spec.file
    if spec.component in FP16_COMPONENTS:
        fp16_graph(src, dst)
        spec.precision, spec.float_nodes = "fp16", []
    else:
        spec.float_nodes = quantize_graph(src, dst, calibration)
        spec.precision = "w8a16"
    return {"component": spec.component, "stage": spec.stage, "unit": spec.unit, "precision": spec.precision,
            "float_nodes": len(spec.float_nodes), "sqnr_db": graph_sqnr(src, dst, heldout, threads),
            "bytes_fp32": _size(src), "bytes": _size(dst)}


def _size(path: Path) -> int:
    data = path.with_suffix(".onnx.data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def sensitivity(float_graph: Path, quantised_graph: Path, feeds: Feeds, threads: int | None = None,
                top: int = 20) -> dict:
    """Per-layer sensitivity of a quantised graph, on ``feeds``.

    - activations (ONNX Runtime's QDQ debugging tools): for every quantised activation, the SQNR of its own 16-bit
      grid (``qdq_db``) and the SQNR it has inside the quantised graph against the float graph (``xmodel_db``:
      the error accumulated up to there);
    - weights: for every 8-bit weight, its own SQNR (``weight_db``) and the graph output's SQNR when only that
      weight is 8-bit and everything else float (``output_db``), with the nodes that read it.

    The ``top`` lowest of each, sorted by ``qdq_db`` and ``output_db``.
    """
    return {"graph": float_graph.stem, "feeds": len(feeds),
            "activations": activation_errors(float_graph, quantised_graph, feeds)[:top],
            "weights": weight_sensitivity(float_graph, quantised_graph, feeds, threads)[:top]}


def activation_errors(float_graph: Path, quantised_graph: Path, feeds: Feeds) -> list[dict]:
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    producers = {out: node.name for node in onnx.load(float_graph).graph.node for out in node.output}
    with tempfile.TemporaryDirectory() as tmp:
        activations = {}
        for kind, path in (("float", float_graph), ("qdq", quantised_graph)):
            augmented = Path(tmp) / f"{kind}.onnx"
            modify_model_output_intermediate_tensors(path, augmented)
            activations[kind] = collect_activations(str(augmented), _Reader(feeds),
                                                    execution_providers=["CPUExecutionProvider"])
    matched = create_activation_matching(activations["qdq"], activations["float"])
    return sorted(({"tensor": t, "node": producers.get(t, t), "qdq_db": sqnr_db(m["pre_qdq"], m["post_qdq"]),
                    "xmodel_db": sqnr_db(m["float"], m["post_qdq"]) if "float" in m else math.nan}
                   for t, m in matched.items() if any(np.any(x) for x in m["pre_qdq"])),  # all-zero: no SQNR
                  key=lambda r: r["qdq_db"])


def weight_sensitivity(float_graph: Path, quantised_graph: Path, feeds: Feeds,
                       threads: int | None = None) -> list[dict]:
    """The graph output's SQNR with one weight at a time replaced by its 8-bit copy (lowest first)."""
    model = onnx.load(float_graph)
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    modules = _module_names(model)
    reference_session = session(float_graph, threads)
    reference = [reference_session.run(None, f)[0] for f in feeds]
    initializers = {init.name: init for init in model.graph.initializer}
    rows = []
    for name, dequantised in dequantised_weights(quantised_graph).items():
        if name not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[name])
        initializers[name].CopyFrom(numpy_helper.from_array(dequantised.astype(weight.dtype), name))
        trial = session(model.SerializeToString(), threads)
        initializers[name].CopyFrom(numpy_helper.from_array(weight, name))
        nodes = readers.get(name, [])
        module = ", ".join(dict.fromkeys(modules.get(n, n) for n in nodes))
        rows.append({"weight": name, "nodes": nodes, "module": module,
                     "weight_db": sqnr_db([weight], [dequantised]),
                     "output_db": sqnr_db(reference, [trial.run(None, f)[0] for f in feeds])})
    return sorted(rows, key=lambda r: r["output_db"])


def _module_names(model: onnx.ModelProto) -> dict[str, str]:
    """The PyTorch module each node came from (torch.onnx records its name scopes), e.g. transformer.proj_out."""
    names = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if scopes:
            parts = ast.literal_eval(scopes)
            # a module reached through __dict__ (a pruned DiT's block list) is recorded by that path
            module = parts[-2] if len(parts) > 1 else parts[-1]
            names[node.name] = re.sub(r"__dict__\['_modules'\]\['([^']+)'\]", r"\1", module)
    return names


def dequantised_weights(quantised_graph: Path) -> dict[str, np.ndarray]:
    """Every 8-bit weight of a QDQ graph, dequantised (per channel), under its float name."""
    model = onnx.load(quantised_graph)
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or stored.get(node.input[0], np.empty(0)).dtype != np.int8:
            continue
        values = stored[node.input[0]].astype(np.float64)
        scale = stored[node.input[1]].astype(np.float64)
        zero = stored[node.input[2]].astype(np.float64) if len(node.input) > 2 else 0.0
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [-1 if d == axis % values.ndim else 1 for d in range(values.ndim)] if scale.ndim else []
        name = node.input[0].removesuffix("_quantized")
        weights[name] = (values - np.reshape(zero, shape)) * np.reshape(scale, shape)
    return weights


def _lift(source: Path, target: Path, spec: GraphSpec, report: dict, calibration: Feeds, heldout: Feeds, count: int,
          threads: int | None) -> dict:
    """Re-quantise ``spec`` with the nodes reading its ``count`` most sensitive weights kept in float."""
    nodes = list(dict.fromkeys(n for row in report["sensitivity"]["weights"][:count] for n in row["nodes"]))
    before = report["graphs"][spec.name]["sqnr_db"]
    trial = target / spec.file.replace(".onnx", ".lift.onnx")
    kept = quantize_graph(source / spec.file, trial, calibration, nodes)
    after = graph_sqnr(source / spec.file, trial, heldout, threads)
    if after > before:
        shutil.move(trial, target / spec.file)
        spec.float_nodes = kept
        report["graphs"][spec.name].update(sqnr_db=after, float_nodes=len(kept), bytes=_size(target / spec.file))
    else:
        trial.unlink()
    return {"graph": spec.name, "float_nodes": nodes, "sqnr_db_before": before, "sqnr_db_after": after,
            "kept": "lifted" if after > before else "original"}


def sqnr_table(report: dict) -> str:
    """Markdown: SQNR per graph beside the paper's, sizes, and the sensitivity of the worst graph."""
    lines = [f"# {report['scheme'].upper()} quantisation of {report['source']}", "",
             f"Calibration: {report['calibration']['prompts']} prompts (at most "
             f"{report['calibration']['max_feeds_per_graph']} feeds per graph); SQNR on "
             f"{report['heldout_prompts']} held-out prompts.", "",
             "| graph | precision | float nodes | SQNR (dB) | paper (dB) | fp32 (KB) | quantised (KB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, row in report["graphs"].items():
        lines.append(f"| {name} | {row['precision']} | {row['float_nodes']} | {row['sqnr_db']:.1f} | "
                     f"{paper_sqnr(row)} | {row['bytes_fp32'] / 1024:.0f} | {row['bytes'] / 1024:.0f} |")
    sens = report["sensitivity"]
    lines += ["", f"## Most sensitive activations of {sens['graph']} (lowest SQNR of 16-bit quantisation alone)", "",
              "| node | tensor | alone (dB) | in the quantised graph (dB) |", "|---|---|---:|---:|"]
    lines += [f"| {r['node']} | {r['tensor']} | {r['qdq_db']:.1f} | {r['xmodel_db']:.1f} |"
              for r in sens["activations"][:10]]
    lines += ["", f"## Most sensitive weights of {sens['graph']} (graph output SQNR with only that weight 8-bit)", "",
              "| module | weight SQNR (dB) | output SQNR (dB) |", "|---|---:|---:|"]
    lines += [f"| {r['module']} | {r['weight_db']:.1f} | {r['output_db']:.1f} |"
              for r in sens["weights"][:10]]
    if "lift" in report:
        lift = report["lift"]
        lines += ["", f"Keeping the {len(lift['float_nodes'])} nodes that read its most sensitive weights in float, "
                  f"{lift['graph']}: "
                  f"{lift['sqnr_db_before']:.1f} dB -> {lift['sqnr_db_after']:.1f} dB ({lift['kept']} kept)."]
    return "\n".join(lines) + "\n"


def paper_sqnr(row: dict) -> str:
    """The paper's deployed SQNR for a graph's row of the report, as a table cell."""
    paper = PAPER_SQNR_DB.get(row["component"])
    if isinstance(paper, tuple):
        paper = paper[row["stage"]] if row["stage"] is not None and row["stage"] < len(paper) else None
    return "–" if paper is None else f"{paper:.0f}"


__all__ = ["calibration_prompt_set", "heldout_prompt_set", "quantize_folder", "quantize_graph", "record_feeds",
           "sensitivity", "sqnr_db", "mask_nodes"]
