"""The platform's one config system: typed dataclasses loaded from YAML, with ``--set key=value`` overrides.

Every component defines its own config dataclasses (``BuildConfig``, ``TrainConfig``, ``InferenceConfig``, ...);
this module alone knows how to build them from ``defaults <- YAML file (or a named preset) <- --set overrides``,
validate the types (pydantic ``TypeAdapter`` over the dataclass), refuse unknown keys (a typo in a config must fail
loudly, naming the valid keys), hash them, and write the resolved config beside an output. Every command takes the
same two options, added by :func:`add_config_args`: ``--config FILE_OR_PRESET`` and ``--set KEY=VALUE`` (repeatable).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, TypeVar, get_type_hints

import yaml

from .errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override does not fit the config class (the CLI prints it as one line, exit 2)."""


def to_dict(obj: Any) -> Any:
    """Plain-Python (JSON/YAML-safe) view of a dataclass / pydantic model, recursively; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
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
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value). ``value`` is YAML so ``[1,2]``, ``true``, ``1e-4``
    work."""
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
    """Field name -> annotated type of a config dataclass; None for leaf types."""
    if dataclasses.is_dataclass(cls):
        hints = get_type_hints(cls)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}
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


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_config_file(source: str | Path, preset_dir: str | Path | None = None) -> Path:
    """A YAML path (relative paths are tried from the current folder, then from the repository root, so
    ``configs/train/...`` works from anywhere), or the name of a preset ``{preset_dir}/{name}.yaml``."""
    p = Path(source)
    if p.is_file():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    if preset_dir is not None:
        cand = Path(preset_dir) / f"{source}.yaml"
        if cand.is_file():
            return cand
        names = sorted(q.stem for q in Path(preset_dir).glob("*.yaml"))
        raise ConfigError(
            f"config {str(source)!r} is neither a file nor a preset in {preset_dir} (presets: {', '.join(names)})"
        )
    raise ConfigError(f"config file {p} does not exist")


def load_yaml_mapping(path: str | Path) -> dict:
    """The top-level mapping of a YAML config file, with one-line errors."""
    p = Path(path)
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def load_config(
    cls: type[T],
    source: str | Path | None = None,
    overrides: Iterable[str] = (),
    base: T | dict | None = None,
    preset_dir: str | Path | None = None,
) -> T:
    """defaults (``cls()`` or ``base``) <- YAML ``source`` (a path, or a preset name in ``preset_dir``)
    <- ``overrides`` (``a.b=value``, values parsed as YAML), validated into ``cls``."""
    data: dict = to_dict(base) if base is not None else to_dict(cls())
    if source is not None:
        p = resolve_config_file(source, preset_dir)
        loaded = load_yaml_mapping(p)
        check_unknown_keys(cls, loaded)
        data = _deep_merge(data, loaded)
    for item in overrides:
        keys, value = parse_override(item)
        _set_dotted(data, keys, value)
    return build(cls, data)


def add_config_args(parser, config_help: str = "YAML config file") -> None:
    """The two config options every ``varsr`` command shares: ``--config`` and repeatable ``--set KEY=VALUE``."""
    parser.add_argument("--config", "-c", default=None, metavar="FILE", help=config_help)
    parser.add_argument(
        "--set",
        "-s",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optim.lr=1e-4 (repeatable; values are YAML)",
    )


def dump_config(obj: Any, as_json: bool = False) -> str:
    """The resolved config as YAML (or JSON) text, as it may be shown or written: credentials in its URIs (a tracking
    URI ``http://user:password@host``, a ``?password=`` query) and secret-named values masked by
    :func:`infra.core.redact.redact_config`. The config a run *uses* is the object itself, never this text (a
    launcher that hands a config file to workers passes the real URI beside it, see training/launch.py)."""
    from .redact import redact_config

    data = redact_config(to_dict(obj))
    return json.dumps(data, indent=2, sort_keys=True) + "\n" if as_json else yaml.safe_dump(data, sort_keys=False)


def save_config(obj: Any, path: str | Path) -> str | Path:
    """Write the resolved config (YAML, or JSON by suffix) to a local path or a URL, so every output says exactly
    what produced it (secrets masked: :func:`dump_config`)."""
    from . import storage

    s = str(path)
    storage.write_text(s, dump_config(obj, as_json=s.endswith(".json")))
    return Path(s) if storage.is_local(s) else s


def config_hash(obj: Any) -> str:
    """Stable short hash of a resolved config (recorded in shard JSON, run tags)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
