"""The ``neodragon`` command line: ``generate`` a video, ``info`` about a model, and the command groups ``train``,
``distill``, ``prune``, ``deploy``, ``data``, ``eval`` and ``adapter``. Each group is a module of this package;
every command imports torch and the library inside its body, so that ``--help`` answers at once."""

from __future__ import annotations

import typer

from .adapter import app as adapter_app
from .data import app as data_app
from .deploy import app as deploy_app
from .distill import app as distill_app
from .errors import FriendlyGroup
from .eval import app as eval_app
from .generate import generate
from .info import info
from .prune import app as prune_app
from .train import app as train_app

app = typer.Typer(cls=FriendlyGroup, add_completion=False, no_args_is_help=True,
                  help="Neodragon mobile text-to-video: generate videos, inspect models, train, evaluate, adapt.")
app.command()(generate)
app.command()(info)
app.add_typer(train_app, name="train")
app.add_typer(distill_app, name="distill")
app.add_typer(prune_app, name="prune")
app.add_typer(data_app, name="data", help="ShapesWorld, the nano world: previews of its captioned videos.")
app.add_typer(adapter_app, name="adapter", help="SHiRA and FouRA adapters: train, inspect, convert, fuse, export.")
app.add_typer(deploy_app, name="deploy")
app.add_typer(eval_app, name="eval", help="VBench-nano: score a model with the bundled judge; train the judge.")

__all__ = ["app"]
