"""GSPOConfig from YAML files and command-line strings.

Precedence, lowest to highest: the dataclass defaults < the YAML file < explicit
overrides (the CLI's `--<field> <value>` flags). Every value goes through
GSPOConfig's own validation, so a bad value fails with the field's name whichever
source it came from.

Two conveniences on top of plain `yaml.safe_load`:
* PyYAML reads `3e-4` (no dot) as the *string* "3e-4"; a string given for a numeric,
  bool, Optional or list field is parsed with `parse_cli_value`, so `clip_range_low: 3e-4`
  means what it says.
* a single string for a list field becomes a one-element list (or a comma-separated one).

Relative paths in a YAML file (dataset_path, a reward file) are resolved against the
current working directory, like the command-line flags, not against the YAML file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import typing
from typing import Any, Optional, Union

import yaml

from gspo.config import ConfigError, GSPOConfig

TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off")
NONE_WORDS = ("none", "null", "~")
# Element type of list fields whose items are not strings (the rest hold strings, or
# dict specs for reward_funcs).
LIST_ITEM_TYPES = {"reward_weights": float}


# ----------------------------------------------------------------------------------
# Field types
# ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _type_hints() -> dict:
    """Field name -> resolved annotation (config.py uses postponed annotations)."""
    return typing.get_type_hints(GSPOConfig)


@functools.lru_cache(maxsize=None)
def config_fields() -> dict:
    """Field name -> dataclasses.Field, in declaration order."""
    return {f.name: f for f in dataclasses.fields(GSPOConfig)}


def field_type(name: str) -> tuple[type, bool]:
    """(base type, accepts None) of a field: Optional[float] -> (float, True)."""
    hint = _type_hints()[name]
    if typing.get_origin(hint) is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _bare(args[0]), type(None) in typing.get_args(hint)
    return _bare(hint), False


def _bare(hint: Any) -> type:
    """list[str] -> list; plain classes unchanged."""
    return typing.get_origin(hint) or hint


def type_name(name: str) -> str:
    """Human-readable type of a field for help text and docs: 'float', 'str | None', ..."""
    base, optional = field_type(name)
    if config_fields()[name].metadata.get("own_check"):
        return "float | str"  # a number or a word (gae_lambda: 'adaptive')
    text = base.__name__
    if base is list:
        text = f"list[{LIST_ITEM_TYPES.get(name, str).__name__}]"
    return f"{text} | None" if optional else text


# TRL GRPOConfig names a user may bring, and what they are called here (a spelling match would mislead:
# max_completion_length is closest to max_prompt_length)
TRL_NAMES = {
    "max_completion_length": "max_new_tokens",
    "num_generations": "group_size",
    "beta": "kl_coef",
    "epsilon": "clip_range_low (or clip_range)",
    "epsilon_high": "clip_range_high",
    "num_iterations": "gspo_epochs",
    "loss_type": "loss_aggregation (and policy_loss for the objective)",
    "per_device_train_batch_size": "batch_size (prompts per step, all ranks together; TRL counts completions)",
    "model_name_or_path": "policy_model_name",
    "use_vllm": "rollout_engine: vllm",
    "scale_rewards": "use_group_normalization (and advantage_type)",
    "steps_per_generation": "num_mini_batches (updates per rollout batch; gspo_epochs repeats them)",
    "top_entropy_quantile": "nothing yet (no entropy-quantile token mask)",
}


def suggest(name: str) -> str:
    """'; did you mean ...?' for a misspelt field name or a TRL name, or ''."""
    if name in TRL_NAMES:
        return f"; TRL's {name!r} is {TRL_NAMES[name]} in gspo"
    close = difflib.get_close_matches(name, list(config_fields()), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _unknown(name: str, where: str) -> ConfigError:
    return ConfigError(f"unknown config key {name!r}{where}{suggest(name)} (`gspo --help` lists every field)")


# ----------------------------------------------------------------------------------
# Parsing strings (command-line values, and strings found in YAML for typed fields)
# ----------------------------------------------------------------------------------
def _field_name(field: Union[str, dataclasses.Field]) -> str:
    name = field if isinstance(field, str) else field.name
    if name not in config_fields():
        raise _unknown(name, "")
    return name


def _bad(name: str, text: str, expected: str) -> ConfigError:
    return ConfigError(f"GSPOConfig.{name}: cannot parse {text!r}; expected {expected}.")


def _parse_bool(name: str, text: str) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise _bad(name, text, f"a bool, one of {'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}")


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        pass
    try:  # "1e3" is a fine way to write 1000, "2.5" is not an int
        as_float = float(text)
    except ValueError:
        raise _bad(name, text, "an integer") from None
    if as_float.is_integer():
        return int(as_float)
    raise _bad(name, text, "an integer")


def _parse_float(name: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise _bad(name, text, "a number such as 0.2 or 3e-4") from None


def _list_item(name: str, item: Any) -> Any:
    """Convert one list element to the field's item type (dict reward specs pass through)."""
    if LIST_ITEM_TYPES.get(name, str) is float:
        if isinstance(item, str):
            return _parse_float(name, item)
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise _bad(name, repr(item), "a list of numbers")
        return float(item)
    if isinstance(item, dict):
        return item
    if isinstance(item, (list, tuple)) or item is None:
        raise _bad(name, repr(item), "a list of strings")
    return str(item)


