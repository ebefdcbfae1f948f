"""gspo.yaml_config: precedence, unknown keys, value parsing, the example configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from gspo.config import ConfigError, GSPOConfig
from gspo.yaml_config import config_fields, config_to_yaml, field_type, load_config, parse_cli_value, read_yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ precedence
def test_defaults_when_nothing_given():
    assert load_config(None) == GSPOConfig()


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = write(tmp_path, "group_size: 6\nlearning_rate: 2.0e-5\nkl_coef: 0.1\n")
    cfg = load_config(path, {"group_size": 8})
    assert cfg.group_size == 8  # flag beats YAML
    assert cfg.learning_rate == 2e-5  # YAML beats default
    assert cfg.kl_coef == 0.1
    assert cfg.batch_size == GSPOConfig().batch_size  # untouched default


def test_override_strings_are_parsed_like_flags(tmp_path):
    cfg = load_config(write(tmp_path, "adaptive_kl: true\n"), {"adaptive_kl": "false", "group_size": "5"})
    assert cfg.adaptive_kl is False and cfg.group_size == 5


def test_empty_yaml_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing here\n")) == GSPOConfig()


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # PyYAML reads 3e-4 as the string "3e-4"; the loader converts it for float fields.
    cfg = load_config(write(tmp_path, "clip_range_low: 3e-4\nclip_range_high: 4e-4\nlearning_rate: 1e-5\n"))
    assert cfg.clip_range_low == 3e-4 and cfg.clip_range_high == 4e-4 and cfg.learning_rate == 1e-5


def test_yaml_int_for_float_field_becomes_float(tmp_path):
    cfg = load_config(write(tmp_path, "kl_coef: 0\n"))
    assert cfg.kl_coef == 0.0 and isinstance(cfg.kl_coef, float)


def test_yaml_single_string_for_list_field(tmp_path):
    assert load_config(write(tmp_path, "reward_funcs: exact_answer\n")).reward_funcs == ["exact_answer"]


def test_yaml_dict_reward_spec_passes_through(tmp_path):
    cfg = load_config(write(tmp_path, "reward_funcs:\n  - {name: exact_answer, weight: 2.0}\n"))
    assert cfg.reward_funcs == [{"name": "exact_answer", "weight": 2.0}]


# ------------------------------------------------------------------ errors
def test_unknown_yaml_key_is_named_with_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"'grop_size'.*did you mean 'group_size'"):
        load_config(write(tmp_path, "grop_size: 4\n"))


def test_unknown_override_key_is_named():
    with pytest.raises(ConfigError, match="'not_a_field'"):
        load_config(None, {"not_a_field": 1})


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- group_size\n- 4\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "group_size: [1, 2\n"))


def test_unsafe_yaml_tags_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "seed: !!python/object/apply:os.getcwd []\n"))


def test_invalid_value_from_yaml_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="group_size"):
        load_config(write(tmp_path, "group_size: 1\n"))
    with pytest.raises(ConfigError, match="importance_sampling_level"):
        load_config(write(tmp_path, "importance_sampling_level: bogus\n"))
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(write(tmp_path, "batch_size: eight\n"))


# ------------------------------------------------------------------ parse_cli_value
@pytest.mark.parametrize(
    "text,expected",
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("off", False),
    ],
)
def test_parse_bool(text, expected):
    assert parse_cli_value("adaptive_kl", text) is expected


@pytest.mark.parametrize("text,expected", [("8", 8), (" 12 ", 12), ("-1", -1), ("1e3", 1000)])
def test_parse_int(text, expected):
    value = parse_cli_value("group_size", text)
    assert value == expected and type(value) is int


@pytest.mark.parametrize("text,expected", [("3e-4", 3e-4), ("0.2", 0.2), ("1", 1.0), ("-0.5", -0.5)])
def test_parse_float(text, expected):
    value = parse_cli_value("learning_rate", text)
    assert value == expected and type(value) is float


def test_parse_optional():
    assert parse_cli_value("clip_range", "none") is None
    assert parse_cli_value("clip_range", "NULL") is None
    assert parse_cli_value("clip_range", "0.15") == 0.15
    assert parse_cli_value("reward_model_name", "null") is None
    assert parse_cli_value("reward_model_name", "org/rm") == "org/rm"
    assert parse_cli_value("save_total_limit", "none") is None
    assert parse_cli_value("save_total_limit", "3") == 3
    assert parse_cli_value("loss_aggregation", "none") is None
    assert parse_cli_value("reward_weights", "none") is None


def test_parse_str_is_verbatim():
    assert parse_cli_value("policy_model_name", "./models/x") == "./models/x"
    assert parse_cli_value("importance_sampling_level", "sequence_token") == "sequence_token"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("exact_answer", ["exact_answer"]),
        ("exact_answer,length_penalty", ["exact_answer", "length_penalty"]),
        ("exact_answer, examples/custom_reward.py:my_reward", ["exact_answer", "examples/custom_reward.py:my_reward"]),
        ("[a, b]", ["a", "b"]),
        ("[]", []),
        ("", []),
    ],
)
def test_parse_string_list(text, expected):
    assert parse_cli_value("reward_funcs", text) == expected


def test_parse_float_list():
    assert parse_cli_value("reward_weights", "1,0.5") == [1.0, 0.5]
    assert parse_cli_value("reward_weights", "[1, 2e-1]") == [1.0, 0.2]
    with pytest.raises(ConfigError, match="reward_weights"):
        parse_cli_value("reward_weights", "1,heavy")


@pytest.mark.parametrize(
    "field,text",
    [
        ("adaptive_kl", "maybe"),
        ("group_size", "four"),
        ("group_size", "2.5"),
        ("learning_rate", "fast"),
        ("reward_funcs", "[a, b"),
    ],
)
def test_parse_errors_name_field_and_value(field, text):
    with pytest.raises(ConfigError) as info:
        parse_cli_value(field, text)
    assert field in str(info.value) and repr(text) in str(info.value)


def test_parse_unknown_field():
    with pytest.raises(ConfigError, match="did you mean 'group_size'"):
        parse_cli_value("groupsize", "4")


def test_every_field_type_is_supported():
    for name, f in config_fields().items():
        base, _ = field_type(name)
        assert base in (bool, int, float, str, list, dict), name
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if default is not None and not isinstance(default, list):
            text = str(default).lower() if isinstance(default, bool) else str(default)
            assert parse_cli_value(name, text) == default, name


# ------------------------------------------------------------------ round trip
def test_config_to_yaml_round_trips(tmp_path):
    cfg = GSPOConfig(
        group_size=6,
        clip_range_low=3e-4,
        clip_range_high=4e-4,
        reward_funcs=["exact_answer"],
        reward_weights=[0.5],
        report_to=["jsonl", "tensorboard"],
        loss_aggregation=None,
    )
    text = config_to_yaml(cfg)
    assert load_config(write(tmp_path, text)) == cfg
    assert list(yaml.safe_load(text)) == list(config_fields())  # every field, in order


# ------------------------------------------------------------------ examples
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_yaml_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths (reward files) resolve from the repository root
    cfg = load_config(str(path.relative_to(ROOT)))
    assert isinstance(cfg, GSPOConfig)
    assert cfg.reward_funcs, "every example names a reward"


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"default.yaml", "long_sequence.yaml", "short_sequence.yaml", "paper.yaml", "custom_reward.yaml"} <= names


def test_brief_section_8_2_values():
    long, short = (
        read_yaml(str(ROOT / "examples/long_sequence.yaml")),
        read_yaml(str(ROOT / "examples/short_sequence.yaml")),
    )
    assert {
        k: long[k] for k in ("group_size", "gspo_epochs", "clip_range", "use_group_normalization", "advantage_type")
    } == {
        "group_size": 6,
        "gspo_epochs": 5,
        "clip_range": 0.15,
        "use_group_normalization": True,
        "advantage_type": "normalized",
    }
    assert {
        k: short[k] for k in ("group_size", "gspo_epochs", "clip_range", "use_group_normalization", "advantage_type")
    } == {
        "group_size": 3,
        "gspo_epochs": 3,
        "clip_range": 0.25,
        "use_group_normalization": False,
        "advantage_type": "relative",
    }


def test_paper_preset_values():
    cfg = load_config(str(ROOT / "examples/paper.yaml"))
    assert cfg.importance_sampling_level == "sequence"
    assert (cfg.clip_low, cfg.clip_high) == (3e-4, 4e-4)
    assert cfg.kl_coef == 0 and not cfg.adaptive_kl and not cfg.uses_reference_model
    assert cfg.num_mini_batches == 4 and cfg.entropy_coef == 0


def test_example_yaml_comments_cite_sources():
    for name in ("paper.yaml", "long_sequence.yaml", "short_sequence.yaml", "default.yaml"):
        text = (ROOT / "examples" / name).read_text()
        assert "§" in text, name
    assert "TRL #3834" in (ROOT / "examples/long_sequence.yaml").read_text()


def test_custom_reward_example_runs(monkeypatch):
    monkeypatch.chdir(ROOT)
    rewards = pytest.importorskip("gspo.rewards")
    [f] = rewards.resolve_reward_funcs(["examples/custom_reward.py:my_reward"])
    out = f.fn(prompts=["2+3=", "2-5="], completions=["5", "3"], completion_ids=[[5, 1], [3, 1]], answer=["5", "-3"])
    assert out == [1.0, 0.5]
