"""One config mechanism for every trainer and command.

Each trainer defines a ``@dataclass`` config whose fields are documented once,
in the dataclass docstring or a comment beside each field. A config is built by
:func:`load_config` from, in increasing priority: the dataclass defaults, a YAML
file, and explicit overrides (typically the command-line options a user set).
Unknown keys are an error that lists the valid ones; values are converted to the
field's type (``"3"`` -> 3, ``"a,b"`` -> ``["a", "b"]`` for list fields).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["load_config", "config_to_dict", "save_config", "load_run_config", "suggest", "SETTINGS_FILE"]

# The settings of a run, in its folder; ``--resume RUN_DIR`` reads them back.
SETTINGS_FILE = "config.yaml"


def suggest(name: str, valid, what: str = "name") -> str:
    """`` (did you mean 'x'?)`` for the closest valid names, or ``""``.

    >>> suggest("forwrd_kl", ["forward_kl", "reverse_kl"])
    " (did you mean 'forward_kl'?)"
    """
    import difflib

    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=2, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"

T = TypeVar("T")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for candidate in non_none:
            try:
                return _convert(value, candidate, key)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ValueError(f"config key {key!r}: cannot read {value!r} as {annotation}: {'; '.join(errors)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key {key!r}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        items = [_convert(v, inner, key) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is Any or annotation is typing.Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise TypeError(f"config key {key!r}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError(f"config key {key!r}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise TypeError(f"config key {key!r}: expected an integer, got {value!r}") from None
    if annotation is float:
        if isinstance(value, bool):
            raise TypeError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(f"config key {key!r}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"config key {key!r}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    if annotation is Path:
        return Path(value)
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build the dataclass ``cls`` from defaults, an optional YAML file and overrides.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class C:
    ...     epochs: int = 3
    ...     names: list[str] = dataclasses.field(default_factory=lambda: ["forward_kl"])
    >>> load_config(C, overrides={"epochs": "5", "names": "js,tvd"})
    C(epochs=5, names=['js', 'tvd'])
    >>> load_config(C, overrides={"epoch": 5})
    Traceback (most recent call last):
    ...
    ValueError: unknown config key 'epoch' for C (did you mean 'epochs'?); valid keys: epochs, names
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    if path is not None:
        from divergent.io import read_yaml

        path = Path(path)
        loaded = read_yaml(path, "config file")
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(
                f"unknown config key {key!r} for {cls.__name__}{suggest(key, fields)}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(value, hints[key], key)
    return cls(**kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a dataclass config (paths become strings)."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[key] = value
    return out


def save_config(config: Any, path: str | Path) -> Path:
    """Write a dataclass config as YAML, atomically; readable back by :func:`load_config`."""
    from divergent.io import write_yaml

    return write_yaml(config_to_dict(config), path)


def load_run_config(cls: type[T], run_dir: str | Path) -> T:
    """The settings a run folder was started with (``RUN_DIR/config.yaml``), for ``--resume``.

    Strict: a folder that is missing, is not a run folder of this kind, or whose settings
    file is empty or corrupt raises an error naming the file — never a fall-back to defaults.
    """
    from divergent.io import CorruptFileError, read_yaml

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: run folder not found: {run_dir}")
    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {run_dir} is not a run folder: {path} not found")
    loaded = read_yaml(path, "run settings file")
    if not isinstance(loaded, dict):
        raise CorruptFileError(f"run settings file {path} must hold a mapping of keys to values, got {type(loaded).__name__}")
    try:
        return load_config(cls, overrides=loaded)
    except (TypeError, ValueError) as exc:
        raise CorruptFileError(f"run settings file {path} does not describe a {cls.__name__}: {exc}") from None
