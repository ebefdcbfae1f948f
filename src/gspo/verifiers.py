"""Built-in reasoning rewards: math answers checked by math-verify, a think-block format check, and
reasoning-gym's own scorers.

All three follow gspo.rewards' calling convention,

    fn(prompts=[N str], completions=[N str], completion_ids=[N list[int]], **extra_columns) -> N values,

take their parameters as keyword arguments with defaults (so `reward_kwargs: {name: {...}}` can set them),
and may return None for a sample: "no opinion" (math_accuracy, when the gold answer does not parse).

math-verify and reasoning-gym are optional extras, imported only when a reward that needs them runs or is
checked (`check_available`, at resolve time): `pip install 'gspo[math]'`, `pip install 'gspo[reasoning-gym]'`.
A missing one is a MissingExtraError naming the reward and the install command.

Completion text: a completion is read with gspo.answers.completion_text and cut at the first end marker
(gspo.answers.END_MARKERS, e.g. "<|endoftext|>"), for a caller that decodes without skipping special tokens.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import threading
from typing import Any, Callable, Optional

from gspo.answers import END_MARKERS, completion_text
from gspo.faults import NEVER_SWALLOWED, CallTimeout, run_with_timeout

# pip name of an optional module, for the install hint
_PIP_NAMES = {"math_verify": "math-verify", "reasoning_gym": "reasoning-gym"}
# Reward name -> (module it imports, gspo extra that installs it)
VERIFIER_EXTRAS: dict[str, tuple[str, str]] = {
    "math_accuracy": ("math_verify", "math"),
    "reasoning_gym": ("reasoning_gym", "reasoning-gym"),
}
# Exceptions that stop the program, never scored as a wrong answer
_NEVER_SWALLOW = NEVER_SWALLOWED


class MissingExtraError(ImportError):
    """An optional dependency of a built-in reward is not installed (or does not import)."""


def require(module_name: str, extra: str, reward: Optional[str] = None):
    """Import `module_name` now and return it; if it does not import, a MissingExtraError such as
    "reward 'math_accuracy' needs math-verify: pip install 'gspo[math]'"."""
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        who = f"reward {reward!r}" if reward else "gspo"
        package = _PIP_NAMES.get(module_name, module_name)
        raise MissingExtraError(
            f"{who} needs {package}: pip install 'gspo[{extra}]' (import {module_name} failed: {e})"
        ) from e


def check_available(name: str) -> None:
    """Raise MissingExtraError now if the built-in reward `name` needs an extra that is not usable, so a run
    fails before training rather than at its first reward. Names without an extra pass.

    math_accuracy also parses one LaTeX expression: math-verify imports without a working LaTeX parser
    (antlr4-python3-runtime 4.13.2) but then parses every LaTeX answer as nothing, which would score every
    sample None or 0.0 without a word."""
    if name not in VERIFIER_EXTRAS:
        return
    module, extra = VERIFIER_EXTRAS[name]
    mod = require(module, extra, reward=name)
    if name == "math_accuracy":
        _quiet_math_verify()
        try:
            # no math-verify timeouts: they raise off the main thread
            half, point_five = (mod.parse(t, parsing_timeout=None) for t in ("$\\frac{1}{2}$", "$0.5$"))
            ok = bool(mod.verify(half, point_five, timeout_seconds=None))
        except Exception as e:  # noqa: BLE001  any failure means the same: it cannot grade
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = "verify($\\frac{1}{2}$, $0.5$) is False"
        if not ok:
            raise MissingExtraError(
                f"reward 'math_accuracy' needs math-verify with its LaTeX parser (antlr4-python3-runtime==4.13.2), "
                f"which does not work here ({why}): pip install 'gspo[math]'"
            )


def _quiet_math_verify() -> None:
    """math-verify's parse and verify each print once that their timeout is off: the timeout is ours."""
    from math_verify import grader, parser

    for module in (parser, grader):
        if hasattr(module, "TIMEOUT_WARNING_SHOWN"):
            module.TIMEOUT_WARNING_SHOWN = True


