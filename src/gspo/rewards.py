"""Reward functions, an optional reward model, and their checked, weighted sum.

A reward function is called once per batch as

    fn(prompts=[N str], completions=[N str], completion_ids=[N list[int]], **extra_columns)

and returns N real numbers (list, tuple, 1-D tensor or 1-D ndarray). Dataset columns
other than the prompt arrive as keyword arguments, already repeated per completion,
so functions should accept `**kwargs` for the columns they do not use.

Multi-turn episodes (gspo.episodes): `completions` are the model's last turns, `completion_ids` the whole
episode's ids, and `messages=[N conversations]` (lists of {"role", "content"} dicts) arrives as well; an
environment's own reward is one more term, "environment", weighted by environment_reward_weight.

A function may return None for a sample: "no opinion" (TRL's convention; math_accuracy does it for a gold
answer that does not parse). The sample is left out of that function's mean (its per-function value is NaN)
and the function adds nothing to the sample's total; a sample on which no function has an opinion is an error.

Nothing is broadcast or guessed: a wrong count, a non-number, NaN or inf, or an exception is an error naming
the function, the sample, where it was raised and the columns that were passed (`error_policy="raise"`), or,
with `error_policy="penalty"`, those samples get `penalty_value` and are counted. Exceptions deriving from
BaseException (math-verify's TimeoutException) count too; KeyboardInterrupt, SystemExit and GeneratorExit
are never swallowed.

Keyword parameters for a function come from GSPOConfig.reward_kwargs ({name: {param: value}}) or a dict
spec's "kwargs"; they must be named parameters of the function.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import os
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from gspo.answers import completion_text, extract_answer
from gspo.faults import run_with_timeout
from gspo.references import resolve_reference
from gspo.verifiers import VERIFIER_REWARDS, MissingExtraError, check_available, dry_run

ERROR_POLICIES = ("raise", "penalty")
RESERVED_KWARGS = ("prompts", "completions", "completion_ids")
REWARD_MODEL_KEY = "reward_model"
ENVIRONMENT_KEY = "environment"  # a multi-turn environment's reward: reward/environment_mean
# Scale of the built-in length penalty: -1 per 1000 completion tokens, small next to
# a 0/1 correctness reward so it only breaks ties between equally correct answers.
LENGTH_PENALTY_PER_TOKEN = 1e-3
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RewardError(RuntimeError):
    """A reward could not be resolved or computed. The message names the function and sample."""


@dataclass
class RewardFunction:
    name: str
    fn: Callable
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)  # keyword parameters passed on every call (reward_kwargs)
    # Set after the first penalty warning, so a chronically failing function warns once
    # per run, not once per step (its failures are still counted every step).
    warned: bool = field(default=False, init=False, repr=False, compare=False)
    warned_none: bool = field(default=False, init=False, repr=False, compare=False)  # said it scored nothing


# ----------------------------------------------------------------------------------
# Built-in reward functions
# ----------------------------------------------------------------------------------
def exact_answer(prompts=None, completions=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the answer a completion commits to (gspo.answers.extract_answer: its first word, cut at an
    end marker such as "<eos>") equals the stripped `answer` column, else 0.0: "81", " 81<eos>", "81 and
    more" match 81; "810" and "-81" do not. Needs an `answer` column (the demo's arithmetic task has one)."""
    completions = list(completions or [])
    answers = list(answer or [])
    if len(answers) != len(completions):
        raise ValueError(
            f"exact_answer needs one answer per completion (an 'answer' column in the dataset): "
            f"{len(answers)} answers for {len(completions)} completions"
        )
    _no_missing(answers, "exact_answer")
    return [1.0 if extract_answer(c) == str(ref).strip() else 0.0 for c, ref in zip(completions, answers)]


def _no_missing(answers: list, reward: str) -> None:
    """A row without an answer is an error naming it, not a silent 0.0 (None would compare as the text 'None')."""
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise ValueError(
            f"{reward}: {len(missing)} sample(s) have no 'answer' (None), the first sample {missing[0]}: every row "
            "of the dataset needs an 'answer' column"
        )


