"""The command line's one error handler: a user error (a bad path, flag value, weight file or prompt) ends the
command with one red line that says what to do, never with a traceback; NEODRAGON_DEBUG=1 shows the traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

console = Console(stderr=True)
DEBUG_VARIABLE = "NEODRAGON_DEBUG"


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code=1)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {message}", highlight=False)


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can raise: bad values, missing or unreadable files, truncated or foreign weights."""
    from safetensors import SafetensorError  # light: no torch

    return ValueError, OSError, SafetensorError, ImportError


class FriendlyGroup(TyperGroup):
    """A command group that turns user errors raised anywhere below it into ``fail`` messages."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except user_errors() as err:
            if os.environ.get(DEBUG_VARIABLE):
                raise
            first_line = str(err).strip() or type(err).__name__
            fail(f"{first_line} (set {DEBUG_VARIABLE}=1 to see the traceback)")


def check_new_output(path: Path | None, overwrite: bool) -> None:
    """Before any work: ``path`` may be written (it does not exist, or ``overwrite``) and its folder is writable."""
    if path is None:
        return
    if path.exists() and not overwrite:
        fail(f"{path} already exists; pass --overwrite or choose another name.")
    if path.is_dir():
        fail(f"{path} is a folder; give a file name.")
    folder = path.parent if str(path.parent) else Path(".")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        fail(f"cannot write {path}: {existing} is not a writable folder. Choose another output path.")
