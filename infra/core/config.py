"""Typed configuration: dataclasses (or pydantic models) loaded from YAML with dotted command-line overrides.

Every component defines its own config classes; this module only knows how to build them from
``defaults <- YAML file <- key=value overrides``, validate types (pydantic ``TypeAdapter``), reject unknown keys
(a typo in a config must fail loudly, not be ignored), and write the resolved config beside an output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, TypeVar, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override does not fit the config class."""


def to_dict(obj: Any) -> Any:
    """Plain-Python (JSON/YAML-safe) view of a dataclass / pydantic model, recursively; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "model_dump"):
        return to_dict(obj.model_dump())
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _deep_merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value). ``value`` is YAML so ``[1,2]``, ``true``, ``1e-4`` work."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.depth=2)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return key.split("."), value


def _set_dotted(data: dict, keys: list[str], value: Any) -> None:
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def _field_names(cls: Any) -> dict[str, Any] | None:
    """Field name -> annotated type for dataclasses / pydantic models; None for leaf types."""
    if dataclasses.is_dataclass(cls):
        hints = get_type_hints(cls)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}
    fields = getattr(cls, "model_fields", None)
    if isinstance(fields, dict):
        return {k: v.annotation for k, v in fields.items()}
    return None


def check_unknown_keys(cls: Any, data: Any, where: str = "") -> None:
    """Raise ConfigError naming every key that the config class does not have (recursively)."""
    names = _field_names(cls)
    if names is None or not isinstance(data, dict):
        return
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + u for u in unknown)} for {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    for k, v in data.items():
        sub = names[k]
        if sub is not None and _field_names(sub) is not None:
            check_unknown_keys(sub, v, f"{where}.{k}" if where else k)


def build(cls: type[T], data: dict) -> T:
    """Validate a plain dict into ``cls`` (types coerced and checked by pydantic)."""
    from pydantic import TypeAdapter, ValidationError

    check_unknown_keys(cls, data)
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {cls.__name__} config:\n{e}") from None


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: T | dict | None = None,
) -> T:
    """defaults (``cls()`` or ``base``) <- YAML ``path`` <- ``overrides`` (``a.b=value``), validated into ``cls``."""
    data: dict = to_dict(base) if base is not None else to_dict(cls())
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
        check_unknown_keys(cls, loaded)
        data = _deep_merge(data, loaded)
    for item in overrides:
        keys, value = parse_override(item)
        _set_dotted(data, keys, value)
    return build(cls, data)


def save_config(obj: Any, path: str | Path) -> Path:
    """Write the resolved config (YAML or JSON by suffix) so every output says exactly what produced it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(obj)
    if p.suffix == ".json":
        p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def config_hash(obj: Any) -> str:
    """Stable short hash of a resolved config (recorded in shard JSON, run tags)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
