"""gspo.rewards: resolving specs, the checked weighted sum, penalties, the reward model."""

from __future__ import annotations

import math
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from gspo.config import ConfigError, GSPOConfig
from gspo.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    RewardFunction,
    RewardModelScorer,
    RewardScorer,
    SoftOverlongPunishment,
    compute_rewards,
    resolve_reward_funcs,
)
from helpers_data import save_tiny_reward_model

PROMPTS = ["1+2=", "3+4=", "5-9="]
COMPLETIONS = ["3", "8 maybe", "-4<eos>"]
IDS = [[5], [6, 7, 8], [9, 10]]
ANSWERS = ["3", "7", "-4"]


def ones(prompts, completions, **kwargs):
    return [1.0] * len(completions)


def rf(fn, name=None, weight=1.0):
    return RewardFunction(name or fn.__name__, fn, weight)


def run(funcs, **kw):
    return compute_rewards(funcs, PROMPTS, COMPLETIONS, IDS, extra={"answer": ANSWERS}, **kw)


# --- resolving ---------------------------------------------------------------------
def test_resolve_callable_and_builtin():
    funcs = resolve_reward_funcs([ones, "exact_answer", "length_penalty"], weights=[1, 2.5, 0.5])
    assert [f.name for f in funcs] == ["ones", "exact_answer", "length_penalty"]
    assert [f.weight for f in funcs] == [1.0, 2.5, 0.5]
    assert funcs[0].fn is ones and funcs[1].fn is BUILTIN_REWARDS["exact_answer"]


