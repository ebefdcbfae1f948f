"""Faults a user meets, driven through the public path (GSPOConfig, GSPOTrainer(...).train()):
bad config values, bad data, bad rewards, non-finite updates, unsafe files.

tests/test_data.py and tests/test_rewards.py cover the loader and reward checks as units;
here we check that the trainer surfaces them as clear errors (or, where a policy says so,
carries on and counts them).
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import fault_worker as fw
import pytest
import torch
import yaml

from gspo import checkpoint as ckpt
from gspo.config import ConfigError, GSPOConfig
from gspo.data import DataError
from gspo.faults import NonFiniteUpdateError
from gspo.rewards import RewardError
from gspo.trainer import GSPOTrainer

SRC = Path(__file__).resolve().parents[1] / "src"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {"root": root, "model": fw.make_model_dir(root / "model"), "data": fw.make_dataset(root / "data.jsonl")}


def make_trainer(env, tmp_path, reward=fw.digit_reward, **overrides):
    cfg = fw.make_config(tmp_path / "run", env["model"], **{"max_steps": 2, **overrides})
    return GSPOTrainer(cfg, reward_funcs=[reward] if reward is not None else None)


# ----------------------------------------------------------------------------------
# 1. config validation
# ----------------------------------------------------------------------------------
BAD_CONFIG = [
    ("group_size", 1),
    ("group_size", 0),
    ("group_size", 2.0),
    ("clip_range", 0.0),
    ("clip_range", -0.1),
    ("clip_range", 1.5),
    ("clip_range", NAN),
    ("clip_range", "0.2"),
    ("clip_range_low", -1.0),
    ("clip_range_high", 0),
    ("clip_range_high", INF),
    ("batch_size", 0),
    ("batch_size", True),
    ("batch_size", 2.5),
    ("num_mini_batches", 3),  # 8 * 4 = 32 sequences do not split into 3 mini-batches
    ("gradient_accumulation_steps", 3),  # nor a mini-batch of 32 into 3 micro-batches
    ("num_mini_batches", 0),
    ("gspo_epochs", 0),
    ("max_new_tokens", 0),
    ("max_prompt_length", 0),
    ("importance_sampling_level", "seq"),
    ("importance_sampling_level", "GSPO"),
    ("loss_aggregation", "sum"),
    ("loss_aggregation", "token-mean"),  # token-mean is for token level only
    ("advantage_type", "zscore"),
    ("kl_estimator", "k4"),
    ("lr_scheduler_type", "step"),
    ("torch_dtype", "fp8"),
    ("reward_error_policy", "ignore"),
    ("prompt_truncation", "right"),
    ("policy_model_name", "./no/such/model-dir"),
    ("reward_model_name", "/no/such/reward-model"),
    ("policy_model_name", "builtin:gpt5"),
    ("policy_model_name", 7),
    ("dataset_path", "/no/such/prompts.jsonl"),
    ("eval_dataset_path", "/no/such/eval.jsonl"),
    ("learning_rate", "1e-5"),
    ("learning_rate", 0.0),
    ("learning_rate", -1e-5),
    ("learning_rate", NAN),
    ("learning_rate", INF),
    ("kl_coef", -0.1),
    ("kl_coef", NAN),
    ("entropy_coef", NAN),
    ("weight_decay", -1.0),
    ("max_grad_norm", -1.0),
    ("max_grad_norm", NAN),
    ("temperature", 0.0),
    ("temperature", INF),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -1),
    ("adam_beta1", 1.0),
    ("adam_beta2", -0.1),
    ("target_kl", 0.0),
    ("max_log_ratio", 0.0),
    ("max_log_ratio", INF),
    ("lora_dropout", 1.0),
    ("lora_r", 0),
    ("reward_penalty_value", NAN),
    ("reward_model_weight", INF),
    ("max_steps", 0),
    ("max_steps", -2),
    ("save_steps", -1),
    ("save_total_limit", 0),
    ("save_total_limit", 2.5),
    ("max_consecutive_skipped_updates", 0),
    ("seed", -1),
    ("seed", "42"),
    ("use_lora", "yes"),
    ("fsdp", "yes"),
    ("progress_bar", 1),
    ("reward_funcs", "exact_answer"),
    ("lora_target_modules", "q_proj"),
    ("report_to", ["mlflow"]),
    ("reward_weights", [1.0]),
    ("resume_from_checkpoint", 3),
    ("prompt_column", ""),
]


@pytest.mark.parametrize("field,value", BAD_CONFIG, ids=[f"{f}={v!r}" for f, v in BAD_CONFIG])
def test_bad_config_value_names_field_value_and_rule(field, value):
    with pytest.raises(ConfigError) as info:
        GSPOConfig(**{field: value})
    msg = str(info.value)
    assert field in msg and repr(value) in msg, msg
    assert re.search(r"must|expected|contradicts|does not exist|no such|only|needs|entries", msg), msg


def test_good_config_edges_are_accepted():
    GSPOConfig(
        group_size=2,
        clip_range=0.2,
        clip_range_low=1e-4,
        clip_range_high=5.0,
        num_mini_batches=4,
        gradient_accumulation_steps=2,
        max_grad_norm=0.0,
        top_p=1.0,
        reward_weights=[2],
        reward_funcs=["exact_answer"],
        save_total_limit=1,
        seed=0,
        lora_dropout=0.0,
    )


def test_no_reward_is_a_config_error(env, tmp_path):
    with pytest.raises(ConfigError, match="no reward"):
        make_trainer(env, tmp_path, reward=None)


# ----------------------------------------------------------------------------------
# 2. data, through GSPOTrainer.train()
# ----------------------------------------------------------------------------------
def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("case", ["empty", "blank-lines", "whitespace-prompt", "malformed", "no-column", "not-object"])
def test_bad_data_surfaces_as_data_error(env, tmp_path, case):
    good = json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n"
    text, expect = {
        "empty": ("", r"empty"),
        "blank-lines": ("\n  \n", r"empty"),
        "whitespace-prompt": (
            good + json.dumps({"prompt": "   ", "answer": "0"}) + "\n",
            r"row 1 .*empty or whitespace",
        ),
        "malformed": (good * 2 + '{"prompt": "2+2=", "answer": \n', r"bad\.jsonl: line 3 is not valid JSON"),
        "no-column": (good + json.dumps({"question": "3+3="}) + "\n", r"row 1 has no prompt column 'prompt'"),
        "not-object": (good + "[1, 2]\n", r"row 1 is a list"),
    }[case]
    path = _write(tmp_path, "bad.jsonl", text)
    trainer = make_trainer(env, tmp_path)
    with pytest.raises(DataError, match=expect):
        trainer.train(path)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not fw.read_metrics(tmp_path / "run")


def test_missing_dataset_file_is_a_data_error(env, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        make_trainer(env, tmp_path).train(str(tmp_path / "nope.jsonl"))


def test_fewer_prompts_than_batch_is_a_config_error(env, tmp_path):
    path = _write(tmp_path, "one.jsonl", json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(ConfigError, match="batch_size=2"):
        make_trainer(env, tmp_path).train(path)


def test_too_long_prompt_errors_by_default(env, tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1+" * 20 + "1=", "answer": "21"}]
    path = _write(tmp_path, "long.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"row 1 is \d+ tokens, longer than max_prompt_length=16"):
        make_trainer(env, tmp_path).train(path)


def test_too_long_prompt_left_truncated_with_warning_and_trains(env, tmp_path):
    rows = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "9+" * 20 + "1=", "answer": "181"}]
    path = _write(tmp_path, "long.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    def reward(prompts, completions, **kw):
        seen.extend(prompts)
        return fw.digit_reward(completions)

    trainer = make_trainer(env, tmp_path, reward=reward, prompt_truncation="left", max_steps=1)
    with pytest.warns(UserWarning, match="longer than max_prompt_length=16 .* cut on the left"):
        trainer.train(path)
    long = [p for p in seen if p.endswith("9+1=")]
    assert long and all(len(p) <= 16 for p in long)  # one char per token; the BOS is not in the text


# ----------------------------------------------------------------------------------
# 3. rewards, through GSPOTrainer.train()
# ----------------------------------------------------------------------------------
def r_wrong_count(completions, **kw):
    return [1.0] * (len(completions) - 1)


def r_nan(completions, **kw):
    return [NAN if i == 1 else 1.0 for i in range(len(completions))]


def r_inf(completions, **kw):
    return [1.0, -INF] + [0.0] * (len(completions) - 2)


def r_text(completions, **kw):
    return ["high"] + [0.0] * (len(completions) - 1)


def r_raises(completions, **kw):
    raise ZeroDivisionError("boom")


def r_scalar(completions, **kw):
    return 1.0


REWARD_FAULTS = [
    (r_wrong_count, r"'r_wrong_count' returned 3 values; expected .* 4"),
    (r_nan, r"'r_nan' returned .*nan.* for sample 1 \(prompt: '"),
    (r_inf, r"'r_inf' returned .*inf.* for sample 1 \(prompt: '"),
    (r_text, r"'r_text' returned .*'high'.* for sample 0"),
    (r_raises, r"'r_raises' raised ZeroDivisionError: boom"),
    (r_scalar, r"'r_scalar' returned float"),
]


@pytest.mark.parametrize("fn,expect", REWARD_FAULTS, ids=[f.__name__ for f, _ in REWARD_FAULTS])
def test_bad_reward_is_a_clear_error_naming_function_and_sample(env, tmp_path, fn, expect):
    trainer = make_trainer(env, tmp_path, reward=fn)
    before = fw.params_of(trainer.model)
    with pytest.raises(RewardError, match=expect):
        trainer.train(env["data"])
    after = fw.params_of(trainer.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was learned from it


@pytest.mark.parametrize(
    "fn,bad_per_step", [(r_nan, 1), (r_raises, 4), (r_wrong_count, 4)], ids=["nan", "raises", "wrong-count"]
)
def test_penalty_policy_continues_and_counts(env, tmp_path, fn, bad_per_step):
    trainer = make_trainer(env, tmp_path, reward=fn, reward_error_policy="penalty", reward_penalty_value=-1.0)
    with pytest.warns(UserWarning, match=f"'{fn.__name__}'.*penalty value"):
        history = trainer.train(env["data"])
    assert [m["reward_penalized"] for m in history] == [bad_per_step] * 2
    assert [m["reward_penalized"] for m in fw.read_metrics(tmp_path / "run")] == [bad_per_step] * 2
    for name, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), name


def _two_label_reward_model(path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from gspo.tasks.tiny_model import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForSequenceClassification(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def test_reward_model_with_two_labels_is_rejected(env, tmp_path):
    rm = _two_label_reward_model(tmp_path / "rm2")
    cfg = fw.make_config(tmp_path / "run", env["model"], reward_model_name=rm, max_steps=1)
    with pytest.raises(RewardError, match=r"reward model .*rm2.* num_labels=2.*one score"):
        GSPOTrainer(cfg).train(env["data"])


# ----------------------------------------------------------------------------------
# 4. non-finite loss / gradient
# ----------------------------------------------------------------------------------
class NaNUpdates:
    """Forward hooks (PyTorch's hook API: nothing in gspo is patched) that make the chosen updates' losses
    and gradients NaN: the policy's grad-enabled forwards are counted (one per update here, 1-based),
    and in the chosen ones the output head's input, the final hidden states, becomes NaN."""

    def __init__(self, model, calls):
        self.calls, self.n = set(calls), 0
        model.register_forward_pre_hook(self._count)
        model.get_output_embeddings().register_forward_pre_hook(self._poison)

    def _count(self, module, args):
        self.n += torch.is_grad_enabled()

    def _poison(self, module, args):
        if torch.is_grad_enabled() and self.n in self.calls:
            return (args[0] * NAN,) + tuple(args[1:])
        return None


def _snapshotting_reward(snapshots, trainer_ref):
    def digit_reward(completions, **kw):  # runs once per step, before that step's update
        snapshots.append(fw.params_of(trainer_ref[0].model))
        return fw.digit_reward(completions)

    return digit_reward


def test_non_finite_update_is_skipped_counted_and_warned(env, tmp_path):
    """gspo_epochs=1: one update per step. The update of step 2 is poisoned (NaN loss and gradient); it must
    leave the weights exactly as they were, count in skipped_updates and warn; training goes on. (A
    non-finite loss with a finite gradient: tests/test_backends.py, at the back-end's step.)"""
    snaps, ref = [], [None]
    ref[0] = trainer = make_trainer(env, tmp_path, reward=_snapshotting_reward(snaps, ref), gspo_epochs=1, max_steps=3)
    NaNUpdates(trainer.policy.unwrapped(), {2})
    with pytest.warns(RuntimeWarning, match=r"non-finite loss \(grad norm nan\) at step 2: update skipped"):
        history = trainer.train(env["data"])
    assert [m["skipped_updates"] for m in history] == [0, 1, 1]
    final = fw.params_of(trainer.model)
    changed = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert changed(snaps[0], snaps[1])  # step 1 updated
    assert not changed(snaps[1], snaps[2])  # step 2 skipped: bit-identical weights
    assert changed(snaps[2], final)  # step 3 updated again
    for name, p in final.items():
        assert torch.isfinite(p).all(), name
    for state in trainer.optimizer.state.values():  # no NaN parked in Adam's moments either
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


def test_consecutive_non_finite_updates_stop_with_checkpoint(env, tmp_path):
    trainer = make_trainer(env, tmp_path, gspo_epochs=2, max_steps=5, max_consecutive_skipped_updates=3)
    NaNUpdates(trainer.policy.unwrapped(), set(range(3, 99)))
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(NonFiniteUpdateError, match=r"3 consecutive .*max_consecutive_skipped_updates=3.*checkpoint"),
    ):
        trainer.train(env["data"])
    # updates 1-2 (step 1) went through; 3, 4 (step 2) and 5 (step 3) were skipped
    assert trainer.step == 2
    latest = ckpt.find_latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "checkpoint-2"
    state = json.loads((latest / ckpt.TRAINER_STATE_FILE).read_text())
    assert state["skips"] == {"total": 3, "in_a_row": 3}
    live = fw.params_of(trainer.model)
    for name, p in live.items():
        assert torch.isfinite(p).all(), name
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(env["model"])
    ckpt.load_checkpoint(latest, loaded, restore_rng=False)
    assert all(torch.equal(p, live[n]) for n, p in fw.params_of(loaded).items())