# ----------------------------------------------------------------------------------
# Text helpers
# ----------------------------------------------------------------------------------
def _text(completion: Any) -> str:
    """Completion text cut at the first end marker."""
    text = completion_text(completion)
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    return text


def _after_think(text: str, think_open: str = "<think>", think_close: str = "</think>") -> str:
    """The text after the last `</think>`; "" when a `<think>` was opened and never closed (a truncated
    thought has no answer); the whole text when there is no think block."""
    if think_close in text:
        return text.rpartition(think_close)[2]
    if think_open in text:
        return ""
    return text


def final_answer(
    completion: Any,
    think_open: str = "<think>",
    think_close: str = "</think>",
    answer_open: Optional[str] = "<answer>",
    answer_close: Optional[str] = "</answer>",
) -> str:
    """The answer a completion commits to: the text after its last `think_close` ("" when `think_open` was never
    closed), then the content of its last `answer_open`...`answer_close` pair if it has one; stripped. The same
    tags as think_format's (reward_kwargs), so the three reasoning rewards read one completion alike."""
    text = _after_think(_text(completion), think_open, think_close) if think_close else _text(completion)
    if answer_open and answer_close:
        tagged = re.findall(re.escape(answer_open) + r"(.*?)" + re.escape(answer_close), text, re.DOTALL)
        if tagged:
            text = tagged[-1]
    return text.strip()


def _check_tags(think_open, think_close, answer_open, answer_close, reward: str) -> dict:
    """The four tag keywords, checked (reward_kwargs reach them): strings, the answer pair given together."""
    for name, value in (("think_open", think_open), ("think_close", think_close)):
        if not isinstance(value, str):
            raise ValueError(f"{reward}: {name} must be a string, got {value!r}")
    if (answer_open is None) != (answer_close is None) or not all(
        isinstance(t, str) for t in (answer_open, answer_close) if t is not None
    ):
        raise ValueError(
            f"{reward}: give answer_open and answer_close together, as strings (or both None), got "
            f"{answer_open!r} and {answer_close!r}"
        )
    return dict(think_open=think_open, think_close=think_close, answer_open=answer_open, answer_close=answer_close)


def _column(name: str, values: Any, n: int, reward: str, hint: str = "") -> list:
    if values is None:
        raise ValueError(f"{reward} needs a {name!r} column in the dataset (none was passed){hint}")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{reward} got {len(values)} {name!r} values for {n} completions (one per completion)")
    return values


# ----------------------------------------------------------------------------------
# math_accuracy
# ----------------------------------------------------------------------------------
# A gold answer already in math delimiters is parsed as it is.
_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed")
# Two words of two or more letters, not LaTeX commands: prose ("not math at all", "The answer is 42").
_PROSE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}")
# Letters only, two or more: a word answer ("ognib", "yes"), which in $...$ would read as a product of symbols.
_WORD = re.compile(r"^[A-Za-z]{2,}[A-Za-z\s'.,!?-]*$")


def gold_text(gold: Any) -> Optional[str]:
    """What math_accuracy parses for a gold answer: None for a missing or blank one; the text as it is when it
    holds math delimiters ($, \\(, \\[, \\boxed) or is prose (two words of 2+ letters); else the text
    wrapped in $...$. math-verify reads a bare gold without delimiters wrongly: "2\\pi" as 2, "x^2 + 1" as
    1, "10^{5}" as 10, and "\\sqrt{2}" or "\\dfrac{3}{4}" as nothing; in $...$ all of them parse right, as do
    numbers ("42", "1/2", "0.5", "1,000")."""
    if gold is None:
        return None
    text = str(gold).strip()
    if not text:
        return None
    if _DELIMITED.search(text) or _PROSE.search(text) or _WORD.match(text):
        return text  # a word parses to nothing: no opinion, not a match with any anagram of it
    return f"${text}$"


