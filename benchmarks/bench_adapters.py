"""CPU benchmarks of the adapters: SHiRA fused switching against PEFT LoRA fusing at the official DiT scale,
training step time and peak memory of SHiRA / LoRA / FouRA on the nano DiT, and adapter file sizes.

Run from the repository root:

    python benchmarks/bench_adapters.py --density 0.01 --repeats 5

The official DiT has random N(0, 0.02) weights (timings do not depend on the values). Each training method runs
in its own process so that its peak RSS is its own. The markdown report is rewritten atomically after every
finished section.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from bench_core import (
    LATENT_FRAME,
    POOLED_DIM,
    REAL_TEXT_TOKENS,
    TEXT_TOKENS,
    ReportHead,
    build_dit,
    gib,
    report_preamble,
    write_atomic,
)
from diffusers.utils import logging as diffusers_logging

from neodragon.adapters.foura import FouraConfig
from neodragon.adapters.lora import lora_param_count, matching_lora_config, matching_lora_ranks
from neodragon.adapters.shira import MaskSpec, ShiraAdapter, add_shira, build_shira, find_targets
from neodragon.adapters.switching import AdapterSwitcher
from neodragon.models import PyramidMMDiT
from neodragon.models.mmdit import DIT_TARGETS
from neodragon.presets import nano_student_preset
from neodragon.schedulers import PyramidFlowMatchScheduler

TRAIN_METHODS = ("full", "shira", "lora", "foura", "foura-adaptive")


@dataclass
class Report(ReportHead):
    switch: dict[int, list[str]] = field(default_factory=dict)
    forward: list[str] = field(default_factory=list)
    official_notes: list[str] = field(default_factory=list)
    train: list[str] = field(default_factory=list)
    train_notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    rss_gib: dict[str, float] = field(default_factory=dict)


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def digests(model: torch.nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Hash of each layer's raw weight bytes (bit-exactness without keeping a second copy of the weights)."""
    return {n: hashlib.blake2b(model.get_submodule(n).weight.detach().numpy().view("uint8")).hexdigest() for n in names}


def ms_cell(samples: Sequence[float]) -> str:
    return f"{statistics.median(samples):,.0f} (min {min(samples):,.0f})"


# ---------------------------------------------------------------------------------------------- official scale


def random_values(adapter: ShiraAdapter, seed: int) -> ShiraAdapter:
    g = torch.Generator().manual_seed(seed)
    values = {n: torch.randn(v.shape, generator=g) * 1e-3 for n, v in adapter.values.items()}
    return ShiraAdapter(adapter.indices, values, adapter.shapes, adapter.metadata)