def _parse_list(name: str, text: str) -> list:
    """'a,b' or '[a, b]' (YAML flow syntax) or '' (the empty list)."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            items = yaml.safe_load(stripped)
        except yaml.YAMLError as e:
            raise _bad(name, text, f"a YAML list such as [a, b] ({e.__class__.__name__})") from None
        if not isinstance(items, list):
            raise _bad(name, text, "a YAML list such as [a, b]")
    else:
        items = [part.strip() for part in stripped.split(",") if part.strip()]
    return [_list_item(name, item) for item in items]


def _parse_dict(name: str, text: str) -> dict:
    """'{a: {b: 1}}' (YAML flow syntax, or JSON) or '' (the empty mapping)."""
    if not text.strip():
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _bad(name, text, f"a YAML mapping such as {{name: {{param: 1}}}} ({e.__class__.__name__})") from None
    if not isinstance(value, dict):
        raise _bad(name, text, "a YAML mapping such as {name: {param: 1}}")
    return value


_PARSERS = {
    bool: _parse_bool,
    int: _parse_int,
    float: _parse_float,
    list: _parse_list,
    dict: _parse_dict,
    str: lambda name, text: text,
}


def parse_cli_value(field: Union[str, dataclasses.Field], text: str) -> Any:
    """Convert the string `text` to the type of GSPOConfig field `field` (a name or a Field).

    bool: true/false/1/0/yes/no/on/off; int; float (3e-4 works); Optional fields: 'none'
    or 'null' mean None; list fields: 'a,b', '[a, b]' or '' for an empty list.
    Raises ConfigError naming the field, the text and what was expected.
    """
    name = _field_name(field)
    base, optional = field_type(name)
    if config_fields()[name].metadata.get("own_check"):  # a number or a word: GSPOConfig checks which
        try:
            return float(text)
        except ValueError:
            return text.strip()
    if optional and text.strip().lower() in NONE_WORDS:
        return None
    return _PARSERS[base](name, text)


def coerce_value(name: str, value: Any) -> Any:
    """A value from YAML or a Python override, adjusted to field `name`'s type where that is
    unambiguous: strings are parsed, ints become floats for float fields, list items are
    converted. Anything else is left for GSPOConfig's validation to reject by name."""
    base, _ = field_type(name)
    if isinstance(value, str):
        return parse_cli_value(name, value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is list and isinstance(value, (list, tuple)):
        return [_list_item(name, item) for item in value]
    return value


# ----------------------------------------------------------------------------------
# Loading and dumping
# ----------------------------------------------------------------------------------
class _DuplicateKey(yaml.constructor.ConstructorError):
    """A key written twice in one mapping (PyYAML would keep the last silently)."""

    def __init__(self, key: Any, line: int, first_line: int, node: yaml.Node) -> None:
        super().__init__(None, None, f"duplicate key {key!r}", node.start_mark)
        self.key, self.line, self.first_line = key, line, first_line


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key repeated in one mapping (at any depth). A key that overrides one
    brought in by a `<<: *anchor` merge is not a duplicate: that is what merges are for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports an unhashable key
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key], key_node)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict:
    """The top-level mapping of a YAML config file ({} for an empty file). Read like `yaml.safe_load`, except
    that a key written twice in one mapping is a ConfigError (safe_load keeps the last one silently)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            loader = _StrictLoader(fh)  # a SafeLoader subclass: safe_load plus the check
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except _DuplicateKey as e:
        raise ConfigError(
            f"config file {path!r}: key {e.key!r} is given twice, on line {e.first_line} and again on line "
            f"{e.line}; remove one (YAML would silently keep the last)"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path!r} must hold a mapping of field: value at the top level, not a {type(data).__name__}"
        )
    return data


def _checked(values: dict, where: str) -> dict:
    """Reject unknown keys (naming them) and coerce the rest to their field types."""
    out = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in config_fields():
            raise _unknown(str(key), where)
        out[key] = coerce_value(key, value)
    return out


def load_config(yaml_path: Optional[str], overrides: Optional[dict] = None) -> GSPOConfig:
    """Build a validated GSPOConfig: defaults < the YAML file at `yaml_path` < `overrides`.

    `yaml_path` may be None (defaults + overrides only). Raises ConfigError for a missing
    or malformed file, an unknown key (with close matches), or an invalid value.
    """
    values = _checked(read_yaml(yaml_path), f" in {yaml_path}") if yaml_path else {}
    values.update(_checked(dict(overrides or {}), " in the overrides"))
    return GSPOConfig(**values)


def config_to_yaml(cfg: GSPOConfig) -> str:
    """The config as YAML, every field in declaration order; load_config reads it back."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, allow_unicode=True)
