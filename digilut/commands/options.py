"""CLI options generated from the config dataclasses: one ``--option`` per field, with the field's
name and default, so that the CLI, the library and the pipeline's parameters agree by construction.

A command declares ``**options`` and is decorated with :func:`config_options`; it rebuilds each
config with :func:`digilut.steps.common.config_from`, the helper the components use too.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any


def config_options(
    *configs: type | tuple[type, str], help: Mapping[str, str] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one ``--option`` per field of each config dataclass (``cls`` or ``(cls,
    prefix)``: ``(LabelConfig, "label_")`` makes ``--label-mode`` of ``LabelConfig.mode``).
    ``help``: text per option name (default: ``Class.field``)."""
    import typer

    help = help or {}

    def wrap(func: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in own}
        extra = []
        for spec in configs:
            cls, prefix = spec if isinstance(spec, tuple) else (spec, "")
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                name = prefix + f.name
                if name in taken:
                    raise TypeError(
                        f"{func.__name__}: option --{name} is both a parameter and a config field"
                    )
                taken.add(name)
                # str for a Literal; the declared Optional type for a None default
                annotation = hints[f.name] if f.default is None else type(f.default)
                text = help.get(name, f"{cls.__name__}.{f.name}")
                default = typer.Option(f.default, help=text)
                extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                               annotation=annotation))  # fmt: skip
        unknown = sorted(set(help) - {p.name for p in extra})
        if unknown:  # e.g. a field renamed but not its help text
            raise TypeError(f"{func.__name__}: help for {', '.join(unknown)}, which no config has as a field")
        func.__signature__ = sig.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        return func

    return wrap