class MathAccuracy:
    """1.0 when math-verify finds the completion's answer equal to the `answer` column, 0.0 when not, None
    when the gold answer does not parse (no opinion, as TRL's accuracy_reward).

    Gold: parse(gold_text(answer_i)), parsed once per distinct gold in a batch (the G completions of a prompt
    share it); an empty parse is None for that sample. Prediction: parse(text) with math-verify's default
    extraction (the last \\boxed{}, else the last LaTeX/plain expression), where text is the completion after
    its last `</think>` (DeepSeek-R1 style: the reasoning is not graded), or "" when a `<think>` is never
    closed. Score: verify(gold, prediction).

    Timeout (`timeout_s` seconds per sample: parsing its gold and prediction and verifying them). math-verify's
    own timeouts are switched off (parsing_timeout=None, timeout_seconds=None): they use signal.alarm, which
    takes whole seconds only and raises off the main thread, and math-verify turns both that error and its
    timeouts into an empty parse or False without a word, so a reward running in a worker thread scores every
    sample 0.0. Instead, on the main thread a SIGALRM timer (signal.setitimer, fractional seconds) raises into
    the sample; elsewhere the sample runs in a daemon thread joined for timeout_s and abandoned after it (a
    Python thread cannot be stopped: it finishes in the background and cannot keep the process alive).
    Both are best effort against one long C-level step: a signal handler runs between bytecodes, and a
    thread's join cannot return while another thread holds the GIL, so an answer such as \\boxed{(10^{10^{10}})!}
    took 12 s (main thread) and 34 s (worker thread) with timeout_s=1 here, then scored 0.0 as a timeout; an
    abandoned thread also keeps taking CPU and the GIL until it ends. Only a separate process can bound that.
    A timed-out sample scores 0.0, as does one whose parse/verify raises (math-verify's TimeoutException, a
    BaseException, included); neither escapes. KeyboardInterrupt and SystemExit still do.

    `last_stats` holds the last batch's counts: {"timeouts", "errors", "unparsed_gold", "samples"}.

    `parse` and `verify` default to math-verify's; others with the same keywords can be passed (tests).
    """

    __name__ = "math_accuracy"

    def __init__(self, timeout_s: float = 5.0, parse: Optional[Callable] = None, verify: Optional[Callable] = None):
        self.timeout_s = _check_timeout(timeout_s)
        self._parse, self._verify = parse, verify
        self.last_stats: dict[str, int] = {"timeouts": 0, "errors": 0, "unparsed_gold": 0, "samples": 0}

    def _functions(self) -> tuple[Callable, Callable, tuple]:
        """(parse, verify, exception types counted as timeouts)."""
        timeouts: tuple = (CallTimeout,)
        if self._parse is None or self._verify is None:
            mv = require("math_verify", "math", reward=self.__name__)
            from math_verify import errors

            _quiet_math_verify()
            timeouts += (errors.TimeoutException,)
            return self._parse or mv.parse, self._verify or mv.verify, timeouts
        try:  # injected functions may still raise math-verify's timeout
            from math_verify.errors import TimeoutException

            timeouts += (TimeoutException,)
        except ImportError:
            pass
        return self._parse, self._verify, timeouts

    def __call__(
        self,
        prompts=None,
        completions=None,
        answer=None,
        *,
        timeout_s: Optional[float] = None,
        think_open: str = "<think>",
        think_close: str = "</think>",
        answer_open: Optional[str] = "<answer>",
        answer_close: Optional[str] = "</answer>",
        **kwargs,
    ) -> list[Optional[float]]:
        """`timeout_s`: seconds per sample for this call; None means the instance's (5.0 by default). The tags:
        final_answer's (the answer graded is the one think_format checks)."""
        timeout = self.timeout_s if timeout_s is None else _check_timeout(timeout_s)
        tags = _check_tags(think_open, think_close, answer_open, answer_close, self.__name__)
        completions = list(completions or [])
        golds = _column("answer", answer, len(completions), self.__name__)
        parse, verify, timeout_types = self._functions()
        gold_cache: dict[str, list] = {}

        def score(gold: Optional[str], text: str) -> Optional[float]:
            if gold is None:
                return None
            parsed = gold_cache.get(gold)
            if parsed is None:
                parsed = gold_cache[gold] = list(parse(gold, parsing_timeout=None) or [])
            if not parsed:
                return None
            pred = parse(text, parsing_timeout=None)
            return 1.0 if verify(parsed, pred, timeout_seconds=None) else 0.0

        stats = {"timeouts": 0, "errors": 0, "unparsed_gold": 0, "samples": len(completions)}
        out: list[Optional[float]] = []
        for comp, gold in zip(completions, golds):
            text = final_answer(comp, **tags)
            status, value = run_with_timeout(lambda g=gold_text(gold), t=text: score(g, t), timeout)
            if status == "raised" and isinstance(value, _NEVER_SWALLOW):
                raise value
            if status == "raised" and isinstance(value, timeout_types):
                status = "timeout"
            if status == "ok":
                if value is None:
                    stats["unparsed_gold"] += 1
                out.append(value)
            else:
                stats["timeouts" if status == "timeout" else "errors"] += 1
                out.append(0.0)
        self.last_stats = stats
        return out

    def __repr__(self) -> str:
        return f"MathAccuracy(timeout_s={self.timeout_s})"


