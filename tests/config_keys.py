"""Every key the config model knows, as paths ("gpu_nodes[].contract_floor_w"), for tests."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel


def _models_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The model a field holds (directly, optionally, or as a list of them), and whether a list."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            model, many = _models_in(arg)
            if model is not None:
                return model, many
        return None, False
    if origin is list:
        (item,) = get_args(annotation)
        model, _ = _models_in(item)
        return model, model is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def key_paths(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path, annotation) of every leaf key of ``model``; list rows are written ``name[]``."""
    for name, field in model.model_fields.items():
        sub, many = _models_in(field.annotation)
        if sub is None:
            yield prefix + name, field.annotation
        else:
            yield from key_paths(sub, f"{prefix}{name}{'[]' if many else ''}.")


def is_float(annotation: Any) -> bool:
    """Whether a leaf holds a float (or an optional one, with or without constraints);
    a list of floats is not one (its items are checked where it is defined)."""
    if get_origin(annotation) is list:
        return False
    return annotation is float or any(is_float(a) for a in get_args(annotation))
