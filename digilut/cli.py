"""The ``digilut`` command line: a thin layer over the library.

Each command group lives in ``digilut/commands/<name>.py`` with a ``register(app)`` function (their
options come from the config dataclasses through ``digilut/commands/options.py``); this
module only wires them together and configures logging (the one place that does).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import signal

import typer

import digilut.commands

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="digilut — find lung-transplant rejection lesions on whole-slide images (DigiLut). "
    "Box columns everywhere: x1,x2 = xmin,xmax and y1,y2 = ymin,ymax in level-0 pixels.",
)


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    signal.signal(signal.SIGTERM, _terminate)  # like Ctrl-C: servers and pipeline runs are stopped
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


for _name in sorted(m.name for m in pkgutil.iter_modules(digilut.commands.__path__)):
    _mod = importlib.import_module(f"digilut.commands.{_name}")
    if hasattr(_mod, "register"):  # a command group (``options`` is the generator they share)
        _mod.register(app)