def official_inputs() -> dict:
    """Unit 1, stage 1 of a hybrid video: 320 image tokens (history + current) + 128 text tokens."""
    g = torch.Generator().manual_seed(0)
    history = PyramidFlowMatchScheduler().build_history([torch.randn(LATENT_FRAME, generator=g)])
    current = torch.randn(1, 16, 1, LATENT_FRAME[3] // 2, LATENT_FRAME[4] // 2, generator=g)
    mask = torch.zeros(1, TEXT_TOKENS, dtype=torch.long)
    mask[:, :REAL_TEXT_TOKENS] = 1
    return dict(sample=[[*history[1], current]], encoder_hidden_states=torch.randn(1, TEXT_TOKENS, 1536, generator=g),
                encoder_attention_mask=mask, pooled_projections=torch.randn(1, POOLED_DIM, generator=g),
                timestep_ratio=torch.tensor([500.0]))


def on_base_layers(adapter: ShiraAdapter) -> ShiraAdapter:
    """The same adapter addressed to the base layers inside PEFT's LoRA wrappers (``<name>.base_layer``)."""
    rename = {n: f"{n}.base_layer" for n in adapter.indices}
    return ShiraAdapter({rename[n]: v for n, v in adapter.indices.items()},
                        {rename[n]: v for n, v in adapter.values.items()},
                        {rename[n]: v for n, v in adapter.shapes.items()}, adapter.metadata)


OPERATIONS = (("apply", "apply (base -> A)", "scatter A", "fuse A (`merge_adapter`)"),
              ("switch", "switch A -> B", "one pass: per layer, A's entries restored and B's written",
               "unfuse A + fuse B"),
              ("remove", "remove (-> base)", "restore the originals", "unfuse (`unmerge_adapter`)"))


def switch_rows(shira_ms: dict[str, list[float]], lora_ms: dict[str, list[float]]) -> list[str]:
    rows = []
    for key, label, shira_how, lora_how in OPERATIONS:
        speedup = statistics.median(lora_ms[key]) / statistics.median(shira_ms[key])
        rows.append(f"| {label} | {ms_cell(shira_ms[key])} | {ms_cell(lora_ms[key])} | **{speedup:.1f}x** | "
                    f"{shira_how} / {lora_how} |")
    cycle_shira = [a + r for a, r in zip(shira_ms["apply"], shira_ms["remove"], strict=True)]
    cycle_lora = [a + r for a, r in zip(lora_ms["apply"], lora_ms["remove"], strict=True)]
    rows.append(f"| apply + remove | {ms_cell(cycle_shira)} | {ms_cell(cycle_lora)} | "
                f"**{statistics.median(cycle_lora) / statistics.median(cycle_shira):.1f}x** | "
                "the diffusers fuse -> infer -> unfuse flow |")
    return rows


def bench_official(args: argparse.Namespace, report: Report, save: Callable[[], None]) -> None:
    from peft import get_peft_model

    print("building the official DiT ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    dit = build_dit()
    build_s = time.perf_counter() - start
    names = sorted(find_targets(dit, DIT_TARGETS))
    targeted = sum(dit.get_submodule(n).weight.numel() for n in names)
    report.rss_gib["after building the official DiT"] = rss_mib() / 1024

    print("SHiRA masks ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    masks = [build_shira(dit, MaskSpec(strategy="random", density=args.density, seed=seed)) for seed in (1, 2)]
    mask_s = (time.perf_counter() - start) / 2
    shira_a, shira_b = (on_base_layers(random_values(m, seed)) for m, seed in zip(masks, (1, 2), strict=True))

    print("LoRA adapters ...", file=sys.stderr, flush=True)
    config = matching_lora_config(masks[0])
    ranks = sorted(set(matching_lora_ranks(masks[0]).values()))
    sample_layers = names[:12]
    sample_before = {n: dit.get_submodule(n).weight.detach().clone() for n in sample_layers}
    model = get_peft_model(dit, config, adapter_name="first")
    model.add_adapter("second", copy.deepcopy(config))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 1e-3)
    lora_params = lora_param_count(model) // 2
    tuner, base = model.base_model, model.base_model.model
    layers = sorted(shira_a.indices)
    original = digests(base, layers)
    report.rss_gib["after adding both LoRA adapters"] = rss_mib() / 1024
    with tempfile.TemporaryDirectory() as tmp:
        shira_size = masks[0].save(Path(tmp) / "shira.safetensors").stat().st_size
        model.save_pretrained(tmp, selected_adapters=["first"])
        lora_size = (Path(tmp) / "first" / "adapter_model.safetensors").stat().st_size
    report.files += [f"| official, density {args.density:g} | SHiRA, neodragon | {masks[0].num_params:,} | "
                     f"{shira_size / 2**20:,.1f} MiB | {shira_size / masks[0].num_params:.2f} |",
                     f"| official, density {args.density:g} | LoRA (PEFT), matching ranks | {lora_params:,} | "
                     f"{lora_size / 2**20:,.1f} MiB | {lora_size / lora_params:.2f} |"]

    switcher = AdapterSwitcher(base)
    shira_exact = []
    for threads in args.threads:
        print(f"switching with {threads} threads: SHiRA and LoRA cycles, interleaved ...", file=sys.stderr, flush=True)
        torch.set_num_threads(threads)
        shira_ms: dict[str, list[float]] = {"apply": [], "switch": [], "remove": []}
        lora_ms: dict[str, list[float]] = {"apply": [], "switch": [], "remove": []}
        with torch.no_grad():
            for repeat in range(args.repeats):
                before = digests(base, layers) if repeat in (0, args.repeats - 1) else None
                shira_ms["apply"].append(timed(lambda: switcher.apply(shira_a)))
                shira_ms["switch"].append(timed(lambda: switcher.apply(shira_b)))
                shira_ms["remove"].append(timed(switcher.restore))
                if before is not None:
                    shira_exact.append(digests(base, layers) == before)
                lora_ms["apply"].append(timed(lambda: tuner.merge_adapter(["first"])))
                lora_ms["switch"].append(timed(lambda: (tuner.unmerge_adapter(), tuner.merge_adapter(["second"]))))
                lora_ms["remove"].append(timed(tuner.unmerge_adapter))
        report.switch[threads] = switch_rows(shira_ms, lora_ms)
        report.load[f"after switching with {threads} threads"] = os.getloadavg()
        save()
    torch.set_num_threads(args.threads[0])
    lora_changed = sum(a != b for a, b in zip(digests(base, layers).values(), original.values(), strict=True))
    lora_drift = max((base.get_submodule(f"{n}.base_layer").weight - sample_before[n]).abs().max().item()
                     for n in sample_layers)
    report.rss_gib["after the switching cycles"] = rss_mib() / 1024

    print("forward: LoRA unfused vs fused, interleaved ...", file=sys.stderr, flush=True)
    inputs = official_inputs()
    tuner.set_adapter("first")
    forward_ms: dict[str, list[float]] = {"unfused": [], "fused": []}
    with torch.inference_mode():
        model(**inputs)  # warm-up
        for _ in range(args.forward_repeats):
            forward_ms["unfused"].append(timed(lambda: model(**inputs)))
            tuner.merge_adapter(["first"])
            forward_ms["fused"].append(timed(lambda: model(**inputs)))
            tuner.unmerge_adapter()
    report.load["after the forward passes"] = os.getloadavg()
    unfused, fused = statistics.median(forward_ms["unfused"]), statistics.median(forward_ms["fused"])
    report.forward = [
        f"| LoRA unfused (side branch, ranks {ranks}) | {ms_cell(forward_ms['unfused'])} | "
        f"{(unfused / fused - 1) * 100:+.1f} % |",
        f"| fused (LoRA merged; the same as SHiRA in fused mode: plain weights) | {ms_cell(forward_ms['fused'])} | - |",
    ]
    nnz = shira_a.num_params
    report.official_notes = [
        f"- Official `PyramidMMDiT()` built on the meta device and filled with N(0, 0.02) ({build_s:.0f} s). "
        f"Targets `DIT_TARGETS`: the attention and feed-forward linears of all 18 blocks, **{len(names)} layers, "
        f"{targeted:,} weights**.",
        f"- SHiRA: two random-mask adapters at density {args.density:g}, **{nnz:,} entries each** "
        f"({nnz / targeted:.2%}); values N(0, 1e-3). Building one adapter's masks took {mask_s:.1f} s (one-off). "
        "The mask strategy does not change the switching cost (the same number of sorted indices).",
        f"- LoRA: PEFT `LoraConfig` with the per-layer rank closest to SHiRA's count (`matching_lora_config`: ranks "
        f"{ranks}), **{lora_params:,} parameters per adapter** ({lora_params / nnz - 1:+.1%} vs SHiRA); "
        "`lora_B` filled with N(0, 1e-3) so that fusing is not a no-op.",
        "- Both act on the same model: the DiT wrapped by PEFT with two LoRA adapters (unmerged), SHiRA "
        "scattering into the wrapped base layers. Each repeat runs a SHiRA cycle (apply A -> switch to B -> "
        "remove) then a LoRA cycle (fuse A -> unfuse A + fuse B -> unfuse), so both see the same machine load. "
        f"Median (min) of {args.repeats} repeats, ms, `torch.no_grad()`.",
        "- Round trip: the targeted weights after every checked SHiRA cycle are "
        f"**{'bit-identical' if all(shira_exact) else 'NOT bit-identical'}** to those before it (BLAKE2 digest of "
        f"every layer; first and last repeat of each thread count). After all LoRA cycles {lora_changed} of "
        f"{len(names)} layers differ from the originals (max |dW| {lora_drift:.2e} over 12 layers): subtracting "
        "`B @ A` again is not exact in fp32.",
        f"- Forward: one DiT call at unit 1 / stage 1 of a hybrid video (320 image + {TEXT_TOKENS} text tokens), "
        f"{args.threads[0]} thread(s), `torch.inference_mode()`, one warm-up, then {args.forward_repeats} rounds of "
        "(unfused, merge, fused, unmerge); median (min).",
    ]
    save()


# ---------------------------------------------------------------------------------------------- nano training


def nano_batch(batch: int, seed: int = 0) -> tuple[dict, torch.Tensor]:
    """Stage-2 training input of the nano DiT: two history frames (as the pyramid history) + the current clip."""
    g = torch.Generator().manual_seed(seed)
    frame = (batch, 8, 1, 16, 16)
    history = PyramidFlowMatchScheduler().build_history([torch.randn(frame, generator=g) for _ in range(2)])
    mask = torch.zeros(batch, 32, dtype=torch.long)
    mask[:, :12] = 1
    inputs = dict(sample=[[*history[2], torch.randn(frame, generator=g)]], encoder_attention_mask=mask,
                  encoder_hidden_states=torch.randn(batch, 32, 128, generator=g),
                  pooled_projections=torch.randn(batch, 48, generator=g),
                  timestep_ratio=torch.rand(batch, generator=g) * 1000)
    return inputs, torch.randn(frame, generator=g)


def attach(method: str, dit: PyramidMMDiT, rank: int) -> torch.nn.Module:
    from peft import get_peft_model

    if method == "full":
        return dit
    masks = build_shira(dit, MaskSpec(strategy="random", r=rank))
    if method == "shira":
        add_shira(dit, masks)
        return dit
    if method == "lora":
        return get_peft_model(dit, matching_lora_config(masks))
    gate = "adaptive" if method == "foura-adaptive" else "none"
    return get_peft_model(dit, FouraConfig(r=rank, foura_alpha=rank, target_modules=DIT_TARGETS, gate=gate))


def make_trainer(method: str, args: argparse.Namespace) -> tuple[int, Callable[[], None]]:
    """(trainable parameter count, one training step) of a method on the seeded nano DiT."""
    torch.manual_seed(0)
    model = attach(method, PyramidMMDiT(**nano_student_preset().dit).train(), args.train_rank)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs, target = nano_batch(args.train_batch)

    def step() -> None:
        torch.nn.functional.mse_loss(model(**inputs)[0], target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return sum(p.numel() for p in params), step


def memory_worker(args: argparse.Namespace) -> None:
    """Peak RSS of a few training steps of one method, in a fresh process; prints a JSON line."""
    _, step = make_trainer(args.train_worker, args)
    base_rss = rss_mib()
    for _ in range(args.warmup + 2):
        step()
    print(json.dumps({"base_rss_mib": base_rss, "peak_rss_mib": peak_rss_mib()}))


def bench_training(args: argparse.Namespace, report: Report, save: Callable[[], None]) -> None:
    memory = {}
    for method in TRAIN_METHODS:
        print(f"training memory: {method} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--train-worker", method, "--train-rank", str(args.train_rank),
               "--train-batch", str(args.train_batch), "--warmup", str(args.warmup), "--threads", str(args.threads[0])]
        output = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        memory[method] = json.loads(output.strip().splitlines()[-1])
    print("training step times, methods interleaved ...", file=sys.stderr, flush=True)
    trainers = {method: make_trainer(method, args) for method in TRAIN_METHODS}
    times: dict[str, list[float]] = {method: [] for method in TRAIN_METHODS}
    for index in range(args.warmup + args.train_steps):
        for method, (_, step) in trainers.items():
            elapsed = timed(step)
            if index >= args.warmup:
                times[method].append(elapsed)
    report.load["after the training section"] = os.getloadavg()
    budget = trainers["shira"][0]
    how = {"full": "all DiT parameters (reference)",
           "shira": "`add_shira`, random mask, r-convention: values [nnz] only",
           "lora": "PEFT LoRA, `matching_lora_config` (same count)",
           "foura": "FouRA DCT, no gate",
           "foura-adaptive": "FouRA DCT, adaptive gate (+ gate MLP parameters)"}
    lora_ms = statistics.median(times["lora"])
    for method, (count, _) in trainers.items():
        ms, mem = statistics.median(times[method]), memory[method]
        report.train.append(f"| {method} | {count:,} ({count / budget:.2f}x) | {ms:.1f} (min {min(times[method]):.1f}) "
                            f"| {ms / lora_ms:.2f}x | {mem['peak_rss_mib'] - mem['base_rss_mib']:,.1f} | "
                            f"{mem['base_rss_mib']:,.0f} | {how[method]} |")
    report.train_notes = [
        f"- nano DiT (`PyramidMMDiT(**nano_student_preset().dit)`: 6 blocks x 128, "
        f"{sum(p.numel() for p in PyramidMMDiT(**nano_student_preset().dit).parameters()):,} parameters), "
        "`DIT_TARGETS`, "
        f"budget r = {args.train_rank} (r x (in + out) per layer, {budget:,} trainable entries).",
        f"- Batch {args.train_batch}, stage-2 input: history clips [B, 8, 1, 8, 8] + [B, 8, 1, 16, 16] from "
        "`build_history` of two frames, current clip [B, 8, 1, 16, 16] (144 image tokens), 32 text tokens "
        "[B, 32, 128] (the ContextAdapter output width; 12 real), pooled [B, 48]; MSE loss, AdamW lr 1e-4.",
        f"- Step = forward + backward + optimizer step, {args.threads[0]} thread(s). All methods live in one process "
        f"and take turns step by step (so they share the machine's load); median (min) of {args.train_steps} steps "
        "each after "
        f"{args.warmup} warm-up rounds.",
        f"- Peak memory: each method alone in a fresh process, {args.warmup + 2} steps; its peak RSS (`ru_maxrss`) "
        "minus its RSS right before the first step, so it counts activations, gradients, optimizer state and "
        "allocator growth, not the model itself.",
    ]
    save()


# ---------------------------------------------------------------------------------------------- file sizes


def bench_files(args: argparse.Namespace, report: Report, save: Callable[[], None]) -> None:
    from peft import get_peft_model

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rank in (1, args.train_rank):
            dit = PyramidMMDiT(**nano_student_preset().dit)
            shira = build_shira(dit, MaskSpec(strategy="random", r=rank))
            ours = shira.save(tmp / f"s{rank}.safetensors")
            peft_folder = shira.to_peft(tmp / f"p{rank}")
            sizes = {"SHiRA, neodragon (int32 index + fp32 value)": ours.stat().st_size,
                     "SHiRA, PEFT format (int32 row + col + fp32 value)":
                         (peft_folder / "adapter_model.safetensors").stat().st_size}
            for name, config in (("LoRA (PEFT)", matching_lora_config(shira)),
                                 ("FouRA (PEFT, no gate)", FouraConfig(r=rank, target_modules=DIT_TARGETS))):
                model = get_peft_model(PyramidMMDiT(**nano_student_preset().dit), config)
                model.save_pretrained(tmp / f"{name[:4]}{rank}")
                sizes[name] = (tmp / f"{name[:4]}{rank}" / "adapter_model.safetensors").stat().st_size
            for name, size in sizes.items():
                rows.append(f"| nano, r = {rank} | {name} | {shira.num_params:,} | {size / 1024:,.1f} KiB | "
                            f"{size / shira.num_params:.2f} |")
    report.files = rows
    save()


# ---------------------------------------------------------------------------------------------- report


def render(report: Report, args: argparse.Namespace, finished: bool) -> str:
    lines = report_preamble("Adapter benchmarks (CPU)", report, finished,
                            "the benchmark's own load is about its thread count; the excess is other processes "
                            "sharing the 2 cores; the min next to each median shows the run-to-run spread")
    if report.switch:
        lines += ["", "## 1. Switching at the official DiT scale (18 blocks x 1536)"]
        for threads, rows in report.switch.items():
            lines += ["", f"{threads} thread{'s' if threads > 1 else ''} (`torch.set_num_threads({threads})`):", "",
                      "| Operation | SHiRA ms | LoRA ms | LoRA / SHiRA | SHiRA / LoRA operation |",
                      "|---|---|---|---|---|", *rows]
        if report.forward:
            lines += ["", "LoRA's unfused alternative (no fusing, a side branch in every forward), one DiT forward:",
                      "", "| Forward | ms | Overhead |", "|---|---|---|", *report.forward]
        lines += ["", *report.official_notes]
    if report.train:
        lines += ["", "## 2. Training step at an equal trainable-parameter budget (nano DiT)", "",
                  "| Method | Trainable params (vs SHiRA) | Step ms | vs LoRA | Peak RSS increase MiB | RSS before "
                  "MiB | What trains |", "|---|---|---|---|---|---|---|", *report.train, "", *report.train_notes]
    if report.files:
        lines += ["", "## 3. Adapter file sizes", "",
                  "`DIT_TARGETS`. On the nano DiT SHiRA uses PEFT's r convention so that all four hold the same "
                  "number of trainable numbers (FouRA without a gate); the official-scale rows are the adapters of "
                  "section 1.", "",
                  "| Budget | Format | Trainable numbers | File | Bytes per number |", "|---|---|---|---|---|",
                  *report.files, "",
                  "SHiRA stores an index with every value: 8 bytes per entry (flat int32 index) against 12 in "
                  "PEFT's (row, col) layout; LoRA and FouRA store 4 bytes per number."]
    lines += style_adapter_section(args.out.parent)
    maxrss = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    lines += ["", "## Memory of this process", "",
              *[f"- RSS {where}: {value:.2f} GiB" for where, value in report.rss_gib.items()],
              f"- Peak RSS{'' if finished else ' so far'}: {maxrss:.2f} GiB (`ru_maxrss`; training runs in child "
              "processes)"]
    return "\n".join(lines) + "\n"


STYLE_REPORTS = {"adapters-style-decoder.md": "on the VAE decoder (style transfer)",
                 "adapters-style.md": "on the DiT (flow matching)"}


def style_adapter_section(folder: Path) -> list[str]:
    """Section 4: the style-adapter experiments of ``benchmarks/bench_style_adapters.py``, linked, with the tables and
    the contact sheet of the decoder run (the one whose adapters learn their styles) copied in."""
    lines = ["", "## 4. Style adapters on the nano teacher", "",
             "Style strength, content preservation, diversity and two-style fusion (concept loss) of SHiRA, LoRA and "
             "FouRA at an equal budget, written by `benchmarks/bench_style_adapters.py`: "
             + "; ".join(f"[{name}]({name}) {what}" for name, what in STYLE_REPORTS.items()) + ". What they show, "
             "and why fused styles interfere: [style-adapter-findings.md](style-adapter-findings.md)."]
    decoder = folder / "adapters-style-decoder.md"
    if decoder.is_file():
        text = decoder.read_text()
        start, end = text.find("## Style strength"), text.find("## Contact sheet")
        if start >= 0 and end > start:
            lines += ["", *("#" + line if line.startswith("## ") else line
                            for line in text[start:end].rstrip().splitlines()),
                      "", f"![contact sheet]({decoder.with_suffix('.png').name})"]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=0.01, help="SHiRA density at the official scale")
    parser.add_argument("--repeats", type=int, default=5, help="switching repeats")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch thread counts: switching is timed with each, everything else uses the first")
    parser.add_argument("--forward-repeats", type=int, default=3, help="official DiT forwards per mode")
    parser.add_argument("--train-rank", type=int, default=4, help="nano budget: r x (in + out) per layer")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-official", action="store_true", help="only the nano sections")
    parser.add_argument("--out", type=Path, default=Path("docs/results/adapters.md"))
    parser.add_argument("--train-worker", choices=TRAIN_METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.repeats, args.forward_repeats, args.train_steps, *args.threads) < 1 or not 0 < args.density <= 1:
        parser.error("repeats, steps and threads must be >= 1 and density in (0, 1]")
    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(args.threads[0])
    if args.train_worker:
        memory_worker(args)
        return

    report = Report()

    def save(finished: bool = False) -> None:
        write_atomic(args.out, render(report, args, finished))

    bench_files(args, report, save)
    bench_training(args, report, save)
    if not args.skip_official:
        bench_official(args, report, save)
    save(finished=True)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
