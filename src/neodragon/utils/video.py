"""Writing videos, previews and folders atomically: a temporary file (or folder) beside the target, then a rename."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


@contextmanager
def atomic_path(path: str | Path, overwrite: bool = False):
    """Yield a temporary path next to ``path`` (same suffix); rename it into place only on success."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)



@contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False):
    """Yield an empty sibling folder ``<name>.tmp`` to fill; it replaces ``path`` only on success (an interrupted
    write leaves no half-written folder)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another folder.")
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

def export_to_video(frames: list[Image.Image], path: str | Path, fps: int = 24, overwrite: bool = False) -> Path:
    """Encode frames as an H.264 mp4 (yuv420p, playable everywhere)."""
    import imageio.v2 as imageio

    if not frames:
        raise ValueError("No frames to write.")
    with atomic_path(path, overwrite) as tmp, imageio.get_writer(
        tmp, fps=fps, codec="libx264", quality=8, macro_block_size=1, pixelformat="yuv420p", format="FFMPEG"
    ) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame.convert("RGB")))
    return Path(path)


def contact_sheet(frames: list[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """All frames on one grid image (row-major, oldest first)."""
    if not frames:
        raise ValueError("No frames for a contact sheet.")
    columns = columns or math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / columns)
    width, height = frames[0].size
    sheet = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), (32, 32, 32))
    for i, frame in enumerate(frames):
        sheet.paste(frame.convert("RGB"), (pad + (i % columns) * (width + pad), pad + (i // columns) * (height + pad)))
    return sheet


def save_preview(frames: list[Image.Image], path: str | Path, fps: int = 24, overwrite: bool = False) -> Path:
    """A contact-sheet PNG, or an animated GIF when ``path`` ends with .gif."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".gif"):
        raise ValueError(f"Preview must be a .png (contact sheet) or .gif (animation); got {path.name}.")
    with atomic_path(path, overwrite) as tmp:
        if path.suffix.lower() == ".gif":
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                           duration=round(1000 / fps), loop=0)
        else:
            contact_sheet(frames).save(tmp, format="PNG")
    return path