def answer_match(prompts=None, completions=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the stripped completion equals the `answer` column, or starts with it
    followed by whitespace ("42 because ..." matches 42; "421" does not), else 0.0.

    Needs an `answer` column in the dataset.
    """
    if answer is None:
        raise ValueError("answer_match needs an 'answer' column in the dataset (none was passed)")
    completions = list(completions or [])
    answers = list(answer)
    if len(answers) != len(completions):
        raise ValueError(f"answer_match got {len(answers)} answers for {len(completions)} completions")
    _no_missing(answers, "answer_match")
    out = []
    for comp, ref in zip(completions, answers):
        text, ref = completion_text(comp).strip(), str(ref).strip()
        hit = text == ref or (bool(ref) and text.startswith(ref) and text[len(ref)].isspace())
        out.append(1.0 if hit else 0.0)
    return out


def length_penalty(prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
    """-0.001 per completion token (-len(completion_ids[i]) / 1000): 0 for an empty
    completion, -0.128 at 128 tokens. Pair it with a correctness reward to prefer
    shorter correct answers."""
    if completion_ids is None:
        raise ValueError("length_penalty needs completion_ids")
    return [-LENGTH_PENALTY_PER_TOKEN * len(ids) for ids in completion_ids]


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), scaled by `penalty` (DAPO: 1):

        R(y) = 0                                            if |y| <= L_max - L_cache
             = (L_max - L_cache - |y|) / L_cache * penalty  if L_max - L_cache < |y| <= L_max
             = -penalty                                     if |y| > L_max

    with L_max = GSPOConfig.max_new_tokens, L_cache = overlong_buffer_len, penalty = overlong_penalty, and
    |y| = len(completion_ids[i]): every completion token the scorer passes, EOS included, padding excluded
    (Rollout.completion_id_lists). R is 0 up to L_max - L_cache tokens and falls by penalty / L_cache per
    token after that, to -penalty at L_max: a completion cut off by max_new_tokens has |y| = L_max. It only
    ever subtracts: add it to a correctness reward (`reward_funcs: [exact_answer, soft_overlong_punishment]`).

    Other readings. TRL's `get_soft_overlong_punishment(max_completion_len, soft_punish_cache)`: Eq. 13 on
    len(completion_ids) with no factor, i.e. this with penalty = 1. verl's DAPORewardManager
    (`overlong_buffer.len`, `overlong_buffer.penalty_factor`, added to the task score): min(-(|y| - (L_max -
    L_cache)) / L_cache * factor, 0) on the response's attention-mask length (EOS included): the same inside the
    buffer, but past L_max it keeps falling instead of stopping at -factor. A single-turn completion never
    exceeds L_max in either, so the two agree on every one of them; verl only warns when L_cache > L_max, where
    this raises.
    """

    __name__ = "soft_overlong_punishment"

    def __init__(self, max_len: int, buffer_len: int, penalty: float = 1.0) -> None:
        if not (isinstance(buffer_len, int) and not isinstance(buffer_len, bool) and 1 <= buffer_len < max_len):
            raise ValueError(
                f"soft_overlong_punishment: buffer_len (L_cache) must be an int >= 1 and < max_len={max_len} "
                f"(L_max), got {buffer_len!r}"
            )
        if not (isinstance(penalty, numbers.Real) and math.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"soft_overlong_punishment: penalty must be a finite number >= 0, got {penalty!r}")
        self.max_len, self.buffer_len, self.penalty = int(max_len), buffer_len, float(penalty)

    @classmethod
    def from_config(cls, config) -> "SoftOverlongPunishment":
        """Bound to GSPOConfig's max_new_tokens (L_max), overlong_buffer_len (L_cache) and overlong_penalty."""
        if config.overlong_buffer_len is None:
            from gspo.config import ConfigError

            raise ConfigError(
                "GSPOConfig.overlong_buffer_len=None is not allowed: the 'soft_overlong_punishment' reward needs "
                f"L_cache, an int in [1, max_new_tokens={config.max_new_tokens})."
            )
        return cls(config.max_new_tokens, config.overlong_buffer_len, config.overlong_penalty)

    def reward(self, length: int) -> float:
        start = self.max_len - self.buffer_len  # the longest completion that goes unpunished
        if length <= start:
            return 0.0
        if length <= self.max_len:
            return (start - length) / self.buffer_len * self.penalty
        return -self.penalty

    def __call__(self, prompts=None, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("soft_overlong_punishment needs completion_ids")
        return [self.reward(len(ids)) for ids in completion_ids]

    def __repr__(self) -> str:
        return f"SoftOverlongPunishment(max_len={self.max_len}, buffer_len={self.buffer_len}, penalty={self.penalty})"


BUILTIN_REWARDS: dict[str, Callable] = {
    "exact_answer": exact_answer,
    "answer_match": answer_match,
    "length_penalty": length_penalty,
    **VERIFIER_REWARDS,  # math_accuracy, think_format, reasoning_gym (gspo.verifiers; the first and last need extras)
}
# Built-ins that read GSPOConfig fields: name -> factory(config) -> the bound reward function. They resolve by
# name like BUILTIN_REWARDS, once a config is at hand (RewardScorer.from_config, so the trainer and `gspo eval`).
CONFIGURED_REWARDS: dict[str, Callable] = {
    "soft_overlong_punishment": SoftOverlongPunishment.from_config,
}
BUILTIN_NAMES = tuple(sorted([*BUILTIN_REWARDS, *CONFIGURED_REWARDS]))


# ----------------------------------------------------------------------------------
# Resolving specs
# ----------------------------------------------------------------------------------
def resolve_reward_funcs(
    specs: Any, weights: Optional[Sequence[float]] = None, config: Any = None, kwargs: Optional[dict] = None
) -> list[RewardFunction]:
    """Turn reward specs into named, weighted RewardFunctions.

    A spec is a callable, a built-in name (BUILTIN_REWARDS, or CONFIGURED_REWARDS, which are bound to
    `config` and need one), "package.module:function",
    "path/to/file.py:function", or a dict {"name" or "path": one of those, "weight": w, "kwargs": {...}}.
    `weights`, when given, holds one weight per spec; a None entry means "the dict
    spec's own weight, else 1.0". A dict weight and a different non-None entry for the
    same spec is an error. Duplicate names get _2, _3, ... `kwargs` ({name: {param: value}}, names as in the
    metrics) are keyword parameters for those functions, checked against their signatures here.
    """
    if specs is None:
        specs = []
    elif callable(specs) or isinstance(specs, (str, dict)):
        specs = [specs]
    specs = list(specs)
    if weights is not None and len(weights) != len(specs):
        raise RewardError(
            f"reward_weights has {len(weights)} entries but there are {len(specs)} reward functions; give one weight "
            "per function"
        )
    out: list[RewardFunction] = []
    for i, spec in enumerate(specs):
        target, dict_weight, dict_kwargs = _unpack_spec(spec, i)
        weight = _pick_weight(i, dict_weight, None if weights is None else weights[i])
        name, fn = _resolve_one(target, config)
        out.append(RewardFunction(name=name, fn=fn, weight=weight, kwargs=dict(dict_kwargs or {})))
    return _bind_kwargs(_dedupe_names(out), kwargs or {})


def _unpack_spec(spec: Any, i: int) -> tuple[Any, Optional[float], Optional[dict]]:
    """(callable-or-string target, weight from a dict spec or None, kwargs from a dict spec or None)."""
    if not isinstance(spec, dict):
        return spec, None, None
    unknown = set(spec) - {"name", "path", "weight", "kwargs"}
    keys = [k for k in ("name", "path") if k in spec]
    if len(keys) != 1 or unknown:
        raise RewardError(
            f"reward spec {i} {spec!r}: a dict spec needs exactly one of 'name' or 'path' "
            f"and optionally 'weight' and 'kwargs'{'; unknown keys ' + str(sorted(unknown)) if unknown else ''}"
        )
    if spec.get("kwargs") is not None and not isinstance(spec["kwargs"], dict):
        raise RewardError(f"reward spec {i} {spec!r}: 'kwargs' must be a mapping of parameter names to values")
    return spec[keys[0]], spec.get("weight"), spec.get("kwargs")


def _bind_kwargs(funcs: list[RewardFunction], kwargs: dict) -> list[RewardFunction]:
    """Add reward_kwargs to their functions; every name and parameter must exist."""
    by_name = {f.name: f for f in funcs}
    if not isinstance(kwargs, dict):
        raise RewardError(f"reward_kwargs must be a mapping {{reward name: {{param: value}}}}, got {kwargs!r}")
    for name, params in kwargs.items():
        if name not in by_name:
            raise RewardError(
                f"reward_kwargs names {name!r}, which is not one of the reward functions {sorted(by_name)}"
            )
        if not isinstance(params, dict):
            raise RewardError(f"reward_kwargs[{name!r}] must be a mapping of parameter names to values, got {params!r}")
        by_name[name].kwargs.update(params)
    for f in funcs:
        if f.kwargs and any(f.fn is v for v in VERIFIER_REWARDS.values()):
            try:
                dry_run(f.fn, **f.kwargs)  # the values too, not only the names: before anything loads
            except (TypeError, ValueError) as e:
                raise RewardError(f"reward_kwargs for {f.name!r}: {e}") from None
        accepted = _named_parameters(f.fn)
        bad = sorted(set(f.kwargs) - accepted) if accepted is not None else []
        if bad:
            raise RewardError(
                f"reward_kwargs for {f.name!r} give {bad}, which {f.name} does not take as named parameters; "
                f"it takes {sorted(accepted - set(RESERVED_KWARGS))}"
            )
    return funcs


def _named_parameters(fn: Callable) -> Optional[set]:
    """Names `fn` takes by keyword (None when its signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _pick_weight(i: int, from_dict: Any, from_list: Any) -> float:
    """The spec's weight; a dict weight and a reward_weights entry must agree."""
    if from_dict is not None and from_list is not None and float(from_dict) != float(from_list):
        raise RewardError(
            f"reward spec {i} has weight {from_dict} in its dict but {from_list} in reward_weights; give it once"
        )
    w = from_list if from_list is not None else from_dict if from_dict is not None else 1.0
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
        raise RewardError(f"reward spec {i} has weight {w!r}; weights must be finite real numbers")
    return float(w)


def _resolve_one(target: Any, config: Any = None) -> tuple[str, Callable]:
    """A callable or a spec string -> (name, callable)."""
    if callable(target):
        return getattr(target, "__name__", None) or type(target).__name__, target
    if not isinstance(target, str) or not target:
        raise RewardError(f"reward spec {target!r} is a {type(target).__name__}; expected a callable or a string")
    if target in BUILTIN_REWARDS:
        try:
            check_available(target)  # an optional extra (math-verify, reasoning-gym): missing -> error up front
        except MissingExtraError as e:
            raise RewardError(str(e)) from e
        return target, BUILTIN_REWARDS[target]
    if target in CONFIGURED_REWARDS:
        if config is None:
            raise RewardError(
                f"reward function {target!r} reads GSPOConfig fields: resolve it with a config "
                "(RewardScorer.from_config(config), or resolve_reward_funcs(..., config=config))"
            )
        return target, CONFIGURED_REWARDS[target](config)
    if ":" not in target:
        raise RewardError(
            f"unknown reward function {target!r}; built-ins are {list(BUILTIN_NAMES)}, "
            "or use 'package.module:function' or 'path/to/file.py:function'"
        )
    return target.rsplit(":", 1)[1], resolve_reference(target, what="reward", error=RewardError, kind="callable")


def _dedupe_names(funcs: list[RewardFunction]) -> list[RewardFunction]:
    """Second and later uses of a name become name_2, name_3, ... (metrics need unique keys)."""
    taken: set[str] = set()
    for f in funcs:
        base, k = f.name, 1
        while f.name in taken:
            k += 1
            f.name = f"{base}_{k}"
        taken.add(f.name)
    return funcs


# ----------------------------------------------------------------------------------
# The reward model
# ----------------------------------------------------------------------------------
class RewardModelScorer:
    """Scores `prompt + completion` (plain string concatenation, no separator: the
    completion was sampled as the continuation of exactly that prompt text) with a
    one-label AutoModelForSequenceClassification. The text is tokenized with the reward
    model's own tokenizer and its default special tokens, right-padded, and cut on the
    left to the model's length limit so the completion's end is always scored."""

    def __init__(
        self,
        name_or_path: str,
        device: Any = "cpu",
        torch_dtype: Any = torch.float32,
        trust_remote_code: bool = False,
        batch_size: int = 16,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise RewardError(f"reward model batch_size must be >= 1, got {batch_size}")
        dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
        self.name = str(name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        if self.model.config.num_labels != 1:
            raise RewardError(
                f"reward model {self.name!r} has num_labels={self.model.config.num_labels}; "
                "a reward model must output one score (num_labels=1)"
            )
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self._setup_padding()

    def _setup_padding(self) -> None:
        tok = self.tokenizer
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise RewardError(
                    f"reward model {self.name!r}: tokenizer has neither a pad nor an eos token to pad with"
                )
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        tok.truncation_side = "left"
        # Sequence-classification heads pool the last non-pad token; they need the id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = tok.pad_token_id
        limits = [getattr(self.model.config, "max_position_embeddings", None), tok.model_max_length]
        self.max_length = (
            min(int(x) for x in limits if x is not None and x < 10**7)
            if any(x is not None and x < 10**7 for x in limits)
            else None
        )

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise RewardError(f"reward model {self.name!r}: {len(prompts)} prompts but {len(completions)} completions")
        texts = [str(p) + completion_text(c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                return_tensors="pt",
                truncation=self.max_length is not None,
                max_length=self.max_length,
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            scores.extend(self.model(**enc).logits[:, 0].float().cpu().tolist())
        for i, s in enumerate(scores):
            if not math.isfinite(s):
                raise RewardError(
                    f"reward model {self.name!r} gave a non-finite score {s} for sample {i} "
                    f"(prompt: {_excerpt(prompts[i])!r})"
                )
        return scores


# ----------------------------------------------------------------------------------
# Computing rewards
# ----------------------------------------------------------------------------------
@dataclass
class RewardResult:
    total: torch.Tensor  # [N] float32: sum_k weight_k * r_k (+ reward_model_weight * rm), None-valued terms left out
    per_func: dict  # name -> [N] float32 raw (unweighted) values, NaN where the function returned None
    num_penalized: int


def compute_rewards(
    funcs: list[RewardFunction],
    prompts: list[str],
    completions: list[str],
    completion_ids: list[list[int]],
    *,
    extra: Optional[dict] = None,
    reward_model: Any = None,
    reward_model_weight: float = 1.0,
    error_policy: str = "raise",
    penalty_value: float = 0.0,
    timeout_s: float = 0.0,
) -> RewardResult:
    """Call every reward function once on the whole batch, check, and sum with weights; `timeout_s` > 0 bounds
    each call (reward_timeout_s).

    Raises RewardError (error_policy="raise") naming the function and the sample for
    any exception, wrong count, non-number, NaN or inf; with error_policy="penalty" the
    bad samples get `penalty_value` and are counted in `num_penalized`. None is "no opinion" (module doc).
    """
    extra = dict(extra or {})
    n = _check_batch(
        funcs,
        prompts,
        completions,
        completion_ids,
        extra=extra,
        reward_model=reward_model,
        error_policy=error_policy,
        penalty_value=penalty_value,
    )
    total = torch.zeros(n, dtype=torch.float64)
    per_func: dict[str, torch.Tensor] = {}
    penalized = 0
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **extra}
    for f in funcs:
        clash = sorted(set(f.kwargs) & set(kwargs))
        if clash:
            raise RewardError(f"reward_kwargs for {f.name!r} give {clash}, which are also dataset columns; rename one")
        values, bad = _call_checked(
            f,
            lambda f=f: f.fn(**kwargs, **f.kwargs),
            prompts,
            n=n,
            policy=error_policy,
            penalty=penalty_value,
            locate=lambda i, f=f: f.fn(**_sample_slice(kwargs, i), **f.kwargs),
            columns=sorted(kwargs),
            timeout_s=timeout_s,
        )
        per_func[f.name] = torch.tensor(values, dtype=torch.float32)
        if n and bool(per_func[f.name].isnan().all()) and not f.warned_none:
            f.warned_none = True
            warnings.warn(
                f"reward function '{f.name}' returned None (no opinion) for all {n} samples of this batch: it adds "
                "nothing to the reward (check its columns; reward/<name>_none_fraction counts it every step)",
                stacklevel=2,
            )
        total += f.weight * torch.tensor(values, dtype=torch.float64).nan_to_num(0.0)
        penalized += bad
    if reward_model is not None:
        rm = RewardFunction(REWARD_MODEL_KEY, reward_model, float(reward_model_weight))
        values, bad = _call_checked(
            rm,
            lambda: reward_model(prompts, completions),
            prompts,
            n=n,
            policy=error_policy,
            penalty=penalty_value,
            timeout_s=timeout_s,
        )
        per_func[REWARD_MODEL_KEY] = torch.tensor(values, dtype=torch.float32)
        total += rm.weight * torch.tensor(values, dtype=torch.float64)
        penalized += bad
    penalized += _no_opinion(per_func, total, prompts, policy=error_policy, penalty=penalty_value)
    overflow = ~torch.isfinite(total.float())
    if bool(overflow.any()):  # each term fits float32, their weighted sum does not
        i = int(overflow.nonzero()[0])
        raise RewardError(
            f"the weighted total reward of sample {i}, {total[i].item():g}, is beyond float32's range (the dtype "
            "rewards are used in); lower the reward weights or the rewards' scale"
        )
    return RewardResult(total=total.float(), per_func=per_func, num_penalized=penalized)


def _no_opinion(per_func: dict, total: torch.Tensor, prompts: list, *, policy: str, penalty: float) -> int:
    """Samples on which every reward returned None have no reward at all: an error, or the penalty (in place)."""
    if not per_func:
        return 0
    missing = torch.stack([v.isnan() for v in per_func.values()]).all(dim=0)  # [N]
    if not bool(missing.any()):
        return 0
    i = int(missing.nonzero()[0])
    msg = (
        f"reward functions {sorted(per_func)} all returned None (no opinion) for sample {i} "
        f"(prompt: {_excerpt(prompts[i])!r}) and {int(missing.sum()) - 1} more: such a sample has no reward"
    )
    if policy == "raise":
        raise RewardError(msg)
    warnings.warn(f"{msg}; using the penalty value instead", stacklevel=3)
    total[missing] = float(penalty)
    return int(missing.sum())


def _excerpt(prompt, limit: int = 80) -> str:
    """The end of a prompt, where the question is (a chat prompt starts with its system message)."""
    text = str(prompt)
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _sample_slice(kwargs: dict, i: int) -> dict:
    """The keyword arguments of sample i alone (every column is one entry per sample)."""
    return {k: v[i : i + 1] for k, v in kwargs.items()}


def _check_batch(
    funcs, prompts, completions, completion_ids, *, extra, reward_model, error_policy, penalty_value
) -> int:
    """Caller-side consistency: these are trainer bugs, so they always raise."""
    if error_policy not in ERROR_POLICIES:
        raise RewardError(f"error_policy must be one of {list(ERROR_POLICIES)}, got {error_policy!r}")
    if not math.isfinite(float(penalty_value)):
        raise RewardError(f"penalty_value must be finite, got {penalty_value}")
    if not funcs and reward_model is None:
        raise RewardError("no reward functions and no reward model: nothing to compute a reward from")
    n = len(completions)
    for what, seq in (("prompts", prompts), ("completion_ids", completion_ids), *extra.items()):
        if len(seq) != n:
            raise RewardError(
                f"{what!r} has {len(seq)} entries but there are {n} completions; "
                "columns must be repeated once per completion"
            )
    clash = sorted(set(extra) & set(RESERVED_KWARGS))
    if clash:
        raise RewardError(
            f"dataset columns {clash} clash with reward-function arguments {list(RESERVED_KWARGS)}; rename them"
        )
    names = [f.name for f in funcs] + ([REWARD_MODEL_KEY] if reward_model is not None else [])
    dupes = sorted({x for x in names if names.count(x) > 1})
    if dupes:
        raise RewardError(
            f"reward names {dupes} are used more than once (a function named "
            f"{REWARD_MODEL_KEY!r} clashes with the reward model); names must be unique"
        )
    return n


PASSED_THROUGH = (KeyboardInterrupt, GeneratorExit)  # never turned into a reward error or penalty


def _call_checked(
    f: RewardFunction,
    call: Callable,
    prompts: list,
    *,
    n: int,
    policy: str,
    penalty: float,
    locate: Optional[Callable] = None,
    columns: Sequence[str] = (),
    timeout_s: float = 0.0,
) -> tuple[list[float], int]:
    """Run one reward and return (N floats, NaN for None; number penalized), or raise RewardError.
    `locate(i)` calls the function on sample i alone, to name the sample a batch call failed on. `timeout_s` > 0
    bounds the call (gspo.faults.run_with_timeout)."""
    status, out = run_with_timeout(call, timeout_s) if timeout_s else _untimed(call)
    if status == "timeout":
        msg = (
            f"reward function '{f.name}' did not return within reward_timeout_s={timeout_s:g} s (batch of {n} samples)"
        )
        if policy == "raise":
            raise RewardError(msg)
        return _whole_batch_penalty(f, msg, n, penalty)
    if status == "raised":
        e = out
        if isinstance(e, PASSED_THROUGH):
            raise e
        msg = _exception_message(f, e, n=n, prompts=prompts, locate=locate, columns=columns, timeout_s=timeout_s)
        if policy == "raise" or isinstance(e, SystemExit):  # a reward calling sys.exit is a bug, never a score
            raise RewardError(msg) from e
        scored = _per_sample(locate, n, penalty, timeout_s) if locate is not None else None
        if scored is not None:  # only the samples that fail alone get the penalty
            _warn_once(f, msg)
            return scored
        return _whole_batch_penalty(f, msg, n, penalty)
    values = _as_list(out)
    if values is None or len(values) != n:
        got = f"{type(out).__name__}" if values is None else f"{len(values)} values"
        msg = (
            f"reward function '{f.name}' returned {got}; expected a list/tuple/1-D tensor/1-D array "
            f"of {n} numbers, one per completion"
        )
        if policy == "raise":
            raise RewardError(msg)
        return _whole_batch_penalty(f, msg, n, penalty)
    result, bad = [], 0
    for i, v in enumerate(values):
        x, problem = (math.nan, None) if v is None else _as_real(v)
        if problem is None:
            result.append(x)
            continue
        msg = f"reward function '{f.name}' returned {problem} for sample {i} (prompt: {_excerpt(prompts[i])!r})"
        if policy == "raise":
            raise RewardError(msg)
        if bad == 0:
            _warn_once(f, msg)
        result.append(float(penalty))
        bad += 1
    return result, bad


def _per_sample(locate: Callable, n: int, penalty: float, timeout_s: float) -> Optional[tuple[list[float], int]]:
    """Under the penalty policy, after a batch call raised: each sample scored alone, the penalty where that fails
    too; None when every sample fails (then the whole batch takes the penalty)."""
    values, bad = [], 0
    for i in range(n):
        status, out = run_with_timeout(lambda i=i: locate(i), timeout_s) if timeout_s else _untimed(lambda: locate(i))
        one = _as_list(out) if status == "ok" else None
        x, problem = math.nan, "no single value"
        if one is not None and len(one) == 1:
            x, problem = (math.nan, None) if one[0] is None else _as_real(one[0])
        if problem is None:
            values.append(x)
        else:
            values.append(float(penalty))
            bad += 1
    return None if bad == n else (values, bad)


def _untimed(call: Callable) -> tuple[str, Any]:
    try:
        return "ok", call()
    except PASSED_THROUGH:
        raise
    except BaseException as e:  # math-verify's TimeoutException derives from BaseException; sys.exit's SystemExit
        return "raised", e


def _exception_message(f: RewardFunction, e: BaseException, *, n, prompts, locate, columns, timeout_s=0.0) -> str:
    """Where a reward function raised: the file and line, the first sample that raises alone, the columns."""
    hint = ""
    if isinstance(e, TypeError) and "keyword" in str(e):
        hint = " (reward functions must accept **kwargs)"
    elif isinstance(e, SystemExit):
        hint = f" (it called sys.exit({e.code!r}): a reward function must return its values)"
    elif isinstance(e, TypeError) and "indices must be integers" in str(e):
        hint = (
            " (completions are plain strings here, not TRL's lists of messages: use completions[i], not "
            "completions[i][0]['content']; a multi-turn episode's conversation arrives as messages=)"
        )
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ is not None else None
    where = f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}" if frame else ""
    sample = _failing_sample(locate, n, timeout_s) if locate is not None else None
    on = f", on sample {sample} (prompt: {_excerpt(prompts[sample])!r})" if sample is not None else ""
    passed = f"; columns passed: {list(columns)}" if columns else ""
    return f"reward function '{f.name}' raised {type(e).__name__}: {e}{hint}{where}{on}{passed} (batch of {n} samples)"


def _failing_sample(locate: Callable, n: int, timeout_s: float = 0.0, limit: int = 64) -> Optional[int]:
    """The first of the first `limit` samples on which the function raises when called alone (None if none does:
    the failure needs the whole batch)."""
    for i in range(min(n, limit)):
        status, _ = run_with_timeout(lambda i=i: locate(i), timeout_s) if timeout_s else _untimed(lambda: locate(i))
        if status == "raised":
            return i
        if status == "timeout":
            return None
    return None


def _whole_batch_penalty(f: RewardFunction, msg: str, n: int, penalty: float) -> tuple[list[float], int]:
    _warn_once(f, msg)
    return [float(penalty)] * n, n


def _warn_once(f: RewardFunction, msg: str) -> None:
    if not f.warned:
        f.warned = True
        warnings.warn(
            f"{msg}; using the penalty value instead (further failures of '{f.name}' "
            "are counted in reward_penalized without warning)",
            stacklevel=4,
        )


def _as_list(out: Any) -> Optional[list]:
    """The entries of a list/tuple/1-D tensor/1-D ndarray, else None."""
    if isinstance(out, (list, tuple)):
        return list(out)
    if isinstance(out, torch.Tensor) and out.dim() == 1:
        return out.detach().cpu().tolist()
    if isinstance(out, np.ndarray) and out.ndim == 1:
        return out.tolist()
    return None


def _as_real(v: Any) -> tuple[float, Optional[str]]:
    """(value, None) for a finite real number (bool counts as 0/1), else (nan, description)."""
    if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0:
        v = v.item()
    if isinstance(v, (bool, np.bool_)):
        return float(v), None
    if not isinstance(v, numbers.Real):
        return math.nan, f"{type(v).__name__} {v!r:.40} (not a number)"
    x = float(v)
    if not math.isfinite(x):
        return math.nan, f"non-finite value {x}"
    if abs(x) > FLOAT32_MAX:  # rewards are used in float32: 1e39 would become inf there
        return (
            math.nan,
            f"value {x:g}, beyond float32's range (|r| <= {FLOAT32_MAX:.3g}), the dtype rewards are used in",
        )
    return x, None


class RewardScorer:
    """The reward of a Rollout: bound once to the reward functions, their weights, the reward model
    and the error policy; called by training and by evaluation alike."""

    def __init__(
        self,
        funcs: list[RewardFunction],
        *,
        reward_model: Any = None,
        reward_model_weight: float = 1.0,
        error_policy: str = "raise",
        penalty_value: float = 0.0,
        environment_weight: Optional[float] = None,
        timeout_s: float = 0.0,
    ) -> None:
        """`environment_weight`: the weight of a multi-turn environment's reward (None: episodes have none);
        `timeout_s`: the limit of one reward call (0: none)."""
        if not funcs and reward_model is None and environment_weight is None:
            raise RewardError("no reward functions and no reward model: nothing to compute a reward from")
        self.funcs, self.reward_model, self.environment_weight = list(funcs), reward_model, environment_weight
        self.timeout_s = float(timeout_s)
        self.reward_model_weight, self.error_policy, self.penalty_value = (
            float(reward_model_weight),
            error_policy,
            float(penalty_value),
        )

    @classmethod
    def from_config(
        cls, config, extra_funcs: Sequence = (), reward_model: Any = None, *, environment: bool = False
    ) -> "RewardScorer":
        """GSPOConfig's reward_funcs / reward_weights plus callables passed in code (weight 1.0); with
        `environment`, the episodes' environment reward at environment_reward_weight."""
        specs = list(config.reward_funcs) + list(extra_funcs)
        weights = list(config.reward_weights or [None] * len(config.reward_funcs)) + [None] * len(extra_funcs)
        return cls(
            resolve_reward_funcs(specs, weights, config, kwargs=config.reward_kwargs),
            reward_model=reward_model,
            reward_model_weight=config.reward_model_weight,
            error_policy=config.reward_error_policy,
            penalty_value=config.reward_penalty_value,
            environment_weight=config.environment_reward_weight if environment else None,
            timeout_s=config.reward_timeout_s,
        )

    def __call__(self, rollout) -> RewardResult:
        # copies: a reward function that writes into a column (a nested dict, say) must not change the dataset
        extra = copy.deepcopy(rollout.extra)
        if rollout.messages:  # multi-turn episodes: the whole conversation reaches the reward functions
            if "messages" in extra:
                raise RewardError(
                    "dataset column 'messages' clashes with the episodes' conversations passed to reward functions "
                    "as messages=; rename the column"
                )
            extra["messages"] = copy.deepcopy(rollout.messages)
        if self.funcs or self.reward_model is not None:
            result = compute_rewards(
                self.funcs,
                rollout.prompts,
                rollout.completions,
                rollout.completion_id_lists,
                extra=extra,
                reward_model=self.reward_model,
                reward_model_weight=self.reward_model_weight,
                error_policy=self.error_policy,
                penalty_value=self.penalty_value,
                timeout_s=self.timeout_s,
            )
        else:
            result = RewardResult(torch.zeros(len(rollout)), {}, 0)
        if self.environment_weight is None:
            return result
        return self._with_environment(result, rollout)

    def _with_environment(self, result: RewardResult, rollout) -> RewardResult:
        """The environment's reward (the sum of its step rewards; the penalty where it failed) as one more term."""
        if rollout.environment_rewards is None:
            raise RewardError("the scorer expects episodes with an environment reward, and this rollout has none")
        if ENVIRONMENT_KEY in result.per_func:
            raise RewardError(f"a reward function named {ENVIRONMENT_KEY!r} clashes with the environment's reward")
        env = rollout.environment_rewards.float()
        errors = int(rollout.episode_stats["environment_errors"].sum()) if rollout.episode_stats else 0
        return RewardResult(
            total=(result.total.double() + self.environment_weight * env.double()).float(),
            per_func={**result.per_func, ENVIRONMENT_KEY: env},
            num_penalized=result.num_penalized + errors,
        )


def build_scorer(
    config, reward_funcs, reward_model, *, device, whole_models, environment: bool = False
) -> "RewardScorer":
    """The trainer's scorer: config.reward_funcs + `reward_funcs` + the reward model (loaded from
    config.reward_model_name when not given, whole on every rank inside `whole_models()`, even under ZeRO-3)."""
    if reward_model is None and config.reward_model_name:
        with whole_models():
            reward_model = RewardModelScorer(
                config.reward_model_name, device=device, trust_remote_code=config.trust_remote_code
            )
    if not config.reward_funcs and not reward_funcs and reward_model is None and not environment:
        from gspo.config import ConfigError

        raise ConfigError(
            "GSPOTrainer has no reward: set GSPOConfig.reward_model_name, GSPOConfig.reward_funcs, "
            "or pass reward_funcs=[...] (or an environment whose steps return rewards)"
        )
    return RewardScorer.from_config(config, list(reward_funcs or []), reward_model, environment=environment)
