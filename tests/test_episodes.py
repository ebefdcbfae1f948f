"""Multi-turn episodes (gspo.episodes): token-exact trajectories and masks, by hand; tools and their failures;
environments; limits; the template requirement."""

from __future__ import annotations

import json
import time

import pytest
import torch

from episode_helpers import CountdownEnv, ScriptedEngine, random_tools_model, tools_tokenizer, user_row
from gspo.engines import SamplingParams, TransformersEngine
from gspo.episodes import (
    EnvironmentEpisodes,
    EpisodeError,
    MultiTurnEngine,
    TemplateError,
    ToolBox,
    ToolCall,
    ToolEpisodes,
    TurnTemplate,
    parse_hermes,
)
from gspo.logprobs import completion_logprobs
from gspo.tasks.tool_use import calculator, tool_call_text

SAMPLE = SamplingParams(max_new_tokens=64)


def tool_engine(tok, script, tools=(calculator,), **limits):
    box = ToolBox(list(tools), timeout_s=limits.pop("timeout_s", 5.0))
    inner = ScriptedEngine(tok, script)
    settings = dict(max_turns=4, max_episode_tokens=120, max_response_tokens=16, max_positions=128)
    settings.update(limits)
    engine = MultiTurnEngine(
        inner,
        tok,
        ToolEpisodes(box, parse_hermes),
        TurnTemplate(tok, tools=box.schemas),
        eos=[tok.eos_token_id],
        **settings,
    )
    return engine, inner


def env_engine(tok, script, env=CountdownEnv, policy="raise", **limits):
    inner = ScriptedEngine(tok, script)
    settings = dict(max_turns=4, max_episode_tokens=120, max_response_tokens=16, max_positions=128)
    settings.update(limits)
    kind = EnvironmentEpisodes(env, error_policy=policy, penalty=-1.0)
    return MultiTurnEngine(inner, tok, kind, TurnTemplate(tok), eos=[tok.eos_token_id], **settings), inner


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def call_then_answer(call_index, context):
    return tool_call_text("12*34") if call_index == 0 else "408"


# ------------------------------------------------------------------ token-exact, by hand
def test_a_tool_episode_token_by_token():
    tok = tools_tokenizer()
    eos = tok.eos_token_id
    engine, inner = tool_engine(tok, call_then_answer)
    r = engine.generate([user_row("12*34=", answer="408")], group_size=1, sampling=SAMPLE)
    prompt = enc(tok, "<tools>calculator<user>12*34=<assistant>")  # the template with the tool's name
    turn1 = enc(tok, tool_call_text("12*34")) + [eos]  # sampled, EOS included
    # the template closes an assistant turn with "<eos>" (sampled already), then the tool message and the prompt
    inserted = enc(tok, "<tool>408<assistant>")
    turn2 = enc(tok, "408") + [eos]
    assert len(turn1) == 59 and len(inserted) == 5 and len(turn2) == 4
    assert r.prompt_ids[0].tolist() == prompt and r.prompt_mask[0].tolist() == [1] * len(prompt)
    assert r.completion_ids[0].tolist() == turn1 + inserted + turn2
    assert r.completion_mask[0].tolist() == [1] * 68
    assert r.loss_mask[0].tolist() == [1] * 59 + [0] * 5 + [1] * 4
    # the engine's log-probs sit on the model's tokens: -0.01 * (position in its turn + 1); 0 on inserted ones
    expected = [-0.01 * (k + 1) for k in range(59)] + [0.0] * 5 + [-0.01 * (k + 1) for k in range(4)]
    assert torch.allclose(r.engine_logprobs[0], torch.tensor(expected), atol=1e-7)
    # the second turn was sampled from exactly prompt + turn 1 + inserted: no text was encoded again
    assert inner.contexts == [[prompt], [prompt + turn1 + inserted]]
    assert r.completions == ["408"] and not bool(r.truncated[0])
    assert {k: v.tolist() for k, v in r.episode_stats.items()} == {
        "turns": [2.0],
        "tool_calls": [1.0],
        "tool_failures": [0.0],
        "environment_errors": [0.0],
        "model_tokens": [63.0],  # 59 + 4
        "inserted_tokens": [5.0],
    }
    assert r.messages[0] == [
        {"role": "user", "content": "12*34="},
        {"role": "assistant", "content": tool_call_text("12*34")},
        {"role": "tool", "name": "calculator", "content": "408"},
        {"role": "assistant", "content": "408"},
    ]
    assert r.policy_lengths.tolist() == [63] and r.lengths.tolist() == [68]  # |y_i| counts the model's tokens