def _check_timeout(timeout_s: Any) -> float:
    ok = isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool)
    if not ok or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"math_accuracy: timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
    return float(timeout_s)


math_accuracy = MathAccuracy()


# ----------------------------------------------------------------------------------
# think_format
# ----------------------------------------------------------------------------------
def think_format(
    prompts=None,
    completions=None,
    think_open: str = "<think>",
    think_close: str = "</think>",
    answer_open: Optional[str] = None,
    answer_close: Optional[str] = None,
    **kwargs,
) -> list[float]:
    """1.0 for a completion shaped `<think>reasoning</think>answer`, else 0.0.

    The rule, on the completion text cut at its first end marker and with leading whitespace removed:
      * it starts with `think_open`, which occurs exactly once, and `think_close` occurs exactly once after it;
      * the reasoning between them is not empty or only whitespace;
      * the answer after `think_close`, stripped, is not empty;
      * with `answer_open` and `answer_close` (both or neither; e.g. "<answer>", "</answer>"): the answer,
        stripped, is `answer_open` + content + `answer_close`, each tag exactly once, the content not empty or
        only whitespace; so only whitespace may come between `think_close` and `answer_open` and after
        `answer_close`.
    `think_open=""` is for templates whose generation prompt already opens the think block (DeepSeek-R1,
    Qwen3 thinking): then the completion is reasoning + `think_close` + answer, and any `<think>` in it is a
    second block (0.0).

    "<think>a</think>42" -> 1.0; "<think></think>42", "42", "<think>a</think>", "<think>a</think>1<think>b</think>2"
    -> 0.0.
    """
    _check_tags(think_open, think_close, answer_open, answer_close, "think_format")
    if not think_close or answer_open == "" or answer_close == "":
        raise ValueError("think_format: think_close, answer_open and answer_close must not be empty strings")
    return [
        1.0 if _well_formed(_text(c).lstrip(), think_open, think_close, answer_open, answer_close) else 0.0
        for c in (completions or [])
    ]


def _well_formed(text: str, think_open: str, think_close: str, answer_open, answer_close) -> bool:
    opener = think_open or "<think>"  # with think_open="", a "<think>" in the completion is a second block
    expected_opens = 1 if think_open else 0
    if think_open and not text.startswith(think_open):
        return False
    if text.count(opener) != expected_opens or text.count(think_close) != 1:
        return False
    reasoning, _, answer = text[len(think_open) :].partition(think_close)
    answer = answer.strip()
    if not reasoning.strip() or not answer:
        return False
    if answer_open is None:
        return True
    if not (answer.startswith(answer_open) and answer.endswith(answer_close)):
        return False
    if answer.count(answer_open) != 1 or answer.count(answer_close) != 1:
        return False
    return bool(answer[len(answer_open) : len(answer) - len(answer_close)].strip())


