"""A/B of the TAEHV decoder's forward (NCHW) against a channels-last variant of it (tried in 35d279d), in one process.

The two run interleaved on the same latents (one 17-frame video), so load from other jobs hits both alike:

    python experiments/decoder_channels_last.py VAE_FOLDER [VAE_FOLDER ...] --threads 1 --repeats 21
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch

from neodragon.models.vae import AsymmetricCausalVideoVAE, MemBlock


def channels_last_forward(self, z: torch.Tensor) -> torch.Tensor:
    """The decoder's forward with every activation in NHWC memory order."""
    n, c, t, h, w = z.shape
    x = z.transpose(1, 2).reshape(n * t, c, h, w).contiguous(memory_format=torch.channels_last)
    for index, block in enumerate(self.blocks):
        if isinstance(block, MemBlock):
            frames = x.reshape(n, -1, *x.shape[1:])
            past = torch.cat([torch.zeros_like(frames[:, :1]), frames[:, :-1]], dim=1)
            x = block(x, past.reshape(x.shape).contiguous(memory_format=torch.channels_last))
        else:
            x = block(x)
        if index == self.trim_after:
            x = x.reshape(n, -1, *x.shape[1:])[:, self.frames_to_trim :].flatten(0, 1)
            x = x.contiguous(memory_format=torch.channels_last)
    return x.reshape(n, -1, *x.shape[1:]).transpose(1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("vaes", nargs="+", help="causal_video_vae folders")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for folder in args.vaes:
        vae = AsymmetricCausalVideoVAE.from_pretrained(folder).eval()
        plain = vae.decoder
        nhwc = copy.deepcopy(plain).to(memory_format=torch.channels_last)
        nhwc.forward = types.MethodType(channels_last_forward, nhwc)
        z = torch.randn(1, vae.config.encoder_out_channels, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        times, outputs = {"nchw": [], "channels_last": []}, {}
        with torch.inference_mode():
            for _ in range(args.repeats):
                for name, model in (("nchw", plain), ("channels_last", nhwc)):
                    start = time.perf_counter()
                    outputs[name] = model(z)
                    times[name].append(time.perf_counter() - start)
        medians = {name: 1000 * statistics.median(values) for name, values in times.items()}
        diff = (outputs["nchw"] - outputs["channels_last"]).abs().max().item()
        print(f"{folder}: NCHW {medians['nchw']:.1f} ms, channels-last {medians['channels_last']:.1f} ms "
              f"({medians['channels_last'] / medians['nchw'] - 1:+.0%}), max difference {diff:.1e}")


if __name__ == "__main__":
    main()