def test_resolve_module_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text("def score(completions, **kw):\n    return [2.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (f,) = resolve_reward_funcs(["my_rewards_mod:score"])
    assert f.name == "score" and f.fn(completions=["a"]) == [2.0]
    with pytest.raises(RewardError, match="has no callable 'nope'.*score"):
        resolve_reward_funcs(["my_rewards_mod:nope"])
    with pytest.raises(RewardError, match="cannot import reward module 'no_such_mod_xyz'"):
        resolve_reward_funcs(["no_such_mod_xyz:f"])


def test_resolve_file_function(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def short(completions, **kw):\n    return [-len(c) for c in completions]\n")
    (f,) = resolve_reward_funcs([f"{path}:short"])
    assert f.name == "short" and f.fn(completions=["ab"]) == [-2]
    with pytest.raises(RewardError, match="does not exist"):
        resolve_reward_funcs([f"{tmp_path / 'missing.py'}:f"])
    bad = tmp_path / "broken.py"
    bad.write_text("raise ImportError('boom')\n")
    with pytest.raises(RewardError, match="broken.py.*raised ImportError while loading: boom"):
        resolve_reward_funcs([f"{bad}:f"])


def test_resolve_dict_with_weight_and_dedupe(tmp_path):
    funcs = resolve_reward_funcs([{"name": "answer_match", "weight": 3}, {"path": "answer_match"}, ones, ones])
    assert [(f.name, f.weight) for f in funcs] == [
        ("answer_match", 3.0),
        ("answer_match_2", 1.0),
        ("ones", 1.0),
        ("ones_2", 1.0),
    ]


def test_resolve_errors():
    with pytest.raises(RewardError) as e:
        resolve_reward_funcs(["nope"])
    assert "'nope'" in str(e.value) and "exact_answer" in str(e.value) and "length_penalty" in str(e.value)
    with pytest.raises(RewardError, match="2 entries but there are 1"):
        resolve_reward_funcs([ones], weights=[1, 2])
    with pytest.raises(RewardError, match="weight"):
        resolve_reward_funcs([ones], weights=[float("nan")])
    with pytest.raises(RewardError, match="exactly one of 'name' or 'path'"):
        resolve_reward_funcs([{"weight": 1}])
    with pytest.raises(RewardError, match="give it once"):
        resolve_reward_funcs([{"name": "answer_match", "weight": 2}], weights=[3])
    assert resolve_reward_funcs(None) == []


def test_none_weight_entry_keeps_dict_weight():
    funcs = resolve_reward_funcs([{"name": "answer_match", "weight": 2}, ones], weights=[None, 0.5])
    assert [f.weight for f in funcs] == [2.0, 0.5]


# --- built-ins ---------------------------------------------------------------------
def test_builtins_by_hand():
    ans = BUILTIN_REWARDS["answer_match"](completions=["3", " 7 because", "71", "7"], answer=["3", "7", "7", 7])
    assert ans == [1.0, 1.0, 0.0, 1.0]
    assert BUILTIN_REWARDS["length_penalty"](completion_ids=IDS) == pytest.approx([-0.001, -0.003, -0.002])
    assert BUILTIN_REWARDS["exact_answer"](completions=COMPLETIONS, answer=ANSWERS) == [1.0, 0.0, 1.0]


# --- soft overlong punishment (DAPO Eq. 13) ---------------------------------------------
def test_soft_overlong_punishment_by_hand():
    # L_max = 10, L_cache = 4: lengths up to 10 - 4 = 6 go free, then (6 - |y|) / 4 per token, -1 from 10 on.
    fn = SoftOverlongPunishment(max_len=10, buffer_len=4)
    lengths = [0, 5, 6, 7, 8, 9, 10, 11, 30]
    expected = [
        0.0,  # empty
        0.0,  # 5 <= 6
        0.0,  # 6 <= 6: the edge of the buffer is still free
        -0.25,  # (6 - 7) / 4
        -0.5,  # (6 - 8) / 4
        -0.75,  # (6 - 9) / 4
        -1.0,  # (6 - 10) / 4: L_max itself, a completion cut off by max_new_tokens
        -1.0,  # beyond L_max: -penalty (not -1.25: capped, as TRL; verl would keep falling)
        -1.0,
    ]
    assert fn(completion_ids=[[7] * n for n in lengths]) == pytest.approx(expected, abs=1e-12)
    half = SoftOverlongPunishment(max_len=10, buffer_len=4, penalty=0.5)
    # (6 - 7) / 4 * 0.5 = -0.125; (6 - 9) / 4 * 0.5 = -0.375; beyond: -0.5
    assert half(completion_ids=[[1] * 6, [1] * 7, [1] * 9, [1] * 12]) == pytest.approx([0.0, -0.125, -0.375, -0.5])
    one = SoftOverlongPunishment(max_len=2, buffer_len=1)  # the smallest buffer: 1 free token, then -1
    assert one(completion_ids=[[1], [1, 2], [1, 2, 3]]) == [0.0, -1.0, -1.0]
    assert SoftOverlongPunishment(10, 4, penalty=0)(completion_ids=[[1] * 9]) == [0.0]  # factor 0: off
    with pytest.raises(ValueError, match="completion_ids"):
        fn(completions=["abc"])


def _overlong_config(**kw):
    return GSPOConfig(**{"max_new_tokens": 10, "overlong_buffer_len": 4, **kw})


def test_soft_overlong_punishment_resolves_by_name_from_the_config():
    cfg = _overlong_config(
        reward_funcs=["exact_answer", {"name": "soft_overlong_punishment", "weight": 2.0}], overlong_penalty=0.5
    )
    scorer = RewardScorer.from_config(cfg)
    assert [f.name for f in scorer.funcs] == ["exact_answer", "soft_overlong_punishment"]
    bound = scorer.funcs[1].fn
    assert (bound.max_len, bound.buffer_len, bound.penalty) == (10, 4, 0.5)  # max_new_tokens is L_max
    ids = [[1] * 3, [1] * 8, [1] * 10]
    res = compute_rewards(scorer.funcs, PROMPTS, COMPLETIONS, ids, extra={"answer": ANSWERS})
    # exact_answer: 1, 0, 1. overlong (raw): 0, (6 - 8) / 4 * 0.5 = -0.25, -0.5; weight 2 -> 0, -0.5, -1.0
    assert res.per_func["soft_overlong_punishment"].tolist() == pytest.approx([0.0, -0.25, -0.5])
    assert res.total.tolist() == pytest.approx([1.0, -0.5, 0.0])


def test_soft_overlong_punishment_from_yaml(tmp_path):
    from gspo.yaml_config import load_config

    path = tmp_path / "run.yaml"
    path.write_text(
        "reward_funcs: [exact_answer, soft_overlong_punishment]\nmax_new_tokens: 64\noverlong_buffer_len: 16\n"
    )
    fn = RewardScorer.from_config(load_config(str(path))).funcs[1].fn
    # L_max 64, L_cache 16: free up to 48 tokens; 56 -> (48 - 56) / 16 = -0.5
    assert (fn.max_len, fn.buffer_len, fn.penalty) == (64, 16, 1.0)
    assert fn(completion_ids=[[0] * 48, [0] * 56, [0] * 64]) == [0.0, -0.5, -1.0]


def test_soft_overlong_punishment_needs_a_config():
    with pytest.raises(RewardError, match="soft_overlong_punishment.*config"):
        resolve_reward_funcs(["soft_overlong_punishment"])
    with pytest.raises(RewardError, match="soft_overlong_punishment"):  # listed among the built-ins
        resolve_reward_funcs(["soft_overlong"])


@pytest.mark.parametrize(
    "overrides, field, value",
    [
        (dict(overlong_buffer_len=0), "overlong_buffer_len", "0"),
        (dict(overlong_buffer_len=-3), "overlong_buffer_len", "-3"),
        (dict(overlong_buffer_len=10), "overlong_buffer_len", "10"),  # == max_new_tokens: nothing goes free
        (dict(overlong_buffer_len=11), "overlong_buffer_len", "11"),
        (dict(overlong_buffer_len=4.0), "overlong_buffer_len", "4.0"),
        (dict(overlong_buffer_len=True), "overlong_buffer_len", "True"),
        (dict(overlong_penalty=-0.5), "overlong_penalty", "-0.5"),
        (dict(overlong_penalty=float("inf")), "overlong_penalty", "inf"),
        (dict(overlong_buffer_len=None, reward_funcs=["soft_overlong_punishment"]), "overlong_buffer_len", "None"),
        (
            dict(overlong_buffer_len=None, reward_funcs=[{"name": "soft_overlong_punishment"}]),
            "overlong_buffer_len",
            "None",
        ),
    ],
)
def test_overlong_config_errors_name_the_field_and_value(overrides, field, value):
    with pytest.raises(ConfigError) as e:
        _overlong_config(**overrides)
    assert f"GSPOConfig.{field}={value}" in str(e.value)


def test_overlong_buffer_unset_is_fine_without_the_reward():
    assert GSPOConfig(max_new_tokens=2, reward_funcs=["exact_answer"]).overlong_buffer_len is None
    cfg = GSPOConfig(max_new_tokens=10, reward_funcs=["exact_answer"])
    cfg.reward_funcs = ["soft_overlong_punishment"]  # changed after validation: the binding still says what is missing
    with pytest.raises(ConfigError, match="overlong_buffer_len=None"):
        RewardScorer.from_config(cfg)
    with pytest.raises(ValueError, match="buffer_len"):
        SoftOverlongPunishment(max_len=10, buffer_len=10)
    with pytest.raises(ValueError, match="penalty"):
        SoftOverlongPunishment(max_len=10, buffer_len=4, penalty=-1.0)


# --- weighted sum ------------------------------------------------------------------
def test_weighted_total_by_hand():
    funcs = resolve_reward_funcs(["exact_answer", "length_penalty", ones], weights=[2.0, 10.0, -0.5])
    res = run(funcs)
    # exact: [1, 0, 1]; length: [-.001, -.003, -.002]; ones: [1, 1, 1]
    expected = [2 * 1 - 0.01 - 0.5, 2 * 0 - 0.03 - 0.5, 2 * 1 - 0.02 - 0.5]
    assert res.total.dtype == torch.float32 and res.total.tolist() == pytest.approx(expected)
    assert res.per_func["exact_answer"].tolist() == [1.0, 0.0, 1.0]  # raw, unweighted
    assert res.per_func["ones"].dtype == torch.float32
    assert res.num_penalized == 0


def test_extra_columns_reach_function_as_kwargs():
    seen = {}

    def spy(prompts, completions, completion_ids, answer, level, **kwargs):
        seen.update(prompts=prompts, completion_ids=completion_ids, answer=answer, level=level, rest=kwargs)
        return [0.0] * len(completions)

    compute_rewards([rf(spy)], PROMPTS, COMPLETIONS, IDS, extra={"answer": ANSWERS, "level": [1, 2, 3]})
    assert seen == {"prompts": PROMPTS, "completion_ids": IDS, "answer": ANSWERS, "level": [1, 2, 3], "rest": {}}


@pytest.mark.parametrize("out", [[1, 2, 3], (1, True, 3.0), torch.tensor([1.0, 2.0, 3.0]), np.array([1, 2, 3])])
def test_accepted_return_types(out):
    res = run([rf(lambda **kw: out, "f")])
    assert res.per_func["f"].tolist() == [1.0, float(out[1]), 3.0]


# --- errors (raise policy) -----------------------------------------------------------
@pytest.mark.parametrize(
    "value,what",
    [
        (float("nan"), "non-finite value nan"),
        (float("inf"), "non-finite value inf"),
        ("high", "str 'high'"),
        ([1.0], "list"),
    ],
)
def test_bad_entry_names_function_and_sample(value, what):
    def bad(completions, **kw):
        return [1.0, value, 0.0]

    with pytest.raises(RewardError) as e:
        run([rf(ones), rf(bad)])
    msg = str(e.value)
    assert "'bad'" in msg and "sample 1" in msg and what in msg and "'3+4='" in msg


@pytest.mark.parametrize("out,got", [([1.0, 2.0], "2 values"), (5.0, "float"), (torch.zeros(3, 1), "Tensor")])
def test_wrong_count_or_shape(out, got):
    with pytest.raises(RewardError) as e:
        run([rf(lambda **kw: out, "short")])
    assert "'short'" in str(e.value) and got in str(e.value) and "of 3 numbers" in str(e.value)


def test_exception_is_wrapped_and_chained():
    def boom(**kw):
        raise ValueError("bad answer format")

    with pytest.raises(RewardError, match=r"reward function 'boom' raised ValueError: bad answer format") as e:
        run([rf(boom)])
    assert isinstance(e.value.__cause__, ValueError)
    assert str(e.value).endswith("(batch of 3 samples)")


def test_exception_names_file_line_sample_and_columns():
    def raises_mid(completions, answer, **kw):
        out = []
        for c in completions:
            if c.startswith("8"):  # COMPLETIONS[1] = "8 maybe": the second sample
                out.append({}["missing_key"])
            out.append(1.0)
        return out

    line = raises_mid.__code__.co_firstlineno + 4  # the line of the dict lookup
    with pytest.raises(RewardError) as e:
        run([rf(raises_mid)])
    msg = str(e.value)
    assert f"at test_rewards.py:{line} in raises_mid" in msg
    assert "on sample 1 (prompt: '3+4=')" in msg
    assert "columns passed: ['answer', 'completion_ids', 'completions', 'prompts']" in msg


def test_trl_style_message_indexing_gets_a_hint():
    def trl_style(completions, **kw):
        return [1.0 if c[0]["content"] else 0.0 for c in completions]

    with pytest.raises(RewardError, match=r"completions are plain strings here.*messages="):
        run([rf(trl_style)])


class FakeTimeout(BaseException):  # math-verify's TimeoutException derives from BaseException
    pass


def test_base_exceptions_are_penalised_exit_is_an_error_and_interrupt_passes():
    def slow(**kw):
        raise FakeTimeout("took too long")

    with pytest.warns(UserWarning, match="FakeTimeout"):
        res = run([rf(slow), rf(ones)], error_policy="penalty", penalty_value=-1.0)
    assert res.per_func["slow"].tolist() == [-1.0, -1.0, -1.0] and res.num_penalized == 3
    with pytest.raises(RewardError, match="raised FakeTimeout"):
        run([rf(slow)])

    def exits(**kw):
        sys.exit(3)

    for policy in ("raise", "penalty"):  # a reward that exits is a bug: an error naming it, never a score
        with pytest.raises(RewardError, match=r"'exits' raised SystemExit: 3 \(it called sys.exit\(3\)"):
            run([rf(exits)], error_policy=policy)

    def interrupted(**kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run([rf(interrupted)], error_policy="penalty")


def sleeps(completions, **kw):
    time.sleep(30)
    return [1.0] * len(completions)


@pytest.mark.parametrize("thread", [False, True])
def test_a_reward_that_does_not_return_is_stopped_at_the_timeout(thread):
    def score(**kw):
        out = {}
        try:
            out["value"] = run([rf(sleeps), rf(ones)], timeout_s=0.3, **kw)
        except RewardError as e:
            out["error"] = e
        return out

    def on(**kw):  # the main thread uses a SIGALRM timer; another thread abandons a worker thread
        if not thread:
            return score(**kw)
        box = {}
        worker = threading.Thread(target=lambda: box.update(score(**kw)))
        worker.start()
        worker.join(20)
        return box

    start = time.monotonic()
    got = on()
    assert "did not return within reward_timeout_s=0.3 s" in str(got["error"]) and "'sleeps'" in str(got["error"])
    with pytest.warns(UserWarning, match="reward_timeout_s"):
        res = on(error_policy="penalty", penalty_value=-1.0)["value"]
    assert res.per_func["sleeps"].tolist() == [-1.0] * 3 and res.total.tolist() == [0.0] * 3  # -1 + ones' 1
    assert time.monotonic() - start < 5  # two calls of 0.3 s each, not 2 x 30 s


# --- None: no opinion ----------------------------------------------------------------
def test_none_is_left_out_of_the_total_and_the_mean():
    def picky(completions, **kw):
        return [1.0, None, 0.0]

    res = run([rf(picky, weight=2.0), rf(ones, weight=0.5)])
    assert res.per_func["picky"].isnan().tolist() == [False, True, False]
    assert res.total.tolist() == pytest.approx([2 * 1.0 + 0.5, 0.5, 2 * 0.0 + 0.5])  # None adds nothing
    assert res.num_penalized == 0


def test_a_sample_nobody_scores_is_an_error():
    def picky(completions, **kw):
        return [1.0, None, None]

    def shy(completions, **kw):
        return [None, None, 0.5]

    with pytest.raises(RewardError, match=r"\['picky', 'shy'\] all returned None .* sample 1 \(prompt: '3\+4='\)"):
        run([rf(picky), rf(shy)])
    with pytest.warns(UserWarning, match="no reward"):
        res = run([rf(picky), rf(shy)], error_policy="penalty", penalty_value=-3.0)
    assert res.total.tolist() == [1.0, -3.0, 0.5] and res.num_penalized == 1


# --- reward_kwargs -----------------------------------------------------------------
def scaled(completions, scale=1.0, offset=0.0, **kwargs):
    return [scale * len(c) + offset for c in completions]


def test_reward_kwargs_reach_the_function():
    funcs = resolve_reward_funcs([scaled, {"name": "exact_answer", "weight": 2.0}], kwargs={"scaled": {"scale": 0.5}})
    res = compute_rewards(funcs, PROMPTS, COMPLETIONS, IDS, extra={"answer": ANSWERS})
    # len("3")=1, len("8 maybe")=7, len("-4<eos>")=7, times 0.5; exact_answer 1, 0, 1 times 2
    assert res.per_func["scaled"].tolist() == [0.5, 3.5, 3.5]
    assert res.total.tolist() == [2.5, 3.5, 5.5]
    dict_spec = resolve_reward_funcs([{"name": "tests.test_rewards:scaled", "kwargs": {"offset": 1.0}}])
    assert dict_spec[0].kwargs == {"offset": 1.0}


def test_reward_kwargs_errors_name_what_is_wrong():
    with pytest.raises(RewardError, match=r"names 'nope', which is not one of the reward functions \['scaled'\]"):
        resolve_reward_funcs([scaled], kwargs={"nope": {"scale": 1}})
    with pytest.raises(RewardError, match=r"give \['scael'\], which scaled does not take.*\['offset', 'scale'\]"):
        resolve_reward_funcs([scaled], kwargs={"scaled": {"scael": 1}})
    funcs = resolve_reward_funcs(["exact_answer"], kwargs={"exact_answer": {"answer": ["3"] * 3}})
    with pytest.raises(RewardError, match=r"give \['answer'\], which are also dataset columns"):
        compute_rewards(funcs, PROMPTS, COMPLETIONS, IDS, extra={"answer": ANSWERS})


def test_missing_kwargs_hint():
    def strict(completions):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match=r"'strict' raised TypeError.*\*\*kwargs"):
        run([rf(strict)])


def test_caller_errors():
    with pytest.raises(RewardError, match="'answer' has 2 entries but there are 3"):
        compute_rewards([rf(ones)], PROMPTS, COMPLETIONS, IDS, extra={"answer": ["1", "2"]})
    with pytest.raises(RewardError, match="error_policy"):
        run([rf(ones)], error_policy="ignore")
    with pytest.raises(RewardError, match="used more than once"):
        run([rf(ones), rf(ones)])
    with pytest.raises(RewardError, match="nothing to compute"):
        run([])


# --- penalty policy ----------------------------------------------------------------
def test_penalty_policy_entries():
    def flaky(**kw):
        return [float("nan"), 0.5, "x"]

    f = rf(flaky, weight=2.0)
    with pytest.warns(UserWarning, match="'flaky'.*sample 0") as rec:
        res = run([f, rf(ones)], error_policy="penalty", penalty_value=-1.0)
    assert len(rec) == 1
    assert res.per_func["flaky"].tolist() == [-1.0, 0.5, -1.0]
    assert res.total.tolist() == pytest.approx([2 * -1 + 1, 2 * 0.5 + 1, 2 * -1 + 1])
    assert res.num_penalized == 2
    with warnings.catch_warnings():  # the same function warns only once per run
        warnings.simplefilter("error")
        assert run([f], error_policy="penalty", penalty_value=-1.0).num_penalized == 2


@pytest.mark.parametrize("fn", [lambda **kw: 1 / 0, lambda **kw: [1.0]])
def test_penalty_policy_whole_batch(fn):
    with pytest.warns(UserWarning, match="'f'"):
        res = run([rf(fn, "f"), rf(ones)], error_policy="penalty", penalty_value=-2.0)
    assert res.per_func["f"].tolist() == [-2.0, -2.0, -2.0]
    assert res.per_func["ones"].tolist() == [1.0, 1.0, 1.0]
    assert res.num_penalized == 3


# --- reward model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm"))


def test_reward_model_two_labels_rejected(tmp_path):
    path = save_tiny_reward_model(tmp_path / "rm2", num_labels=2)
    with pytest.raises(RewardError, match=r"rm2.*num_labels=2"):
        RewardModelScorer(path)


def test_reward_model_scores(tiny_rm):
    scorer = RewardModelScorer(tiny_rm, batch_size=2)
    assert not scorer.model.training
    assert not any(p.requires_grad for p in scorer.model.parameters())
    scores = scorer(PROMPTS, COMPLETIONS)
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    # Batching and right padding do not change a sample's score.
    alone = scorer([PROMPTS[1]], [COMPLETIONS[1]])
    assert alone[0] == pytest.approx(scores[1], abs=1e-5)


def test_reward_model_in_total(tiny_rm):
    scorer = RewardModelScorer(tiny_rm, torch_dtype="float32")
    rm = scorer(PROMPTS, COMPLETIONS)
    res = run([rf(ones, weight=2.0)], reward_model=scorer, reward_model_weight=0.5)
    assert res.per_func["reward_model"].tolist() == pytest.approx(rm, abs=1e-6)
    assert res.total.tolist() == pytest.approx([2 + 0.5 * s for s in rm], abs=1e-6)


def test_reward_model_without_pad_token_uses_eos(tiny_rm, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_rm)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    import shutil

    for name in ("config.json", "model.safetensors"):
        shutil.copy(f"{tiny_rm}/{name}", tmp_path / name)
    scorer = RewardModelScorer(str(tmp_path))
    assert scorer.tokenizer.pad_token == scorer.tokenizer.eos_token == "<eos>"
    assert len(scorer(PROMPTS, COMPLETIONS)) == 3


def test_a_reward_writing_into_a_nested_column_changes_neither_the_dataset_nor_the_callers_rows(
    tiny_model_dir, tmp_path
):
    from conftest import small_config

    from gspo.trainer import GSPOTrainer

    def scribbles(completions, meta, **kwargs):
        for m in meta:
            m["seen"] = m.get("seen", 0) + 1  # writes into the row's nested column
        return [0.0] * len(completions)

    rows = [{"prompt": "1+1=", "meta": {"n": 1}}, {"prompt": "2+2=", "meta": {"n": 2}}]
    trainer = GSPOTrainer(small_config(tiny_model_dir, tmp_path, reward_funcs=[]), reward_funcs=[scribbles])
    dataset = trainer._as_dataset(rows)
    trainer.training_step([dataset[0], dataset[1]])
    trainer.training_step([dataset[0], dataset[1]])
    assert [dataset[i]["meta"] for i in range(2)] == [{"n": 1}, {"n": 2}]
    assert rows == [{"prompt": "1+1=", "meta": {"n": 1}}, {"prompt": "2+2=", "meta": {"n": 2}}]


@pytest.mark.parametrize(
    "name,module,extra", [("math_accuracy", "math_verify", "math"), ("reasoning_gym", "reasoning_gym", "reasoning-gym")]
)
def test_a_builtin_whose_extra_is_missing_fails_when_resolved(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the extra imports: nothing
    with pytest.raises(RewardError, match=rf"reward '{name}' needs .*pip install 'gspo\[{extra}\]'"):
        resolve_reward_funcs([name, "exact_answer"])


def test_the_reasoning_builtins_resolve_by_name():
    funcs = resolve_reward_funcs(
        ["math_accuracy", "think_format", "reasoning_gym"], kwargs={"math_accuracy": {"timeout_s": 2.0}}
    )
    assert [f.name for f in funcs] == ["math_accuracy", "think_format", "reasoning_gym"]
    res = compute_rewards(
        funcs[:2], ["q"] * 2, ["<think>x</think>\\boxed{7}", "7"], [[1], [1]], extra={"answer": ["7", "7"]}
    )
    # math_accuracy reads the text after </think>: 7 = 7 both times; think_format needs the block: 1, 0
    assert res.per_func["math_accuracy"].tolist() == [1.0, 1.0]
    assert res.per_func["think_format"].tolist() == [1.0, 0.0]


def test_rewards_are_checked_in_float32_the_dtype_they_are_used_in():
    def huge(completions, **kw):
        return [1.0, 1e39, 0.0]  # finite as a Python float, inf as float32

    with pytest.raises(RewardError, match=r"'huge' returned value 1e\+39, beyond float32's range .* for sample 1"):
        run([rf(huge)])

    def big(completions, **kw):
        return [3e38, 3e38, 3e38]  # each fits float32 (max 3.4e38); 2 x 3e38 does not

    with pytest.raises(RewardError, match=r"weighted total reward of sample 0, 6e\+38, is beyond float32's range"):
        run([rf(big, weight=2.0)])


def test_under_penalty_only_the_samples_that_fail_alone_are_penalised():
    def keyerr(completions, answer, **kw):
        return [{"3": 1.0, "-4": 0.5}[a] for a in answer]  # KeyError on ANSWERS[1] = "7" only

    with pytest.warns(UserWarning, match=r"'keyerr' raised KeyError: '7'.* on sample 1 \(prompt: '3\+4='\)"):
        res = run([rf(keyerr)], error_policy="penalty", penalty_value=-1.0)
    assert res.per_func["keyerr"].tolist() == [1.0, -1.0, 0.5] and res.num_penalized == 1


def test_a_reward_with_no_opinion_on_any_sample_is_warned_about_once():
    def silent(completions, **kw):
        return [None] * len(completions)

    f = rf(silent)
    with pytest.warns(UserWarning, match="'silent' returned None .* for all 3 samples"):
        run([f, rf(ones)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run([f, rf(ones)])  # once per run


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"think_format": {"answer_open": "<a>"}}, "give answer_open and answer_close together"),
        ({"math_accuracy": {"timeout_s": -1}}, "timeout_s must be a finite number of seconds > 0"),
        ({"think_format": {"think_open": 5}}, "think_open must be a string"),
    ],
)
def test_reward_kwargs_values_of_the_built_ins_are_checked_when_resolved(kwargs, match):
    with pytest.raises(RewardError, match=rf"reward_kwargs for '{next(iter(kwargs))}': .*{match}"):
        resolve_reward_funcs(["math_accuracy", "think_format"], kwargs=kwargs)


@pytest.mark.parametrize("name", ["exact_answer", "answer_match"])
def test_a_row_without_an_answer_is_an_error_not_a_silent_zero(name):
    funcs = resolve_reward_funcs([name])
    with pytest.raises(RewardError, match=rf"{name}: 1 sample\(s\) have no 'answer' \(None\), the first sample 1"):
        compute_rewards(funcs, PROMPTS, COMPLETIONS, IDS, extra={"answer": ["3", None, "-4"]})