# ----------------------------------------------------------------------------------
# reasoning_gym
# ----------------------------------------------------------------------------------
_RG_HINT = (
    '; rows must come from `dataset_path: "reasoning_gym:<task>?size=N&seed=S"`, which stores each '
    "reasoning-gym entry in that column"
)


def reasoning_gym_answer(completion: Any, **tags) -> str:
    """The answer reasoning_gym scores: final_answer(completion, **tags) (the text after the last `</think>`, ""
    for a `<think>` never closed, then the content of its last `<answer>...</answer>` if it has one, stripped)."""
    return final_answer(completion, **tags)


class ReasoningGymScore:
    """reasoning-gym's own score for each completion, in [0, 1] (many tasks give partial credit: for
    basic_arithmetic an answer with surrounding text scores below 1), from the `reasoning_gym` column: the
    entry dict {"question", "answer", "metadata": {"source_dataset", "source_index", ...}} (a JSON string of
    it is read too). The answer scored is reasoning_gym_answer(completion).

    Each task's scorer is built once per process (reasoning_gym.get_score_answer_fn). A scorer that raises on
    an answer scores it 0.0; `last_stats` = {"errors", "samples"} counts them for the last batch.
    """

    __name__ = "reasoning_gym"

    def __init__(self) -> None:
        self._scorers: dict[str, Callable] = {}
        self._lock = threading.Lock()
        self.last_stats: dict[str, int] = {"errors": 0, "samples": 0}

    def scorer(self, task: str) -> Callable:
        with self._lock:
            if task not in self._scorers:
                rg = require("reasoning_gym", "reasoning-gym", reward=self.__name__)
                self._scorers[task] = rg.get_score_answer_fn(task)
            return self._scorers[task]

    def __call__(
        self,
        prompts=None,
        completions=None,
        reasoning_gym=None,
        *,
        think_open: str = "<think>",
        think_close: str = "</think>",
        answer_open: Optional[str] = "<answer>",
        answer_close: Optional[str] = "</answer>",
        **kwargs,
    ) -> list[float]:
        tags = _check_tags(think_open, think_close, answer_open, answer_close, self.__name__)
        completions = list(completions or [])
        entries = _column("reasoning_gym", reasoning_gym, len(completions), self.__name__, _RG_HINT)
        errors, out = 0, []
        for i, (comp, entry) in enumerate(zip(completions, entries)):
            entry = _entry(entry, i)
            fn = self.scorer(entry["metadata"]["source_dataset"])
            try:
                value = float(fn(answer=reasoning_gym_answer(comp, **tags), entry=entry))
            except Exception:  # noqa: BLE001  an answer its scorer cannot read is a wrong answer
                errors += 1
                value = 0.0
            out.append(value)
        self.last_stats = {"errors": errors, "samples": len(completions)}
        return out

    def __repr__(self) -> str:
        return "ReasoningGymScore()"


def _entry(entry: Any, i: int) -> dict:
    if isinstance(entry, str):
        try:
            entry = json.loads(entry)
        except ValueError:
            pass
    ok = isinstance(entry, dict) and isinstance(entry.get("metadata"), dict)
    if not ok or "source_dataset" not in entry["metadata"]:
        raise ValueError(
            f"reasoning_gym: sample {i}'s 'reasoning_gym' value is not a reasoning-gym entry "
            f"{{'question', 'answer', 'metadata': {{'source_dataset', ...}}}}: {str(entry)[:200]!r}{_RG_HINT}"
        )
    return entry


reasoning_gym = ReasoningGymScore()


def dry_run(fn: Callable, **kwargs) -> None:
    """Call a built-in reasoning reward on an empty batch with `kwargs`: a bad parameter (reward_kwargs) raises
    now, before a model loads, rather than at the first step."""
    fn(prompts=[], completions=[], completion_ids=[], answer=[], reasoning_gym=[], **kwargs)


VERIFIER_REWARDS: dict[str, Callable] = {
    "math_accuracy": math_accuracy,
    "think_format": think_format,
    "reasoning_gym": reasoning_gym,
}
