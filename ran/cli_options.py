"""CLI options made from the parameter models, so ``params.yaml`` and ``ran-cli`` share one
definition: every field of a :mod:`ran.config` model becomes an option whose help text is
the field's description and whose default is the model's.

An option the user does not give stays ``None`` and is left out of the values, so the
profile's value (``--profile quick``) or the model's default applies.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel


def _cli_type(annotation: Any) -> Any:
    """The type Typer parses: Literals become str (pydantic checks the choice), ``X | None``
    becomes X."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _cli_type(inner)
    if origin is Literal:
        return str
    return annotation


def _help(field: Any) -> str:
    default = field.default
    shown = "unset" if default is None else default
    if isinstance(default, bool):
        shown = str(default).lower()
    return f"{field.description} (default: {shown})"


def model_options(model: type[BaseModel], skip: set[str] = frozenset()) -> list[inspect.Parameter]:
    """One keyword parameter per field of ``model`` (nested models are skipped)."""
    params = []
    for name, field in model.model_fields.items():
        if name in skip or (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            continue
        kind = _cli_type(field.annotation)
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            option = typer.Option(
                f"{flag}/--no-{name.replace('_', '-')}", help=_help(field), show_default=False
            )
        else:
            option = typer.Option(flag, help=_help(field), show_default=False)
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[kind | None, option],
            )
        )
    return params


def with_model_options(model: type[BaseModel], skip: set[str] = frozenset()) -> Callable:
    """Decorate a command ``f(values: dict, **own_options)``: the model's fields become options
    and arrive, the given ones only, as ``values``."""

    def decorate(command: Callable) -> Callable:
        own = [
            p
            for p in inspect.signature(command, eval_str=True).parameters.values()
            if p.name != "values"
        ]
        fields = model_options(model, skip)
        names = {p.name for p in fields}

        def wrapper(**kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return command({k: v for k, v in values.items() if v is not None}, **kwargs)

        wrapper.__name__, wrapper.__doc__ = command.__name__, command.__doc__
        wrapper.__signature__ = inspect.Signature([*own, *fields])
        wrapper.__annotations__ = {p.name: p.annotation for p in (*own, *fields)}
        return wrapper

    return decorate
