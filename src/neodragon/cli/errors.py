"""The command line's one error handler: a user error (a bad path, flag value, weight file or prompt) ends the
command with one red line that says what to do, never with a traceback; NEODRAGON_DEBUG=1 shows the traceback.
The checks that run before any work (output paths, weight files) live here too."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NoReturn

import typer
import typer.core
from rich.console import Console
from typer.core import TyperGroup

# typer 0.28 vendors click as typer._click and raises its exceptions; older typer versions use click itself
_click = getattr(typer.core, "_click", None) or typer.core.click

console = Console(stderr=True)
DEBUG_VARIABLE = "NEODRAGON_DEBUG"


def fail(message: str, code: int = 1) -> NoReturn:
    """One red line (never wrapped into several: the terminal wraps it), then exit with ``code``."""
    console.print(f"[bold red]error:[/] {_escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {_escape(message)}", highlight=False, soft_wrap=True)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)  # a path or value with [brackets] is shown as it is, not read as markup


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input can raise: bad values, missing or unreadable files, truncated or foreign weights."""
    from safetensors import SafetensorError  # light: no torch

    return ValueError, OSError, SafetensorError, ImportError


def _usage_error(err: Exception) -> NoReturn:
    """A bad flag or argument as one line, with where to read more, and click's exit code (2)."""
    ctx = getattr(err, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    fail(f"{err.format_message()}{hint}", code=getattr(err, "exit_code", 2))


class FriendlyGroup(TyperGroup):
    """A command group that turns user errors raised anywhere below it (bad flags included) into ``fail`` lines."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _click.exceptions.UsageError as err:
            if isinstance(err, getattr(_click.exceptions, "NoArgsIsHelpError", ())):
                raise  # shows the help
            _usage_error(err)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _click.exceptions.UsageError as err:
            if isinstance(err, getattr(_click.exceptions, "NoArgsIsHelpError", ())):
                raise
            _usage_error(err)
        except user_errors() as err:
            if os.environ.get(DEBUG_VARIABLE):
                raise
            first_line = str(err).strip() or type(err).__name__
            fail(f"{first_line} (set {DEBUG_VARIABLE}=1 to see the traceback)")


def check_new_output(path: Path | None, overwrite: bool, folder: bool = False) -> None:
    """Before any work: ``path`` (a file, or a folder when ``folder``) may be written: it does not exist or
    ``overwrite`` is set, and a file can be created where it goes (its folder is created as the write would)."""
    if path is None:
        return
    if path.is_dir() and not folder:
        fail(f"{path} is a folder; give a file name.")
    if path.exists() and not path.is_dir() and folder:
        fail(f"{path} is a file; give a folder name.")
    if path.exists() and not overwrite:
        fail(f"{path} already exists; pass --overwrite or choose another name.")
    why = _not_writable(path.parent)
    if why:
        fail(f"cannot write {path}: {why}. Choose another output path.")


def _not_writable(folder: Path) -> str | None:
    """None when a file can be created in ``folder`` (making the folder first if it is missing); else why not.
    Tried for real, with a temporary file or folder that is removed at once: permission bits do not stop root,
    and /proc or a read-only mount say no only when asked."""
    folder = folder if str(folder) else Path(".")
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:
        return f"none of the folders of {folder} exist"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        if existing == folder:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".neodragon-write-test-"):
                pass
        else:  # the write would create the missing folders below `existing`
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".neodragon-write-test-"))
    except OSError as err:
        what = f"cannot create files in {folder}" if existing == folder else f"cannot create the folder {folder}"
        return f"{what} ({err.strerror or type(err).__name__})"
    return None


def incomplete_weight_files(folder: Path) -> list[str]:
    """Every .safetensors file under ``folder`` that safetensors cannot open, as 'path (why)': most often a file
    cut off while copying or downloading. Opens the headers only (numpy framework: needs no torch)."""
    from safetensors import safe_open

    problems = []
    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy"):
                pass
        except Exception as err:  # SafetensorError, OSError: the file is not a complete safetensors file
            problems.append(f"{path} ({str(err).strip() or type(err).__name__}, {path.stat().st_size:,} bytes)")
    return problems


def check_weight_files(folder: Path | None) -> None:
    """Fail, naming every file, when a local model folder holds truncated weight files."""
    if folder is None or not folder.is_dir():
        return
    problems = incomplete_weight_files(folder)
    if len(problems) == 1:
        fail(f"the weight file {problems[0]} is incomplete: re-download or re-export the model (it was probably "
             "cut off while copying).")
    if problems:
        fail(f"{len(problems)} weight files are incomplete: {', '.join(problems)}; re-download or re-export the "
             "model (they were probably cut off while copying).")