def test_episode_logprobs_equal_one_forward_pass_over_the_concatenated_sequence():
    tok = tools_tokenizer()
    model = random_tools_model(tok)

    def script(k, ctx):  # call the calculator on the row's own expression, then copy its result
        text = tok.decode(ctx, skip_special_tokens=False)
        expression = text.split("<user>")[1].split("=")[0]
        return tool_call_text(expression) if k == 0 else text.split("<tool>")[1].split("<")[0]

    engine, _ = tool_engine(tok, script)
    rows = [user_row("12*34=", answer="408"), user_row("7*8=", answer="56")]
    r = engine.generate(rows, group_size=2, sampling=SAMPLE)
    got, _ = completion_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    for i in range(len(r)):
        p = r.prompt_ids[i][r.prompt_mask[i].bool()].tolist()
        c = r.completion_ids[i][r.completion_mask[i].bool()].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0].float()
        one_pass = logits.log_softmax(-1)[len(p) - 1 : len(p) + len(c) - 1].gather(1, torch.tensor(c)[:, None])[:, 0]
        assert torch.allclose(got[i, : len(c)], one_pass, atol=1e-5), i
    # GSPO's sequence log-likelihood is the sum over the loss mask only: the model's 59 + 4 (row 0) tokens
    assert r.loss_mask.sum(dim=1).tolist() == [63, 63, 60, 60]  # "7*8": 2 characters shorter, "56": 1
    assert r.completions == ["408", "408", "56", "56"]


def test_greedy_hf_episodes_are_the_models_own_argmax_at_every_model_token():
    """Real generation: every token under the loss mask is the argmax of one forward pass over the final
    sequence at its position, so the ids trained on are the ids sampled, across turns."""
    tok = tools_tokenizer()
    model = random_tools_model(tok, seed=3, tied=False)
    # a random model rarely writes <eos>: let half the characters close a turn too, so that episodes take turns
    digits = [tok.convert_tokens_to_ids(d) for d in "0123456789abcdefghijklm{}:,"]
    model.generation_config.eos_token_id = [tok.eos_token_id] + digits
    engine = MultiTurnEngine(
        TransformersEngine(model, tok),
        tok,
        EnvironmentEpisodes(CountdownEnv),
        TurnTemplate(tok),
        max_turns=3,
        max_episode_tokens=100,
        max_response_tokens=8,
        max_positions=128,
        eos=[tok.eos_token_id] + digits,
    )
    rows = [user_row("hello", turns=3), user_row("ab", turns=2), user_row("x", turns=1)]
    r = engine.generate(rows, group_size=1, sampling=SamplingParams.greedy(6))
    turns = r.episode_stats["turns"].tolist()
    # an episode ends when its environment says so (after 3, 2, 1 turns), or truncated by a turn without end-of-turn
    assert turns == [3.0, 1.0, 1.0] and r.truncated.tolist() == [False, True, False]
    for i in range(len(r)):
        p = r.prompt_ids[i][r.prompt_mask[i].bool()].tolist()
        c = r.completion_ids[i][r.completion_mask[i].bool()].tolist()
        m = r.loss_mask[i][r.completion_mask[i].bool()].tolist()
        with torch.no_grad():
            argmax = model(torch.tensor([p + c])).logits[0].argmax(-1)[len(p) - 1 : len(p) + len(c) - 1].tolist()
        assert [a for a, k in zip(argmax, m) if k] == [t for t, k in zip(c, m) if k], i
        assert 0 in m or turns[i] == 1  # a later turn means inserted tokens


