"""ml_collections config files: `path.py[:arg]` loading and `--config.a.b=value` overrides (any command's config)."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os

import ml_collections as mlc

from jaxdiff.errors import UserError


class ConfigError(UserError):
    """A config that cannot run: a missing file, an unknown key, a bad value; raised before anything compiles."""


def load_config(spec: str) -> mlc.ConfigDict:
    """`path/to/config.py` or `path/to/config.py:arg` -> get_config() / get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_jaxdiff_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    return config if isinstance(config, mlc.ConfigDict) else mlc.ConfigDict(config)


def _parse_value(text: str, current):
    if isinstance(current, bool):
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def is_open(path: str, open_keys) -> bool:
    return any(path == o or path.startswith(o + ".") for o in open_keys)


def apply_overrides(
    config: mlc.ConfigDict, overrides: list[str], *, schema: mlc.ConfigDict | None = None, open_keys=()
) -> mlc.ConfigDict:
    """Apply `--config.a.b=value` (or `config.a.b=value`) strings; unknown keys are a ConfigError. `schema`: the
    defaults of keys a config may leave out; keys under `open_keys` (e.g. "model.unet") are free-form."""
    _open = lambda path: is_open(path, open_keys)  # noqa: E731
    config = mlc.ConfigDict(config.to_dict())
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if not text.startswith("config.") or "=" not in text:
            raise ConfigError(f"expected --config.KEY=VALUE, got {item!r}")
        key, value = text[len("config.") :].split("=", 1)
        parts = key.split(".")
        node, ref = config, schema
        for i, part in enumerate(parts[:-1]):
            here = ".".join(parts[: i + 1])
            if part not in node:
                if not _open(here):
                    raise ConfigError(unknown_key(here, ref))
                node[part] = mlc.ConfigDict()
            node = node[part]
            ref = ref[part] if ref is not None and part in ref else None
        leaf = parts[-1]
        if leaf not in node and not _open(key):
            raise ConfigError(unknown_key(key, node))
        current = node[leaf] if leaf in node else (ref[leaf] if ref is not None and leaf in ref else None)
        try:
            parsed = _parse_value(value, current)
        except ValueError as e:
            raise ConfigError(f"--config.{key}: {e}") from None
        if isinstance(current, mlc.ConfigDict):
            raise ConfigError(f"--config.{key} is a group of keys ({', '.join(current)}); set one of them")
        node[leaf] = parsed
    return config


def unknown_key(path: str, parent) -> str:
    name = path.split(".")[-1]
    known = list(parent.keys()) if parent is not None else []
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {path.rsplit('.', 1)[0] + '.' if '.' in path else ''}{close[0]}?)" if close else ""
    return f"unknown config key {path!r}{hint}; known keys here: {', '.join(sorted(known))}"
