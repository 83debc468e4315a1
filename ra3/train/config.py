"""The config base of every trainer: a dataclass, loadable from YAML/JSON, overridable per field from strings (the
command line), validated with messages that name the field; and the choices of the fields both trainers share,
taken from where they are defined (the ops, ``ra3.distributed``).

A trainer's config subclasses ``TrainConfig``, lists its own fields (with a ``# comment`` each: the --help text)
and the shared ones (``out``, ``resume``, ``progress``, ``distributed``, ``backend``, ``seed``, ``device``,
``dtype``), and declares its checks as class tables (``CHOICES``, ``AT_LEAST``, ``POSITIVE``) plus ``check()``
for the rest.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import typing
from dataclasses import fields
from pathlib import Path
from typing import ClassVar

from ra3.distributed import STRATEGIES
from ra3.ops import reference as ops_reference
from ra3.ops import registry as ops_registry

BACKENDS = ("auto", *ops_registry.BACKENDS)  # ra3.ops backends; auto: the registry's fastest for the device
KL_ESTIMATORS = ops_reference.KL_ESTIMATORS  # ops.kl / ops.policy_loss
ADVANTAGE_NORMALIZE = ops_reference.NORMALIZE_MODES  # ops.group_advantages
DISTRIBUTED = STRATEGIES  # ra3.distributed strategies
DTYPES = ("float32", "bfloat16", "float16", "float64")
SHARED_FIELDS = ("out", "resume", "progress", "distributed", "backend", "seed")  # the same flag in every trainer
# config fields that may change between a run and its resumption without changing what it computes
RESUME_FREE_FIELDS = ("out", "resume", "progress", "distributed")


class TrainConfig:
    """Base of the trainers' config dataclasses. Subclasses are ``@dataclass``es and set the tables below."""
    CHOICES: ClassVar[dict] = {}  # field -> the values it may take
    AT_LEAST: ClassVar[dict] = {}  # field -> its minimum (None passes for optional fields)
    POSITIVE: ClassVar[tuple] = ()  # fields that must be > 0
    BELOW: ClassVar[dict] = {}  # field -> the bound it must stay under
    WHY: ClassVar[dict] = {}  # field -> why its bound is what it is (added to the message)
    RESUME_FREE: ClassVar[tuple] = RESUME_FREE_FIELDS

    # ------------------------------------------------------------------------------------------ checks
    def bad(self, name: str, why: str):
        """Raise the ValueError of a bad field: ``config field 'NAME': WHY, got VALUE``."""
        raise ValueError(f"config field {name!r}: {why}, got {getattr(self, name)!r}")

    def validate(self):
        """Raise ValueError naming the first bad field; return self (ints given for float fields become floats)."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, kind = getattr(self, f.name), _base_type(hints[f.name])
            if value is None:
                if not _optional(hints[f.name]):
                    self.bad(f.name, "must not be None")
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if kind is bool and not isinstance(value, bool):
                self.bad(f.name, "must be true or false")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                self.bad(f.name, "must be an integer")
            if kind is float and (not isinstance(value, float) or not math.isfinite(value)):
                self.bad(f.name, "must be a finite number")
            if kind is str and not isinstance(value, str):
                self.bad(f.name, "must be a string")
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                self.bad(name, f"must be one of {tuple(choices)}")
        for name, minimum in self.AT_LEAST.items():
            if getattr(self, name) is not None and getattr(self, name) < minimum:
                self.bad(name, f"must be >= {minimum}" + (" or null" if _optional(hints[name]) else "") +
                         (f" ({self.WHY[name]})" if name in self.WHY else ""))
        for name in self.POSITIVE:
            if getattr(self, name) <= 0:
                self.bad(name, "must be > 0")
        for name, bound in self.BELOW.items():
            if getattr(self, name) >= bound:
                self.bad(name, f"must be < {bound}")
        for name in ("out", "model"):
            if hasattr(self, name) and not getattr(self, name):
                self.bad(name, "must not be empty")
        self.check()
        return self

    def check(self) -> None:
        """The subclass's checks beyond the tables (ranges, fields that depend on each other)."""

    # ------------------------------------------------------------------------------------------ I/O
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    @classmethod
    def renamed(cls) -> dict:
        """Old field name -> its name now: files and checkpoints written before a rename still load."""
        return {}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config"):
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of field names to values, got {type(data).__name__}")
        data = {cls.renamed().get(k, k): v for k, v in data.items()}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown config field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path):
        """A YAML (.yaml/.yml) or JSON (.json) config; fields not in the file keep their defaults."""
        return cls.from_dict(read_config_file(path), source=str(path))

    def with_overrides(self, overrides: dict):
        """A copy with ``overrides`` (field -> value; strings are parsed by the field's type) applied."""
        data = self.to_dict()
        hints = typing.get_type_hints(type(self))
        for key, value in overrides.items():
            name = self.renamed().get(key.replace("-", "_"), key.replace("-", "_"))
            if name not in data:
                raise ValueError(f"unknown config field {key!r}; known fields: {sorted(data)}")
            data[name] = parse_value(name, hints[name], value) if isinstance(value, str) else value
        return type(self).from_dict(data)

    def resume_diff(self, saved: dict) -> list[str]:
        """The fields (not in RESUME_FREE) whose value differs from the config ``saved`` in a checkpoint."""
        saved = {self.renamed().get(k, k): v for k, v in saved.items()}
        return sorted(k for k, v in self.to_dict().items() if k not in self.RESUME_FREE and saved.get(k) != v)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """field name -> the comment after it in the dataclass source (its --help text), base classes included."""
        out = {}
        for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
            out.update({m.group(1): (m.group(2) or "").strip() for m in
                        re.finditer(r"^\s+(\w+): [^=]+= [^#\n]+(?:#\s*(.*))?$", inspect.getsource(klass), re.M)})
        return out


def read_config_file(path) -> dict:
    """The mapping in a YAML (.yaml/.yml) or JSON (.json) file; ValueError naming the file when it is missing or
    cannot be parsed."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError (not a ValueError)
        raise ValueError(f"config file {str(path)!r} cannot be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


def _base_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def field_types(cls) -> dict:
    """field name -> (its base type: int, float, str or bool; whether it may be None)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (_base_type(hints[f.name]), _optional(hints[f.name])) for f in fields(cls)}


def parse_value(name: str, tp, text: str):
    """Parse a command-line string for field ``name`` of type ``tp`` ('null'/'none' -> None when optional)."""
    kind = _base_type(tp)
    if _optional(tp) and text.strip().lower() in ("none", "null", ""):
        return None
    try:
        if kind is bool:
            return parse_bool(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"config field {name!r}: cannot parse {text!r} as {kind.__name__}") from None
    return text


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


__all__ = ["TrainConfig", "read_config_file", "parse_value", "parse_bool", "field_types", "BACKENDS",
           "KL_ESTIMATORS", "ADVANTAGE_NORMALIZE", "DISTRIBUTED", "DTYPES", "SHARED_FIELDS", "RESUME_FREE_FIELDS"]