# ------------------------------------------------------------------ tools
def test_hermes_parser_reads_calls_and_names_what_is_wrong():
    good = parse_hermes('x <tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call> y')
    assert good == [ToolCall("calculator", {"expression": "1+2"})]
    as_string = parse_hermes('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert as_string == [ToolCall("f", {"a": 1})]
    two = parse_hermes('<tool_call>{"name":"a","arguments":{}}</tool_call><tool_call>{"name":"b"}</tool_call>')
    assert [c.name for c in two] == ["a", "b"] and all(c.error is None for c in two)
    assert "not valid JSON" in parse_hermes("<tool_call>{nope</tool_call>")[0].error
    assert 'string "name"' in parse_hermes('<tool_call>["x"]</tool_call>')[0].error
    assert "closing" in parse_hermes('<tool_call>{"name": "a"')[0].error
    assert parse_hermes("no call here") == []


def slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "woke"


def broken(x: int) -> str:
    """Raise.

    Args:
        x: Anything.
    """
    raise RuntimeError(f"tool broke on {x}")


def quits(x: int) -> str:
    """Exit.

    Args:
        x: Anything.
    """
    raise SystemExit(3)


def test_every_tool_failure_is_a_message_to_the_model_and_is_counted():
    box = ToolBox([calculator, slow, broken, quits], timeout_s=0.2)
    cases = [
        (ToolCall("calculator", {"expression": "2*21"}), False, "42"),
        (ToolCall("nope", {}), True, "unknown tool 'nope'"),
        (ToolCall("calculator", {"expr": "1"}), True, "wrong arguments for calculator"),
        (ToolCall("calculator", {"expression": "__import__('os')"}), True, "calculator raised ValueError"),
        (ToolCall("broken", {"x": 1}), True, "broken raised RuntimeError: tool broke on 1"),
        (ToolCall("quits", {"x": 1}), True, "quits raised SystemExit"),
        (ToolCall("slow", {"seconds": 5}), True, "did not return within 0.2 s"),
        (ToolCall(error="the tool call is not valid JSON"), True, "not valid JSON"),
    ]
    start = time.perf_counter()
    for call, failed, text in cases:
        result = box.run(call)
        assert result.failed is failed and text in result.content, (call, result)
    assert time.perf_counter() - start < 3  # the sleeping tool was abandoned at its timeout


def test_a_tool_schema_needs_types_and_a_docstring():
    def untyped(x):
        """Nothing."""

    with pytest.raises(ValueError, match="tool 'untyped'.*get_json_schema"):
        ToolBox([untyped], timeout_s=1)


def test_failed_calls_continue_the_episode_and_are_counted():
    tok = tools_tokenizer()

    def script(k, ctx):
        return ["<tool_call>{bad json</tool_call>", tool_call_text("2*3"), "6"][k]

    engine, _ = tool_engine(tok, script, max_positions=256, max_episode_tokens=200, max_response_tokens=64)
    r = engine.generate([user_row("2*3=")], group_size=1, sampling=SAMPLE)
    assert r.episode_stats["turns"].tolist() == [3.0]
    assert r.episode_stats["tool_calls"].tolist() == [2.0] and r.episode_stats["tool_failures"].tolist() == [1.0]
    assert "Error: the tool call is not valid JSON" in r.messages[0][2]["content"]
    assert r.messages[0][4]["content"] == "6" and r.completions == ["6"]


# ------------------------------------------------------------------ limits
def test_max_turns_cuts_an_episode_that_keeps_calling_and_marks_it_truncated():
    tok = tools_tokenizer()
    always = lambda k, ctx: tool_call_text("1+1")  # noqa: E731
    engine, inner = tool_engine(tok, always, max_turns=2, max_episode_tokens=200, max_positions=256)
    r = engine.generate([user_row("1+1=")], group_size=1, sampling=SAMPLE)
    assert bool(r.truncated[0]) and r.episode_stats["turns"].tolist() == [2.0] and len(inner.contexts) == 2
    # two model turns of 57 tokens ("1+1" is 2 characters shorter than "12*34") and one tool result between
    # them (<tool>2<assistant>: 3); the second result was never inserted
    assert r.loss_mask[0].sum().item() == 2 * 57 and r.lengths.tolist() == [2 * 57 + 3]


def test_max_episode_tokens_cuts_inside_a_turn_and_counts_inserted_tokens():
    tok = tools_tokenizer()
    # 59 + 5 inserted = 64 tokens after turn 1; a limit of 67 leaves 3 for the answer "408" + EOS (4): cut
    engine, _ = tool_engine(tok, call_then_answer, max_episode_tokens=67)
    r = engine.generate([user_row("12*34=")], group_size=1, sampling=SAMPLE)
    assert bool(r.truncated[0]) and r.lengths.tolist() == [67] and r.policy_lengths.tolist() == [62]
    assert r.completion_ids[0, -3:].tolist() == enc(tok, "408")  # the first 3 tokens of the turn, no EOS
    # a limit that the tool's tokens alone would cross: the episode ends after turn 1
    engine, inner = tool_engine(tok, call_then_answer, max_episode_tokens=63)
    r = engine.generate([user_row("12*34=")], group_size=1, sampling=SAMPLE)
    assert bool(r.truncated[0]) and len(inner.contexts) == 1 and r.lengths.tolist() == [59]


def test_an_episode_goes_on_while_one_model_token_fits():
    tok = tools_tokenizer()
    # after turn 1 and the tool's tokens: 59 + 5 = 64. A limit of 65 leaves one token for the answer (cut there,
    # truncated); a limit of 64 leaves none, and the tool's tokens are not inserted
    engine, inner = tool_engine(tok, call_then_answer, max_episode_tokens=65)
    r = engine.generate([user_row("12*34=")], group_size=1, sampling=SAMPLE)
    assert len(inner.contexts) == 2 and r.lengths.tolist() == [65] and bool(r.truncated[0])
    engine, inner = tool_engine(tok, call_then_answer, max_episode_tokens=64)
    r = engine.generate([user_row("12*34=")], group_size=1, sampling=SAMPLE)
    assert len(inner.contexts) == 1 and r.lengths.tolist() == [59] and bool(r.truncated[0])


def test_positions_bound_the_episode():
    tok = tools_tokenizer()
    prompt = len(enc(tok, "<tools>calculator<user>12*34=<assistant>"))  # 19
    engine, _ = tool_engine(tok, call_then_answer, max_positions=prompt + 60, max_episode_tokens=1000)
    r = engine.generate([user_row("12*34=")], group_size=1, sampling=SAMPLE)
    assert bool(r.truncated[0]) and r.lengths.tolist() == [59]  # 59 + 5 inserted would pass 60


def test_a_long_tool_result_is_cut_and_marked():
    tok = tools_tokenizer()

    def long_tool(n: int) -> str:
        """Digits.

        Args:
            n: How many.
        """
        return "7" * n

    call = '<tool_call>{"name":"long_tool","arguments":{"n":40}}</tool_call>'
    engine, _ = tool_engine(tok, lambda k, ctx: call if k == 0 else "7", tools=(long_tool,), max_response_tokens=10)
    r = engine.generate([user_row("x")], group_size=1, sampling=SAMPLE)
    assert r.messages[0][2]["content"] == "7" * 10 + " [cut: 30 more tokens]"


def test_a_turn_without_end_of_turn_ends_the_episode_truncated():
    tok = tools_tokenizer()
    engine, inner = tool_engine(tok, lambda k, ctx: "12...")
    r = engine.generate([user_row("x")], group_size=1, sampling=SAMPLE)
    assert bool(r.truncated[0]) and len(inner.contexts) == 1 and r.completion_ids[0].tolist() == enc(tok, "12")


# ------------------------------------------------------------------ environments
def test_environment_rewards_sum_over_steps_and_every_instance_is_closed():
    tok = tools_tokenizer()
    CountdownEnv.closed = 0
    engine, inner = env_engine(tok, lambda k, ctx: "ok")
    r = engine.generate([user_row("a", turns=3), user_row("b", turns=1)], group_size=2, sampling=SAMPLE)
    # turns=3: 0.5 + 0.5 + 1.0; turns=1: 1.0
    assert r.environment_rewards.tolist() == [2.0, 2.0, 1.0, 1.0]
    assert r.episode_stats["turns"].tolist() == [3.0, 3.0, 1.0, 1.0] and CountdownEnv.closed == 4
    assert [len(c) for c in inner.contexts] == [4, 2, 2]  # turn by turn, only the unfinished episodes
    inserted = enc(tok, "<user>again<assistant>")  # the observation as a user message
    ok = enc(tok, "ok") + [tok.eos_token_id]
    assert r.completion_ids[0].tolist() == ok + inserted + ok + inserted + ok
    assert r.loss_mask[0].tolist() == [1] * 3 + [0] * len(inserted) + [1] * 3 + [0] * len(inserted) + [1] * 3


class FirstMessagesEnv:
    def reset(self, **row):
        return [{"role": "system", "content": "be brief"}, {"role": "user", "content": row["question"]}]

    def step(self, text):
        return [{"role": "user", "content": "more"}], len(text) > 1, None


def test_reset_can_give_the_first_messages_and_observations_can_be_message_lists():
    tok = tools_tokenizer()
    engine, _ = env_engine(tok, lambda k, ctx: "a" * (k + 1), env=FirstMessagesEnv)
    r = engine.generate([user_row("ignored", question="q?")], group_size=1, sampling=SAMPLE)
    assert r.prompt_ids[0][r.prompt_mask[0].bool()].tolist() == enc(tok, "<user>be brief<user>q?<assistant>")
    assert r.environment_rewards.tolist() == [0.0] and r.episode_stats["turns"].tolist() == [2.0]


class RaisingEnv:
    closed = 0

    def reset(self, **row):
        return None

    def step(self, text):
        raise KeyError("no such state")

    def close(self):
        type(self).closed += 1


def test_an_environment_that_raises_names_itself_and_the_row_or_gives_the_penalty():
    tok = tools_tokenizer()
    engine, _ = env_engine(tok, lambda k, ctx: "a", env=RaisingEnv)
    with pytest.raises(EpisodeError, match=r"RaisingEnv.step raised KeyError.*'no such state'.*prompt 'row-7'"):
        engine.generate([user_row("row-7")], group_size=2, sampling=SAMPLE)
    assert RaisingEnv.closed == 2  # closed even so
    engine, _ = env_engine(tok, lambda k, ctx: "a", env=RaisingEnv, policy="penalty")
    r = engine.generate([user_row("row-7")], group_size=2, sampling=SAMPLE)
    assert r.environment_rewards.tolist() == [-1.0, -1.0]
    assert r.episode_stats["environment_errors"].tolist() == [1.0, 1.0]


class FailsOnSecondStep:
    def reset(self, **row):
        self.steps = 0

    def step(self, text):
        self.steps += 1
        if self.steps == 2:
            raise RuntimeError("lost its state")
        return "go on", False, 0.5


def test_a_failed_step_leaves_the_penalty_alone_as_the_environments_reward():
    tok = tools_tokenizer()
    engine, _ = env_engine(tok, lambda k, ctx: "a", env=FailsOnSecondStep, policy="penalty")
    r = engine.generate([user_row("p")], group_size=1, sampling=SAMPLE)
    # the first step's 0.5 is dropped: the episode's environment reward is the penalty (-1), not 0.5 - 1
    assert r.environment_rewards.tolist() == [-1.0] and r.episode_stats["turns"].tolist() == [2.0]


class ClosingFails:
    closed = 0

    def reset(self, **row):
        return [{"role": "user"}] if row.get("prompt") == "broken" else None  # no "content": the template raises

    def step(self, text):
        return None, True, 0.0

    def close(self):
        type(self).closed += 1
        raise OSError("close failed")


def test_every_environment_is_closed_whatever_raises():
    tok = tools_tokenizer()
    engine, _ = env_engine(tok, lambda k, ctx: "a", env=ClosingFails)
    ClosingFails.closed = 0
    with pytest.raises(OSError, match="close failed"):  # no other error: the first close error is raised
        engine.generate([user_row("p")], group_size=3, sampling=SAMPLE)
    assert ClosingFails.closed == 3  # each close ran although the first raised
    ClosingFails.closed = 0
    with pytest.raises(Exception) as info:  # the template's error on the third episode's first messages
        engine.generate([user_row("p"), user_row("broken")], group_size=2, sampling=SAMPLE)
    assert not isinstance(info.value, OSError) and ClosingFails.closed == 3  # 2 started + the broken one


class BadStepEnv:
    def step(self, text):
        return "obs", "yes", 1.0


def test_an_environment_breaking_its_contract_is_named():
    tok = tools_tokenizer()
    engine, _ = env_engine(tok, lambda k, ctx: "a", env=BadStepEnv)
    with pytest.raises(EpisodeError, match="BadStepEnv.step raised TypeError: done must be a bool, got str"):
        engine.generate([user_row("p")], group_size=1, sampling=SAMPLE)


# ------------------------------------------------------------------ the template requirement
# An assistant turn's content is rendered only after the last user message, as Qwen3's template drops earlier
# turns' <think> blocks: a new user message changes what was rendered before it.
FORGETFUL_TEMPLATE = (
    "{%- set ns = namespace(last=0) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}"
    "{{ '<assistant>' + (m['content'] if loop.index0 > ns.last else '') + '<eos>' }}"
    "{%- else %}{{ '<user>' + m['content'] }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<assistant>' }}{%- endif %}"
)


def test_a_template_that_is_not_prefix_preserving_is_refused_naming_the_tokenizer():
    tok = tools_tokenizer()
    tok.chat_template = FORGETFUL_TEMPLATE
    with pytest.raises(
        TemplateError,
        match=r"chat template of TokenizersBackend is not prefix-preserving.*at character 29.*GSPOConfig.chat_template",
    ):
        env_engine(tok, lambda k, ctx: "a")


# ------------------------------------------------------------------ through the trainer
@pytest.fixture(scope="module")
def tools_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-tools")
    tok = tools_tokenizer()
    random_tools_model(tok).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def episode_config(model_dir, out, **overrides):
    from conftest import small_config

    settings = dict(max_new_tokens=64, max_prompt_length=32, max_turns=3, group_size=2, batch_size=2)
    settings.update(overrides)
    return small_config(model_dir, out, **settings)


def test_a_training_step_on_tool_episodes_trains_on_the_models_tokens(tools_model_dir, tmp_path):
    from gspo.trainer import GSPOTrainer

    tok = tools_tokenizer()

    def script(k, ctx):  # the first turn calls the calculator on the row's expression, the second copies the result
        text = tok.decode(ctx, skip_special_tokens=False)
        return (
            tool_call_text(text.split("<user>")[1].split("=")[0])
            if "<tool>" not in text
            else text.split("<tool>")[1].split("<")[0]
        )

    cfg = episode_config(tools_model_dir, tmp_path)
    trainer = GSPOTrainer(cfg, tools=[calculator], rollout_engine=ScriptedEngine(tok, script, logprobs=False))
    rows = [
        trainer._as_dataset([{"prompt": "12*34=", "answer": "408"}, {"prompt": "7*8=", "answer": "55"}])[i]
        for i in range(2)
    ]
    metrics, rollout = trainer.training_step(rows)
    assert rollout.completions == ["408", "408", "56", "56"]
    assert rollout.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]  # exact_answer on the last turn; 7*8 is not 55
    assert metrics["episode/turns_mean"] == 2.0 and metrics["tools/calls_per_episode"] == 1.0
    assert metrics["episode/env_tokens_mean"] == (5 + 4) / 2  # "<tool>408<assistant>", "<tool>56<assistant>"
    assert metrics["episode/model_tokens_mean"] == (63 + 60) / 2 and metrics["tools/failure_fraction"] == 0.0
    assert metrics["episode/truncated_fraction"] == 0.0
    # the learner's token count is the loss mask's: GSPO's |y_i| leaves the tool's tokens out
    assert rollout.policy_lengths.tolist() == [63, 63, 60, 60] and rollout.lengths.tolist() == [68, 68, 64, 64]