def test_non_finite_stop_keeps_the_clean_checkpoint_of_that_step(env, tmp_path):
    """gspo_epochs=3, limit 2, save_steps=1: step 2's first update applies, its next two are NaN.
    The stop must not overwrite the clean checkpoint-1 with the half-updated state of step 2."""
    snaps, ref = [], [None]
    ref[0] = trainer = make_trainer(
        env,
        tmp_path,
        reward=_snapshotting_reward(snaps, ref),
        gspo_epochs=3,
        max_steps=4,
        save_steps=1,
        max_consecutive_skipped_updates=2,
    )
    NaNUpdates(trainer.policy.unwrapped(), {5, 6})
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteUpdateError, match="checkpoint-1"):
        trainer.train(env["data"])
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(env["model"])
    ckpt.load_checkpoint(tmp_path / "run" / "checkpoint-1", loaded, restore_rng=False)
    saved, live = fw.params_of(loaded), fw.params_of(trainer.model)
    assert all(torch.equal(saved[k], snaps[1][k]) for k in saved)  # the end-of-step-1 state
    assert any(not torch.equal(saved[k], live[k]) for k in saved)  # step 2's first update is not in it
    assert json.loads((tmp_path / "run" / "checkpoint-1" / ckpt.TRAINER_STATE_FILE).read_text())["step"] == 1


