"""Unknown keys of a config block, each named with the closest key the schema defines ("did you mean ...?").

pydantic's extra="forbid" refuses a misspelt key without a hint; `check_known_keys` walks the raw block against the
schema's own fields, into nested blocks (a discriminated union by its discriminator), before pydantic does.
A leaf: imports pydantic and the standard library only.
"""

from __future__ import annotations

import difflib
import typing

from pydantic import BaseModel
from pydantic.fields import FieldInfo


def unknown_key_messages(model: type[BaseModel], data: dict, path: str) -> list[str]:
    """One message per key of `data` (found at `path`) that `model` does not define, at every nesting level."""
    known = list(model.model_fields)
    messages = []
    for key, value in data.items():
        if key not in model.model_fields:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"the keys of `{path}`: {', '.join(known)}"
            messages.append(f"{path}.{key} ({hint})")
        elif isinstance(value, dict):
            nested = _nested_model(model.model_fields[key], value)
            if nested is not None:
                messages += unknown_key_messages(nested, value, f"{path}.{key}")
        elif isinstance(value, list):
            item_field = _item_field(model.model_fields[key])
            for i, item in enumerate(value):
                nested = None if item_field is None or not isinstance(item, dict) else _nested_model(item_field, item)
                if nested is not None:
                    messages += unknown_key_messages(nested, item, f"{path}.{key}[{i}]")
    return messages


def _item_field(field: FieldInfo) -> FieldInfo | None:
    """The field an item of a list field is validated as (its discriminator kept), or None for no list of models."""
    lists = [t for t in (typing.get_args(field.annotation) or (field.annotation,)) if typing.get_origin(t) is list]
    if not lists:
        return None
    item = typing.get_args(lists[0])[0]
    return FieldInfo.from_annotation(item)


def check_known_keys(model: type[BaseModel], data: object, path: str) -> None:
    """Raise a ValueError listing every unknown key of the raw block `data` with its suggestion; a non-dict is
    left to pydantic."""
    if isinstance(data, dict):
        messages = unknown_key_messages(model, data, path)
        if messages:
            noun, it = ("key", "it") if len(messages) == 1 else ("keys", "them")
            raise ValueError(f"unknown {noun} {', '.join(messages)}: correct the spelling or remove {it} "
                             "(docs/config.md lists every key)")


def _nested_model(field: FieldInfo, value: dict) -> type[BaseModel] | None:
    """The model a dict under `field` is validated as: the field's one model, or the member of a discriminated union
    that `value`'s discriminator picks (None when it picks none: pydantic then names the bad discriminator)."""
    members = [t for t in (typing.get_args(field.annotation) or (field.annotation,))
               if isinstance(t, type) and issubclass(t, BaseModel)]
    if len(members) == 1 or not isinstance(field.discriminator, str):
        return members[0] if len(members) == 1 else None
    chosen = value.get(field.discriminator)
    return next((m for m in members if m.model_fields[field.discriminator].default == chosen), None)