ENV_FILE = '''
class Echo:
    """Rewards a completion that repeats the row's word; two turns."""

    def reset(self, prompt=None, word="", **row):
        self.word, self.turn = word, 0
        return [{"role": "user", "content": "say " + word}]

    def step(self, text):
        self.turn += 1
        reward = 1.0 if text.strip() == self.word else 0.0
        return ("again" if self.turn < 2 else None), self.turn >= 2, reward
'''


def test_an_environment_by_reference_gives_the_reward_alone(tools_model_dir, tmp_path):
    from gspo.trainer import GSPOTrainer

    (tmp_path / "env.py").write_text(ENV_FILE)
    tok = tools_tokenizer()
    cfg = episode_config(
        tools_model_dir,
        tmp_path / "out",
        reward_funcs=[],
        environment=f"{tmp_path / 'env.py'}:Echo",
        environment_reward_weight=0.5,
    )
    trainer = GSPOTrainer(
        cfg, rollout_engine=ScriptedEngine(tok, lambda k, ctx: "hi" if k == 0 else "no", logprobs=False)
    )
    rows = [trainer._as_dataset([{"prompt": "p", "word": "hi"}, {"prompt": "q", "word": "yo"}])[i] for i in range(2)]
    metrics, rollout = trainer.training_step(rows)
    # row "hi": 1 (turn 1) + 0 (turn 2); row "yo": 0 + 0; total = 0.5 * environment reward
    assert rollout.reward_per_func["environment"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert rollout.rewards.tolist() == [0.5, 0.5, 0.0, 0.0] and metrics["reward/environment_mean"] == 0.5
    assert metrics["episode/turns_max"] == 2.0


def test_truncated_episodes_leave_the_loss_under_mask_truncated_completions(tools_model_dir, tmp_path):
    from gspo.trainer import GSPOTrainer

    tok = tools_tokenizer()
    cfg = episode_config(tools_model_dir, tmp_path, mask_truncated_completions=True, max_turns=1)
    engine = ScriptedEngine(
        tok, lambda k, ctx: tool_call_text("2*2"), logprobs=False
    )  # wants a second turn: cut by max_turns
    trainer = GSPOTrainer(cfg, tools=[calculator], rollout_engine=engine)
    rows = [
        trainer._as_dataset([{"prompt": "2*2=", "answer": "4"}, {"prompt": "3*3=", "answer": "9"}])[i] for i in range(2)
    ]
    metrics, rollout = trainer.training_step(rows)
    assert rollout.truncated.all() and rollout.loss_mask.sum().item() == 0
    assert metrics["episode/truncated_fraction"] == 1.0
    # the episode metrics count the tokens as sampled ("2*2": a 57-token call), not the loss mask left after masking
    assert metrics["episode/model_tokens_mean"] == 57.0 and metrics["episode/env_tokens_mean"] == 0.0


def test_a_chat_template_file_fixes_a_template_that_is_not_prefix_preserving(tmp_path):
    from gspo.tasks.tool_use import CHAT_TEMPLATE
    from gspo.trainer import GSPOTrainer

    tok = tools_tokenizer()
    tok.chat_template = FORGETFUL_TEMPLATE
    model_dir = tmp_path / "model"
    random_tools_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    with pytest.raises(TemplateError, match=f"chat template of {model_dir} is not prefix-preserving"):
        GSPOTrainer(episode_config(str(model_dir), tmp_path), environment=CountdownEnv)
    (tmp_path / "fixed.jinja").write_text(CHAT_TEMPLATE)
    cfg = episode_config(str(model_dir), tmp_path, chat_template=str(tmp_path / "fixed.jinja"))
    trainer = GSPOTrainer(cfg, environment=CountdownEnv)
    assert trainer.tokenizer.chat_template == CHAT_TEMPLATE


def test_the_samples_table_shows_an_episode_turn_by_turn(capsys):
    from gspo.tracking import print_samples

    conversation = [
        {"role": "user", "content": "12*34="},
        {"role": "assistant", "content": "call"},
        {"role": "tool", "name": "calculator", "content": "408"},
        {"role": "assistant", "content": "408"},
    ]
    row = {"group": 0, "last_user": "12*34=", "completion": "408", "reward": 1.0, "messages": json.dumps(conversation)}
    print_samples(3, [row])
    out = capsys.readouterr().out
    assert "assistant: call" in out and "tool: 408" in out and "assistant: 408" in out
    assert "user: 12*34=" not in out  # the prompt has its own column


def test_the_curves_get_a_turns_panel_for_episodes_only():
    from gspo.plotting import panel_titles

    episode = {"step": 1, "raw_reward_mean": 0.5, "episode/turns_mean": 2.0, "tools/episodes_with_calls": 0.5}
    assert "Turns and tool use" in panel_titles([episode])
    assert "Turns and tool use" not in panel_titles([{"step": 1, "raw_reward_mean": 0.5}])


def test_lora_trains_on_sampled_multi_turn_episodes(tmp_path):
    from gspo.trainer import GSPOTrainer

    tok = tools_tokenizer()
    model = random_tools_model(tok, seed=3, tied=False)
    # as in the greedy test above: half the characters end a turn, so that sampled episodes take several turns
    model.generation_config.eos_token_id = [tok.eos_token_id] + tok.convert_tokens_to_ids(
        list("0123456789abcdefghijklm")
    )
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    cfg = episode_config(
        str(tmp_path / "model"),
        tmp_path / "out",
        use_lora=True,
        lora_target_modules=["q_proj", "v_proj"],
        learning_rate=1e-2,
        max_new_tokens=6,
        reward_funcs=[],
        group_size=4,
    )
    trainer = GSPOTrainer(
        cfg, environment=CountdownEnv, reward_funcs=[lambda completions, **kw: [float(len(c)) for c in completions]]
    )
    lora = {n: p.detach().clone() for n, p in trainer.policy.unwrapped().named_parameters() if "lora_B" in n}
    rows = [trainer._as_dataset([{"prompt": "ab", "turns": 2}, {"prompt": "cd", "turns": 2}])[i] for i in (0, 1)]
    metrics, rollout = trainer.training_step(rows)
    assert metrics["episode/turns_max"] == 2.0 and metrics["relative_advantage_std"] > 0
    moved = [
        n for n, p in trainer.policy.unwrapped().named_parameters() if "lora_B" in n and not torch.equal(p, lora[n])
    ]
    assert moved  # the adapters trained (B starts at 0: it moves first)


def test_a_rank_whose_episodes_ended_keeps_generating_while_another_rank_has_turns():
    """turn_sync stands for the other rank: it still has unfinished episodes during the first 3 turns. This rank's
    episodes end after 1 turn; it generates placeholders (its first prompt) for turns 2 and 3, then stops with the
    other rank, and its Rollout holds only its own episodes."""
    tok = tools_tokenizer()
    calls = []

    def other_rank_active_for_3_turns(active: bool) -> bool:
        calls.append(active)
        return active or len(calls) <= 3

    inner = ScriptedEngine(tok, lambda k, ctx: "ok")
    kind = EnvironmentEpisodes(CountdownEnv)
    engine = MultiTurnEngine(
        inner,
        tok,
        kind,
        TurnTemplate(tok),
        max_turns=4,
        max_episode_tokens=100,
        max_response_tokens=8,
        max_positions=128,
        eos=[tok.eos_token_id],
        turn_sync=other_rank_active_for_3_turns,
    )
    r = engine.generate([user_row("a", turns=1), user_row("b", turns=1)], group_size=1, sampling=SAMPLE)
    prompt_a = enc(tok, "<user>a<assistant>")
    assert calls == [True, False, False, False]  # asked before each turn; the 4th answer is "nobody": stop
    assert inner.contexts == [[prompt_a, enc(tok, "<user>b<assistant>")], [prompt_a], [prompt_a]]
    assert r.episode_stats["turns"].tolist() == [1.0, 1.0] and r.lengths.tolist() == [3, 3]  # "ok" + <eos>


def test_dynamic_samplings_slices_and_concatenation_keep_the_episodes():
    from gspo.rollout import concat_rollouts

    tok = tools_tokenizer()
    engine, _ = env_engine(tok, lambda k, ctx: "ok")
    r = engine.generate([user_row("a", turns=2), user_row("b", turns=1)], group_size=2, sampling=SAMPLE)
    second = r.select_groups([1])
    assert second.messages == r.messages[2:] and second.environment_rewards.tolist() == [1.0, 1.0]
    assert second.episode_stats["turns"].tolist() == [1.0, 1.0]
    both = concat_rollouts([second, r.select_groups([0])], tok.pad_token_id)
    assert both.messages == r.messages[2:] + r.messages[:2]
    assert both.environment_rewards.tolist() == [1.0, 1.0, 1.5, 1.5]  # turns=2: 0.5 + 1.0
    assert both.episode_stats["turns"].tolist() == [1.0, 1.0, 2.0, 2.0]
    assert torch.equal(both.loss_mask[2:], r.loss_mask[:2])  # the wider group sets the width


def test_soft_overlong_punishment_is_refused_for_episodes(tools_model_dir, tmp_path):
    from gspo.config import ConfigError

    with pytest.raises(ConfigError, match="soft_overlong_punishment.*one model turn"):
        episode_config(
            tools_model_dir,
            tmp_path,
            tools=["gspo.tasks.tool_use:calculator"],
            reward_funcs=["exact_answer", "soft_overlong_punishment"],
            overlong_buffer_len=8,
        )


def test_a_tokenizer_that_hides_tool_call_markers_is_refused(tools_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from gspo.config import ConfigError
    from gspo.trainer import GSPOTrainer

    tok = AutoTokenizer.from_pretrained(tools_model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})  # decoded turns lose them
    with pytest.raises(ConfigError, match="cannot read calls with this tokenizer"):
        GSPOTrainer(episode_config(tools_model_dir, tmp_path), tools=[calculator], tokenizer=tok)