def test_nan_logits_skip_the_update_and_do_not_poison_adaptive_kl(env, tmp_path):
    """NaN injected into the policy's logits during step 2 (a forward hook): the update is
    skipped, kl_coef stays finite (it used to become NaN for good, failing every later step)
    and step 3 trains normally."""
    step = {"n": 0}

    def reward(completions, **kw):
        step["n"] += 1
        return fw.digit_reward(completions)

    trainer = make_trainer(env, tmp_path, reward=reward, gspo_epochs=1, max_steps=3, kl_coef=0.05, adaptive_kl=True)

    def hook(module, args, output):  # only the update's forward runs with grad enabled
        return output * NAN if step["n"] == 2 and torch.is_grad_enabled() else None

    trainer.policy.unwrapped().lm_head.register_forward_hook(hook)
    with pytest.warns(RuntimeWarning, match="update skipped"):
        history = trainer.train(env["data"])
    assert [m["skipped_updates"] for m in history] == [0, 1, 1]
    assert all(math.isfinite(m["kl_coef"]) for m in history)
    assert math.isfinite(history[2]["loss"]) and history[2]["grad_norm"] > 0
    for name, p in trainer.model.named_parameters():
        assert torch.isfinite(p).all(), name


# ----------------------------------------------------------------------------------
# 8. safe loading
# ----------------------------------------------------------------------------------
def test_source_loads_only_safely():
    """Inspection: every torch.load passes weights_only=True, YAML goes through safe_load,
    nothing unpickles, and trust_remote_code is never hard-wired on."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^()]*(?:\([^()]*\)[^()]*)*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{path.name}: torch.load({m.group(1)})")
        for bad in (
            r"yaml\.load\(",
            r"yaml\.unsafe_load",
            r"pickle\.loads?\(",
            r"trust_remote_code\s*=\s*True",
            r"(?<![.\w])eval\(",
            r"(?<![.\w])exec\(",
        ):
            for m in re.finditer(bad, text):
                problems.append(f"{path.name}: {m.group(0)}")
    assert not problems, problems
    assert GSPOConfig().trust_remote_code is False
    from gspo.yaml_config import _StrictLoader  # the config reader's loader: safe_load's, plus a duplicate-key check

    assert issubclass(_StrictLoader, yaml.SafeLoader)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _saved_checkpoint(env, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = ckpt.save_checkpoint(
        tmp_path / "out",
        1,
        model,
        optimizer=opt,
        scheduler=sched,
        trainer_state={"kl_controller": {}, "skips": {"total": 0, "in_a_row": 0}},
    )
    return path, model, opt, sched


@pytest.mark.parametrize("victim", [ckpt.OPTIMIZER_FILE, ckpt.SCHEDULER_FILE, ckpt.RNG_FILE])
def test_malicious_pickle_in_checkpoint_is_refused_not_run(env, tmp_path, victim):
    path, model, opt, sched = _saved_checkpoint(env, tmp_path)
    marker = tmp_path / "pwned.txt"
    torch.save({"state": _Evil(str(marker))}, path / victim)  # a tampered file in torch's own format
    with pytest.raises(ckpt.CheckpointError, match=rf"{victim} cannot be loaded .*Weights only load failed") as info:
        ckpt.load_checkpoint(path, model, opt, sched)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists(), "loading a checkpoint executed code from a pickle"


def test_pickled_weights_next_to_safetensors_are_ignored(env, tmp_path):
    """A pytorch_model.bin planted beside model.safetensors is never opened."""
    path, model, opt, sched = _saved_checkpoint(env, tmp_path)
    marker = tmp_path / "pwned.txt"
    with open(path / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Evil(str(marker)), fh)
    ckpt.load_checkpoint(path, model, opt, sched)
    assert not marker.exists()
