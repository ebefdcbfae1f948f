"""Tests for the built-in arithmetic task and the locally built tiny model.

Builds use a temp cache dir and a handful of warm-start steps so the whole
file runs in seconds on CPU.
"""

from __future__ import annotations

import hashlib
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gspo.tasks.arithmetic import (  # noqa: E402
    SPLITS,
    all_problems,
    exact_answer_reward,
    extract_answer,
    make_problems,
    off_by_one_teacher,
)
from gspo.tasks.tiny_model import (  # noqa: E402
    RECIPE_VERSION,
    SFT_SEED,
    SFT_TEACHER_ERROR_RATE,
    build_model,
    build_tokenizer,
    encode_sft_batch,
    ensure_tiny_model,
    evaluate_accuracy,
    generate_completions,
    model_dir_name,
    read_warm_start_info,
    warm_start,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model with only a few warm-start steps (fast, not accurate)."""
    cache = tmp_path_factory.mktemp("gspo_cache")
    return ensure_tiny_model(cache_dir=cache, sft_steps=5, verbose=False)


# --- arithmetic problems ------------------------------------------------------


def test_problems_are_deterministic_and_well_formed():
    a = make_problems(50, seed=3, split="train")
    b = make_problems(50, seed=3, split="train")
    assert a == b
    assert a != make_problems(50, seed=4, split="train")
    for p in a:
        lhs = p["prompt"]
        assert lhs.endswith("=")
        # The answer is the true value of the expression.
        assert str(eval(lhs[:-1])) == p["answer"]  # noqa: S307 - digits and +/- only


def test_off_by_one_teacher_changes_about_its_rate_of_answers_to_the_true_result_plus_one():
    truth = make_problems(4000, seed=1, split="train")
    copy = [dict(p) for p in truth]
    taught = off_by_one_teacher(truth, 0.35, seed=1)
    assert truth == copy  # the input is not modified
    assert [p["prompt"] for p in taught] == [p["prompt"] for p in truth]
    wrong = [(t, p) for t, p in zip(taught, truth) if t["answer"] != p["answer"]]
    assert all(int(t["answer"]) == int(p["answer"]) + 1 for t, p in wrong)  # e.g. "17-42=" -> "-24"
    # Binomial(4000, 0.35): sd = sqrt(4000 * 0.35 * 0.65) / 4000 = 0.0075; 0.025 is over 3 sd.
    assert abs(len(wrong) / 4000 - 0.35) < 0.025
    assert off_by_one_teacher(truth, 0.35, seed=1) == taught
    assert off_by_one_teacher(truth, 0.35, seed=2) != taught
    assert off_by_one_teacher(truth, 0.0, seed=1) == truth


@pytest.mark.parametrize("rate", [0.5, 0.7, -0.1])
def test_off_by_one_teacher_rejects_a_rate_where_the_truth_is_no_majority(rate):
    with pytest.raises(ValueError, match=rf"error_rate must be in \[0, 0.5\).*got {rate}"):
        off_by_one_teacher(make_problems(3, seed=0), rate, seed=0)


def test_train_and_eval_splits_are_disjoint():
    train = {p["prompt"] for p in make_problems(5000, seed=0, split="train")}
    evals = {p["prompt"] for p in make_problems(1000, seed=0, split="eval")}
    assert len(evals) == 1000  # no duplicates when n fits in the split
    assert not train & evals


def test_dev_split_is_disjoint_from_train_and_eval_and_eval_is_unchanged():
    pools = {split: set(all_problems(split)) for split in SPLITS}
    assert not pools["dev"] & pools["train"] and not pools["dev"] & pools["eval"]
    assert not pools["train"] & pools["eval"]
    assert sum(map(len, pools.values())) == 2 * 100 * 100  # together they cover the whole space
    assert len(pools["dev"]) == 1044 and len(pools["eval"]) == 1985
    # The eval pool is the one from before the dev split existed (digest taken from that code).
    digest = hashlib.sha256(repr(all_problems("eval")).encode()).hexdigest()
    assert digest == "0b779212a638fee14d0ce180cd47208a7ea7c78279fbc8cfe198c89b39827f92"
    dev = {p["prompt"] for p in make_problems(512, seed=0, split="dev")}  # the warm start's check
    assert len(dev) == 512 and dev <= {f"{a}{op}{b}=" for a, op, b in pools["dev"]}


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError):
        make_problems(3, seed=0, split="test")


# --- reward ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("81", 1.0),
        ("81<eos>", 1.0),
        (" 81", 1.0),
        ("81 and more", 1.0),
        ("81<eos>7", 1.0),
        ("8", 0.0),
        ("810", 0.0),
        ("", 0.0),
        ("-81", 0.0),
        ([{"role": "assistant", "content": "81"}], 1.0),
    ],
)
def test_exact_answer_reward_cases(completion, expected):
    got = exact_answer_reward(
        prompts=["23+58="], completions=[completion], completion_ids=[[0]], answer=["81"], extra_column=[1]
    )
    assert got == [expected]


def test_exact_answer_reward_negative_answers_and_lengths():
    assert exact_answer_reward(prompts=["1-5=", "2+2="], completions=["-4<eos>", "5"], answer=["-4", "4"]) == [1.0, 0.0]
    assert extract_answer("  12 <eos>") == "12"
    with pytest.raises(ValueError):
        exact_answer_reward(prompts=["a"], completions=["1", "2"], answer=["1"])


# --- tokenizer -----------------------------------------------------------------


def test_tokenizer_round_trip_through_auto_tokenizer(tiny_dir):
    ours = build_tokenizer()
    loaded = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    text = "12+34=46"
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == ours.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert loaded.decode(ids) == text
    assert loaded.get_vocab() == ours.get_vocab()
    assert loaded.padding_side == "left"
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "<eos>"
    assert loaded.decode(loaded.encode("81<eos>"), skip_special_tokens=True) == "81"


def test_sft_batch_masks_prompt_and_padding():
    tok = build_tokenizer()
    batch = encode_sft_batch(tok, [{"prompt": "1+2=", "answer": "3"}, {"prompt": "10+20=", "answer": "30"}])
    labels = batch["labels"]
    # Row 1 is 6 prompt + 2 answer + eos = 9 tokens; row 0 (4 + 1 + 1) gets
    # 3 left pads. Pads and prompt are masked, answer and eos are not.
    assert labels[0].tolist()[:7] == [-100] * 7
    assert labels[0].tolist()[7:] == [tok.convert_tokens_to_ids("3"), tok.eos_token_id]
    assert batch["attention_mask"][0].tolist()[:4] == [0, 0, 0, 1]


# --- warm start stopping rule ------------------------------------------------------


def _small_model():
    tok = build_tokenizer()
    torch.manual_seed(0)
    return build_model(
        tok, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
    ), tok


class ScriptedDev:
    """A dev_accuracy stand-in: returns the scripted values in order and counts its calls."""

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def __call__(self, model):
        self.calls += 1
        return self.values[self.calls - 1]


def test_warm_start_stops_at_the_first_check_reaching_the_target():
    model, tok = _small_model()
    dev = ScriptedDev([0.05, 0.249, 0.25, 0.9])
    result = warm_start(model, tok, max_steps=40, target=0.25, check_every=3, dev_accuracy=dev, batch_size=4)
    # Checks run after steps 3, 6, 9, ...; the third check (0.25, equal to the target) is the first
    # that reaches it, so training stops after 3 * 3 = 9 steps, well before the cap of 40.
    assert (result.steps, dev.calls) == (9, 3)
    assert result.dev_accuracy == 0.25 and result.reached_target and result.target == 0.25
    assert not model.training


def test_warm_start_stops_at_the_cap_with_a_warning():
    model, tok = _small_model()
    dev = ScriptedDev([0.1] * 10)
    with pytest.warns(RuntimeWarning, match="cap of 7 steps with dev accuracy 0.100 below the target 0.500"):
        result = warm_start(model, tok, max_steps=7, target=0.5, check_every=3, dev_accuracy=dev, batch_size=4)
    # Checks after steps 3 and 6, and one at the cap (7): three calls, none reaching 0.5.
    assert (result.steps, dev.calls) == (7, 3)
    assert result.dev_accuracy == 0.1 and not result.reached_target


def test_warm_start_without_target_runs_the_fixed_count_unchecked():
    model, tok = _small_model()
    dev = ScriptedDev([])
    result = warm_start(model, tok, max_steps=4, target=None, dev_accuracy=dev, batch_size=4)
    assert (result.steps, dev.calls, result.dev_accuracy, result.reached_target) == (4, 0, None, True)


# --- model build -----------------------------------------------------------------


def test_ensure_tiny_model_loads_and_generates(tiny_dir):
    assert RECIPE_VERSION in tiny_dir.name
    assert tiny_dir.name == model_dir_name(5)
    info = read_warm_start_info(tiny_dir)
    assert info["steps"] == 5 and info["dev_accuracy"] is None and info["seed"] == SFT_SEED
    assert (tiny_dir / "model.safetensors").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.model_type == "llama"
    enc = tok(["1+2=", "12+34="], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2
    assert enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 3
    problems = make_problems(16, seed=0, split="eval")
    # The same greedy answers decoded directly, scored by hand against the true results.
    answers = generate_completions(model, tok, [p["prompt"] for p in problems], max_new_tokens=8, do_sample=False)
    expected = sum(extract_answer(a) == p["answer"] for a, p in zip(answers, problems)) / 16
    assert evaluate_accuracy(model, tok, problems, batch_size=8) == expected


def test_warm_start_seed_is_part_of_the_cache_key(tmp_path):
    assert model_dir_name(5, seed=SFT_SEED) == model_dir_name(5)
    other = ensure_tiny_model(cache_dir=tmp_path, sft_steps=2, seed=7, verbose=False)
    assert other.name == model_dir_name(2, seed=7) == f"tiny-arithmetic-{RECIPE_VERSION}-sft2-seed7"
    assert json.loads((other / "warm_start.json").read_text())["seed"] == 7


def test_a_non_default_teacher_is_its_own_cache_entry(tmp_path):
    correct = ensure_tiny_model(cache_dir=tmp_path, sft_steps=2, teacher_error_rate=0.0, verbose=False)
    assert (
        correct.name == f"tiny-arithmetic-{RECIPE_VERSION}-sft2-teacher0" == model_dir_name(2, teacher_error_rate=0.0)
    )
    assert json.loads((correct / "warm_start.json").read_text())["teacher_error_rate"] == 0.0
    assert model_dir_name(2, teacher_error_rate=SFT_TEACHER_ERROR_RATE) == model_dir_name(2)


@pytest.mark.parametrize(("field", "stale"), [("target", 0.2), ("seed", 8), ("teacher_error_rate", 0.0)])
def test_a_cached_build_of_another_recipe_is_rebuilt(tmp_path, field, stale):
    """A record whose seed, target or teacher error rate differs from what is asked (an experiment
    wrote it) is not reused."""
    built = ensure_tiny_model(cache_dir=tmp_path, sft_steps=2, seed=7, verbose=False)
    record = json.loads((built / "warm_start.json").read_text())
    assert (record["seed"], record["target"], record["teacher_error_rate"]) == (7, None, SFT_TEACHER_ERROR_RATE)
    (built / "warm_start.json").write_text(json.dumps({**record, field: stale}))
    again = ensure_tiny_model(cache_dir=tmp_path, sft_steps=2, seed=7, verbose=False)
    assert again == built
    assert json.loads((built / "warm_start.json").read_text())[field] == record[field]  # rebuilt: the recipe's record


def test_building_the_model_leaves_the_callers_rng_as_it_was(tmp_path):
    """A trainer that seeds and then finds the model missing must sample as it would from the cached model."""
    torch.manual_seed(42)
    expected = torch.rand(3)  # what the caller draws next without a build in between
    torch.manual_seed(42)
    ensure_tiny_model(cache_dir=tmp_path, sft_steps=2, verbose=False)  # seeds 1234 and trains inside
    assert torch.equal(torch.rand(3), expected)


def test_ensure_tiny_model_uses_cache(tiny_dir):
    stamp = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    again = ensure_tiny_model(cache_dir=tiny_dir.parent, sft_steps=5, verbose=False)
    assert again == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == stamp
    # No temp directories are left behind.
    assert [p.name for p in tiny_dir.parent.iterdir()] == [tiny_dir.name]


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    from gspo.tasks.tiny_model import default_cache_dir

    monkeypatch.setenv("GSPO_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_build_model_accepts_config_overrides():
    from gspo.tasks.tiny_model import build_model

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    assert model.config.hidden_size == 64
    assert model.config.vocab_size == len(tok)
    assert model.generation_config.pad_token_id == tok.pad_token_id
