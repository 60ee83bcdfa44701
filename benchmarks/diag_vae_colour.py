"""Why the first nano VAEs reconstructed ShapesWorld in grey levels: the measurements behind
docs/results/nano-teacher.md ("Diagnosis 2"), as one rerunnable script.

Run from the repository root (each section is independent; the probe needs a trained VAE):

    python benchmarks/diag_vae_colour.py --sections sensitivity encoder --threads 2
    python benchmarks/diag_vae_colour.py --sections probe --vae /work/runs/vae10/checkpoints/step_2600

Sections:
- ``sensitivity``: how far the encoder's latent moves when red and blue are swapped in the input, and how far the
  decoder's output moves between two random latents, at PyTorch's default init and at ``variance_preserving_init``.
- ``encoder``: the encoder alone trained to regress each 8 x 8 block's mean colour (first 3 latent channels of
  frame 0), from both inits: the chroma error against the chroma variance says whether colour is learnable.
- ``probe``: a least-squares probe from a trained VAE's latent (frame 0) to each 8 x 8 block's mean colour, fitted
  on half of 48 ``eval`` videos and scored on the other half: the share of luminance and chroma variance kept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_core import ReportHead, report_preamble, write_atomic
from safetensors.torch import load_file

from neodragon.models.vae import AsymmetricCausalVideoVAE
from neodragon.presets import nano_teacher_preset
from neodragon.recipes.nano import clip_batch, initial_teacher_vae, video_batch

SECTIONS = ("sensitivity", "encoder", "probe")
INITS = ("default", "variance-preserving")


def build_vae(init: str, seed: int = 0) -> AsymmetricCausalVideoVAE:
    torch.manual_seed(seed)
    if init == "variance-preserving":
        return initial_teacher_vae()
    return AsymmetricCausalVideoVAE(**nano_teacher_preset().vae)


def load_vae(path: Path) -> AsymmetricCausalVideoVAE:
    """A ``train vae`` final/ folder, or one of its Accelerate checkpoints (``model.safetensors``, keys ``vae.*``)."""
    if (path / "config.json").is_file():
        return AsymmetricCausalVideoVAE.from_pretrained(path).eval()
    vae = AsymmetricCausalVideoVAE(**nano_teacher_preset().vae)
    state = load_file(str(path / "model.safetensors"))
    vae.load_state_dict({key.removeprefix("vae."): value for key, value in state.items()})
    return vae.eval()


def chroma(x: torch.Tensor) -> torch.Tensor:
    """Colour minus its mean over the RGB channels (dim 1): what is left when luminance is taken out."""
    return x - x.mean(1, keepdim=True)


def block_colours(video: torch.Tensor) -> torch.Tensor:
    """Mean colour of every 8 x 8 block of frame 0: [B, 3, 1, H / 8, W / 8]."""
    return F.avg_pool3d(video[:, :, :1], (1, 8, 8))


@torch.no_grad()
def sensitivity_rows() -> list[str]:
    videos, _, _ = clip_batch("train", range(4), 17, 128, 48, 0)
    swapped = videos[:, [2, 1, 0]]
    rows = [
        "| init | mean abs latent change, red and blue swapped | mean abs output change, two random latents |",
        "|---|---:|---:|",
    ]
    for init in INITS:
        vae = build_vae(init).eval()
        latent = vae.encode(videos).latent_dist.mean
        moved = (vae.encode(swapped).latent_dist.mean - latent).abs().mean().item()
        generator = torch.Generator().manual_seed(0)
        a, b = (torch.randn(latent.shape, generator=generator) for _ in range(2))
        output = (vae.decode(a).sample - vae.decode(b).sample).abs().mean().item()
        rows.append(f"| {init} | {moved:.2e} | {output:.2e} |")
    return rows


def encoder_colour_rows(steps: int) -> list[str]:
    rows = [f"| init | chroma MSE after {steps} steps | chroma variance of the targets |", "|---|---:|---:|"]
    for init in INITS:
        vae = build_vae(init)
        params = [*vae.encoder.parameters(), *vae.quant_conv.parameters()]
        optimizer = torch.optim.AdamW(params, lr=4e-4)
        for step in range(steps):
            videos, _, _ = clip_batch("train", range(4 * step, 4 * step + 4), 9, 128, 48, 0)
            estimate = vae.quant_conv(vae.encoder(videos))[:, :3, :1]
            loss = (estimate - block_colours(videos)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            videos, _, _ = clip_batch("eval", range(16), 9, 128, 48, 0)
            target = block_colours(videos)
            error = (chroma(vae.quant_conv(vae.encoder(videos))[:, :3, :1]) - chroma(target)).square().mean()
        rows.append(f"| {init} | {error.item():.4f} | {chroma(target).square().mean().item():.4f} |")
    return rows


def held_out_r2(features: torch.Tensor, target: torch.Tensor) -> float:
    """R^2 on the second half of a least-squares fit (with bias) on the first half."""
    features = torch.cat([features, torch.ones(len(features), 1)], 1)
    half = len(features) // 2
    weights = torch.linalg.lstsq(features[:half], target[:half]).solution
    residual = features[half:] @ weights - target[half:]
    return 1 - (residual.square().sum() / (target[half:] - target[half:].mean(0)).square().sum()).item()


@torch.no_grad()
def probe_rows(vae_path: Path) -> list[str]:
    vae = load_vae(vae_path)
    videos, _ = video_batch("eval", range(48), 17, 128, seed=0)
    latent = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in videos.split(8)])[:, :, 0]
    features = latent.permute(0, 2, 3, 1).flatten(0, 2)
    colours = block_colours(videos)[:, :, 0].permute(0, 2, 3, 1).flatten(0, 2)
    luminance = colours.mean(1, keepdim=True)
    quadratic = torch.cat([features, (features[:, :, None] * features[:, None]).flatten(1)], 1)
    return [
        "| probe | luminance R^2 | chroma R^2 |",
        "|---|---:|---:|",
        *(
            f"| {name} | {held_out_r2(x, luminance):.2f} | {held_out_r2(x, colours - luminance):.2f} |"
            for name, x in (("linear", features), ("quadratic", quadratic))
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=["sensitivity", "encoder"])
    parser.add_argument("--vae", type=Path, help="A trained VAE for the probe: final/ or a checkpoint folder.")
    parser.add_argument("--encoder-steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/results/vae-colour-diagnosis.md"))
    args = parser.parse_args()
    if "probe" in args.sections and args.vae is None:
        parser.error("--sections probe needs --vae (a train vae final/ folder or a checkpoint folder)")
    torch.set_num_threads(args.threads)
    report = ReportHead()
    body: list[str] = []
    for section in args.sections:
        print(f"running {section} ...", flush=True)
        rows = {
            "sensitivity": sensitivity_rows,
            "encoder": lambda: encoder_colour_rows(args.encoder_steps),
            "probe": lambda: probe_rows(args.vae),
        }[section]()
        title = f"{section} ({args.vae})" if section == "probe" else section
        body += ["", f"## {title}", "", *rows]
        print("\n".join(rows), flush=True)
    head = report_preamble("Nano VAE colour diagnosis (CPU)", report, True, "other jobs may share the cores")
    write_atomic(args.out, "\n".join([*head, *body]) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
