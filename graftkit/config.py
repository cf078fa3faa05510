"""The base of every configuration model (recipes, memories, injectors, tasks)."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

NUMBERS = (int, float)


class Config(BaseModel):
    """Unknown keys are refused, as are infinite and NaN floats and a yes/no given where a number is expected
    (`steps: true` is not one step)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    #: {field: value} for each field whose default has changed: the default it had while a run's recipe.yaml
    #: recorded only the options its recipe set. A saved run or an export that does not record such a field was
    #: made with that value and is loaded with it (`with_former_defaults`); a recipe gets the current default.
    former_defaults: ClassVar[dict[str, Any]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value, info: ValidationInfo):
        assert info.field_name is not None  # a field validator always knows its field
        if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not a yes/no")
        return value


def with_former_defaults(config_class: type[BaseModel], options: Mapping[str, Any]) -> dict[str, Any]:
    """`options` of a saved run or an export, with the former default (`Config.former_defaults`) of every field
    they do not record: what the component was made with."""
    return {**getattr(config_class, "former_defaults", {}), **options}


def _numeric(annotation) -> bool:
    """A number type, alone or with None (`int`, `float | None`), and not also a bool."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
    else:
        args = [annotation]
    return bool(args) and bool not in args and all(a in NUMBERS for a in args)
