"""gspo.verifiers: math_accuracy (math-verify, with a timeout that works off the main thread), think_format,
reasoning_gym, and the optional-extra import guard."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from gspo.verifiers import (
    VERIFIER_EXTRAS,
    VERIFIER_REWARDS,
    MathAccuracy,
    MissingExtraError,
    check_available,
    gold_text,
    math_accuracy,
    reasoning_gym,
    reasoning_gym_answer,
    require,
    think_format,
)

pytest.importorskip("math_verify")


def run_in_thread(fn, *args, **kwargs):
    """fn's return value (or exception) when called from a non-main thread."""
    box = {}

    def target():
        try:
            box["out"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            box["exc"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    assert not t.is_alive()
    if "exc" in box:
        raise box["exc"]
    return box["out"]


# ----------------------------------------------------------------------------------
# math_accuracy
# ----------------------------------------------------------------------------------
MATH_COMPLETIONS = [
    "so the answer is \\boxed{1/2}",  # 1/2 == 0.5 -> 1.0
    "so the answer is \\boxed{3}",  # 3 != 0.5 -> 0.0
    "\\boxed{7}",  # gold "not math at all" has no math in it -> None
    "<think>maybe \\boxed{42}</think> The answer is \\boxed{41}",  # only "after </think>" is graded: 41 != 42
    "<think>hmm 41</think> The answer is \\boxed{42}",  # after </think>: 42 == 42 -> 1.0
]
MATH_GOLDS = ["0.5", "0.5", "not math at all", "42", "42"]
MATH_EXPECTED = [1.0, 0.0, None, 0.0, 1.0]


def test_math_accuracy_scores():
    assert math_accuracy(prompts=["p"] * 5, completions=MATH_COMPLETIONS, answer=MATH_GOLDS) == MATH_EXPECTED
    # one gold did not parse, nothing timed out
    assert math_accuracy.last_stats == {"timeouts": 0, "errors": 0, "unparsed_gold": 1, "samples": 5}


def test_math_accuracy_off_the_main_thread():
    """verl PR #5635: math-verify's signal.alarm timeouts raise ValueError off the main thread, which
    math-verify itself turns into an empty parse, so every sample scored 0.0. Here the same batch scored in a
    worker thread gives the same scores."""
    assert run_in_thread(math_accuracy, completions=MATH_COMPLETIONS, answer=MATH_GOLDS) == MATH_EXPECTED


def test_math_accuracy_latex_golds_are_wrapped():
    # A bare "2\pi" parses as 2 in math-verify; gold_text wraps it in $...$ so it is 2*pi.
    assert gold_text("2\\pi") == "$2\\pi$"
    assert gold_text("$2\\pi$") == "$2\\pi$"  # delimited: as it is
    assert gold_text("not math at all") == "not math at all"  # prose: as it is, parses to nothing
    assert gold_text("  ") is None and gold_text(None) is None
    comps = ["\\boxed{2\\pi}", "\\boxed{2}", "\\boxed{x^2+1}", "\\boxed{1}", "\\boxed{1000}", "\\boxed{\\sqrt{2}}"]
    golds = ["2\\pi", "2\\pi", "x^2 + 1", "x^2 + 1", "1,000", "\\sqrt{2}"]
    # 2pi == 2pi; 2 != 2pi; x^2+1 == x^2+1; 1 != x^2+1 (bare "x^2 + 1" would have parsed as 1); 1,000 == 1000;
    # sqrt(2) == sqrt(2) (bare "\sqrt{2}" parses to nothing)
    assert math_accuracy(completions=comps, answer=golds) == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def test_math_accuracy_unclosed_think_and_missing_gold():
    # a <think> never closed is a truncated thought: no answer -> 0.0; a None gold -> None
    assert math_accuracy(completions=["<think>it is \\boxed{5}", "\\boxed{5}"], answer=["5", None]) == [0.0, None]
    assert math_accuracy.last_stats["unparsed_gold"] == 1


def test_math_accuracy_needs_answer_column():
    with pytest.raises(ValueError, match="'answer' column"):
        math_accuracy(completions=["1"])
    with pytest.raises(ValueError, match="2 'answer' values for 1 completions"):
        math_accuracy(completions=["1"], answer=["1", "2"])
    with pytest.raises(ValueError, match="timeout_s"):
        math_accuracy(completions=["1"], answer=["1"], timeout_s=0)


def test_math_accuracy_passes_no_math_verify_timeouts():
    """math-verify's own timeouts are off in both places (they cannot work off the main thread)."""
    from math_verify import parse, verify

    seen = []

    def spy_parse(text, **kw):
        seen.append(("parse", kw))
        return parse(text, **kw)

    def spy_verify(gold, pred, **kw):
        seen.append(("verify", kw))
        return verify(gold, pred, **kw)

    fn = MathAccuracy(parse=spy_parse, verify=spy_verify)
    assert fn(completions=["\\boxed{2}"], answer=["2"]) == [1.0]
    assert run_in_thread(fn, completions=["\\boxed{2}"], answer=["2"]) == [1.0]
    # per call: parse gold, parse prediction, verify -> 3 calls, twice
    one_call = [
        ("parse", {"parsing_timeout": None}),
        ("parse", {"parsing_timeout": None}),
        ("verify", {"timeout_seconds": None}),
    ]
    assert seen == one_call * 2


def slow_verify(gold, pred, **kw):
    time.sleep(2.0)
    return True


@pytest.mark.parametrize("where", ["main", "thread"])
def test_math_accuracy_timeout(where):
    """A verify that takes 2 s with timeout_s=0.2: each sample is abandoned after about 0.2 s, scores 0.0 and
    is counted. On the main thread a SIGALRM timer interrupts time.sleep (the handler raises); off it the
    sample's daemon thread is abandoned."""
    fn = MathAccuracy(timeout_s=0.2, verify=slow_verify)
    call = (lambda **kw: fn(**kw)) if where == "main" else (lambda **kw: run_in_thread(fn, **kw))
    start = time.monotonic()
    out = call(completions=["\\boxed{1}", "\\boxed{2}"], answer=["1", "not math at all"])
    elapsed = time.monotonic() - start
    # sample 0 reaches the slow verify -> timeout -> 0.0; sample 1's gold does not parse -> None before verify
    assert out == [0.0, None]
    assert fn.last_stats == {"timeouts": 1, "errors": 0, "unparsed_gold": 1, "samples": 2}
    assert elapsed < 1.5, elapsed  # 0.2 s for the timeout, not the 2 s sleep
    if where == "main":  # the SIGALRM handler and timer are put back
        assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_math_accuracy_timeout_keyword_per_call():
    """timeout_s given with the call (reward_kwargs) overrides the instance's 5 s."""
    fn = MathAccuracy(verify=slow_verify)
    start = time.monotonic()
    assert fn(completions=["\\boxed{1}"], answer=["1"], timeout_s=0.2) == [0.0]
    assert time.monotonic() - start < 1.5
    assert fn.last_stats["timeouts"] == 1


def test_math_accuracy_keeps_an_outer_alarm():
    """A SIGALRM timer the caller set is still armed, with its handler, after math_accuracy ran."""
    fired = []
    old = signal.signal(signal.SIGALRM, lambda s, f: fired.append(s))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert math_accuracy(completions=["\\boxed{1}"], answer=["1"]) == [1.0]
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20.0 < remaining <= 30.0
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Boom(BaseException):
    """Like math-verify's TimeoutException: a BaseException, not an Exception."""


def test_math_accuracy_base_exceptions_are_scored_not_raised():
    from math_verify.errors import TimeoutException

    def boom(gold, pred, **kw):
        raise Boom("no")

    def mv_timeout(gold, pred, **kw):
        raise TimeoutException("Operation timed out!")

    for where in ("main", "thread"):
        fn = MathAccuracy(verify=boom)
        out = (
            fn(completions=["\\boxed{1}"], answer=["1"])
            if where == "main"
            else run_in_thread(fn, completions=["\\boxed{1}"], answer=["1"])
        )
        assert out == [0.0] and fn.last_stats["errors"] == 1 and fn.last_stats["timeouts"] == 0
        fn = MathAccuracy(verify=mv_timeout)  # math-verify's own timeout counts as a timeout
        out = (
            fn(completions=["\\boxed{1}"], answer=["1"])
            if where == "main"
            else run_in_thread(fn, completions=["\\boxed{1}"], answer=["1"])
        )
        assert out == [0.0] and fn.last_stats["timeouts"] == 1 and fn.last_stats["errors"] == 0


def test_math_accuracy_lets_keyboard_interrupt_through():
    def interrupt(gold, pred, **kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        MathAccuracy(verify=interrupt)(completions=["\\boxed{1}"], answer=["1"])


# ----------------------------------------------------------------------------------
# think_format
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>a</think>42", 1.0),
        ("  \n<think>\nlet me see\n</think>\n42\n", 1.0),  # leading whitespace is stripped
        ("<think>a</think>42<|endoftext|>", 1.0),  # cut at the end marker
        ("<think></think>42", 0.0),  # empty reasoning
        ("<think>  \n</think>42", 0.0),  # whitespace-only reasoning
        ("42", 0.0),  # no think block
        ("<think>a</think>", 0.0),  # no answer
        ("<think>a</think>  \n", 0.0),  # whitespace-only answer
        ("<think>a</think>1<think>b</think>2", 0.0),  # two think blocks
        ("<think>a<think>b</think>2", 0.0),  # two openings
        ("x<think>a</think>42", 0.0),  # text before the block
        ("<think>a 42", 0.0),  # never closed
    ],
)
def test_think_format(completion, expected):
    assert think_format(completions=[completion]) == [expected]


def test_think_format_answer_tags_and_custom_tags():
    comps = [
        "<think>a</think> <answer>42</answer>",  # 1.0
        "<think>a</think>\n<answer>42</answer>\n",  # whitespace around the answer tags -> 1.0
        "<think>a</think>42",  # no answer tags -> 0.0
        "<think>a</think><answer>42</answer> more",  # text after </answer> -> 0.0
        "<think>a</think>so <answer>42</answer>",  # text before <answer> -> 0.0
        "<think>a</think><answer> </answer>",  # empty answer -> 0.0
        "<think>a</think><answer>4</answer><answer>2</answer>",  # two answers -> 0.0
    ]
    assert think_format(completions=comps, answer_open="<answer>", answer_close="</answer>") == [
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
    ]
    # custom think tags: the default tags are then ordinary text
    tags = {"think_open": "<reasoning>", "think_close": "</reasoning>"}
    assert think_format(completions=["<reasoning>r</reasoning>7", "<think>r</think>7"], **tags) == [1.0, 0.0]
    # think_open="": the prompt opened the block (R1 / Qwen3 templates)
    assert think_format(completions=["r</think>7", "</think>7", "<think>r</think>7"], think_open="") == [
        1.0,  # reasoning "r", answer "7"
        0.0,  # empty reasoning
        0.0,  # a second opening in the completion
    ]
    with pytest.raises(ValueError, match="give answer_open and answer_close together"):
        think_format(completions=["x"], answer_open="<answer>")


# ----------------------------------------------------------------------------------
# reasoning_gym
# ----------------------------------------------------------------------------------
def test_reasoning_gym_scores():
    rg = pytest.importorskip("reasoning_gym")
    entries = list(rg.create_dataset("basic_arithmetic", size=3, seed=1))
    right = [e["answer"] for e in entries]  # seed 1: "-4", "3", "-61"
    comps = [
        right[0],  # the answer -> 1.0
        "999999",  # wrong -> 0.0
        f"<think>2 - 5 = -3?</think> <answer>{right[2]}</answer>",  # the <answer> after </think> -> 1.0
        f"<think><answer>{right[0]}</answer></think> <answer>5</answer>",  # the think block is not read -> 0.0
        f"  {right[1]}\n",  # stripped -> 1.0 (unstripped, "  3\n" would score len("3") / len("  3\n") = 1/4)
        # the base ProceduralDataset.score_answer's partial credit: the oracle inside a longer text scores
        # len(oracle) / len(text) = len("-61") / len("The answer is -61") = 3/17
        f"The answer is {right[2]}",
    ]
    rows = [entries[0], entries[0], entries[2], entries[0], entries[1], entries[2]]
    out = reasoning_gym(completions=comps, reasoning_gym=rows)
    assert right == ["-4", "3", "-61"]
    assert out == [1.0, 0.0, 1.0, 0.0, 1.0, pytest.approx(3 / 17)]
    assert reasoning_gym.last_stats == {"errors": 0, "samples": 6}
    # an entry stored as JSON text (a dataset saved to disk) reads the same
    import json

    assert reasoning_gym(completions=[right[1]], reasoning_gym=[json.dumps(entries[1])]) == [1.0]


def test_reasoning_gym_answer_extraction():
    assert reasoning_gym_answer("<think>x</think> <answer> 12 </answer>") == "12"
    assert reasoning_gym_answer("<answer>1</answer> <answer>2</answer>") == "2"  # the last one
    assert reasoning_gym_answer("  7 \n") == "7"
    assert reasoning_gym_answer("<think>never closed <answer>7</answer>") == ""


def test_reasoning_gym_needs_its_column():
    with pytest.raises(ValueError, match=r"'reasoning_gym' column.*reasoning_gym:<task>\?size=N&seed=S"):
        reasoning_gym(completions=["1"], answer=["1"])
    with pytest.raises(ValueError, match="not a reasoning-gym entry"):
        reasoning_gym(completions=["1"], reasoning_gym=[{"answer": "1"}])


# ----------------------------------------------------------------------------------
# The import guard and the tables
# ----------------------------------------------------------------------------------
def test_missing_extra_error_message(monkeypatch):
    with pytest.raises(MissingExtraError) as info:
        require("definitely_not_a_module_xyz", "math")
    msg = str(info.value)
    assert "needs definitely_not_a_module_xyz: pip install 'gspo[math]'" in msg
    assert isinstance(info.value, ImportError)
    # math-verify made unimportable: the reward's own message, from require and from check_available
    monkeypatch.setitem(sys.modules, "math_verify", None)
    expected = r"reward 'math_accuracy' needs math-verify: pip install 'gspo\[math\]'"
    with pytest.raises(MissingExtraError, match=expected):
        require("math_verify", "math", reward="math_accuracy")
    with pytest.raises(MissingExtraError, match=expected):
        check_available("math_accuracy")
    with pytest.raises(MissingExtraError, match=expected):
        MathAccuracy()(completions=["1"], answer=["1"])


def test_check_available():
    for name in VERIFIER_REWARDS:
        check_available(name)  # installed here: no error
        run_in_thread(check_available, name)  # nor off the main thread
    check_available("exact_answer")  # needs no extra


def test_tables():
    assert set(VERIFIER_REWARDS) == {"math_accuracy", "think_format", "reasoning_gym"}
    assert VERIFIER_EXTRAS == {
        "math_accuracy": ("math_verify", "math"),
        "reasoning_gym": ("reasoning_gym", "reasoning-gym"),
    }
    for name, fn in VERIFIER_REWARDS.items():
        assert fn.__name__ == name


def test_no_optional_import_at_module_import():
    code = "import sys, gspo.verifiers; print('math_verify' in sys.modules, 'reasoning_gym' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_math_accuracy_reads_the_answer_think_format_checks():
    # the answer inside <answer> tags is graded (math-verify alone finds nothing in "<answer>6</answer>")
    completions = ["<think>x</think><answer>6</answer>", "<answer> 6 </answer>", "<answer>-4</answer>"]
    assert math_accuracy(completions=completions, answer=["6", "6", "-4"]) == [1.0, 1.0, 1.0]
    # custom tags, as think_format takes them: the reasoning's "1" is not the answer, "-4" in <a> is
    tags = dict(think_open="<reasoning>", think_close="</reasoning>", answer_open="<a>", answer_close="</a>")
    assert math_accuracy(completions=["<reasoning>9 + 1</reasoning><a>-4</a>"], answer=["-4"], **tags) == [1.0]
    assert reasoning_gym_answer("<reasoning>9</reasoning><a> -4 </a>", **tags) == "-4"


def test_a_word_gold_is_no_opinion_not_a_product_of_letters():
    # "$ognib$" would read as o*g*n*i*b, which any anagram (\boxed{bingo}) equals; bare, it parses to nothing
    assert math_accuracy(completions=["\\boxed{bingo}", "$bingo$", "ognib"], answer=["ognib"] * 3) == [None] * 3
    assert gold_text("ognib") == "ognib" and gold_text("x") == "$x$" and gold_text("42") == "$42$"
