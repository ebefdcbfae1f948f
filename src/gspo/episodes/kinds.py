"""The two kinds of episode, behind one interface the turn loop calls without asking which it has:

    state, first_messages = kind.start(row)   # first_messages None: the row's own prompt
    reply = kind.step(state, assistant_text)  # Reply(messages, done, reward, calls, failures, error)
    kind.close(state)                         # always, however the episode ended

ToolEpisodes: the model calls tools (gspo.episodes.tools); the episode ends on a turn without a call.
EnvironmentEpisodes: one instance of a user's environment class per episode (TRL's environment_factory,
SkyRL's text env): reset(**row) -> first messages or None; step(text) -> (observation, done, reward); close().
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional


class EpisodeError(RuntimeError):
    """An environment failed, or broke its contract; the message names the environment and the row."""


@dataclass(frozen=True)
class Reply:
    messages: list = field(default_factory=list)  # what the model reads next ({"role", "content"} dicts)
    done: bool = False
    reward: float = 0.0
    calls: int = 0  # tool calls the model made this turn
    failures: int = 0  # of which failed (malformed, unknown, raised, timed out)
    error: bool = False  # step() failed: the episode ends, its environment reward is `reward` (the penalty) alone


class ToolEpisodes:
    observation_role = "tool"
    rewards = False  # the reward comes from reward functions only

    def __init__(self, toolbox, parser) -> None:
        self.toolbox, self.parser = toolbox, parser

    def start(self, row: dict):
        return None, None

    def step(self, state, text: str) -> Reply:
        calls = self.parser(text)
        if not calls:
            return Reply(done=True)
        results = [self.toolbox.run(c) for c in calls]
        messages = [{"role": "tool", "name": r.name, "content": r.content} for r in results]
        return Reply(messages=messages, calls=len(results), failures=sum(r.failed for r in results))

    def close(self, state) -> None:
        pass


class EnvironmentEpisodes:
    observation_role = "user"
    rewards = True  # the sum of step rewards, weighted by environment_reward_weight

    def __init__(self, environment_class, *, error_policy: str = "raise", penalty: float = 0.0) -> None:
        self.cls, self.error_policy, self.penalty = environment_class, error_policy, float(penalty)
        self.name = getattr(environment_class, "__name__", repr(environment_class))

    def start(self, row: dict):
        """A new instance and its first messages. A constructor or reset() that fails always raises (there is no
        episode to give a penalty to): environment_error_policy covers step()."""
        try:
            env = self.cls()
        except Exception as e:
            raise EpisodeError(f"environment {self.name}() raised {type(e).__name__}: {e} ({_row(row)})") from e
        try:
            first = env.reset(**row) if hasattr(env, "reset") else None
        except Exception as e:
            self.close(env)
            raise EpisodeError(f"environment {self.name}.reset raised {type(e).__name__}: {e} ({_row(row)})") from e
        if first is not None and not _is_messages(first):
            self.close(env)
            raise EpisodeError(
                f"environment {self.name}.reset returned {type(first).__name__}; expected a list of "
                f"{{'role', 'content'}} messages or None ({_row(row)})"
            )
        return (env, row), (list(first) if first is not None else None)

    def step(self, state, text: str) -> Reply:
        env, row = state
        try:
            out = env.step(text)
            observation, done, reward = _check_step(out)
        except Exception as e:
            msg = f"environment {self.name}.step raised {type(e).__name__}: {e} ({_row(row)})"
            if self.error_policy == "raise":
                raise EpisodeError(
                    msg + "; set environment_error_policy='penalty' to end such episodes with "
                    "reward_penalty_value instead"
                ) from e
            return Reply(done=True, reward=self.penalty, error=True)
        if isinstance(observation, str):
            observation = [{"role": "user", "content": observation}]
        return Reply(messages=list(observation or []), done=bool(done), reward=reward)

    def close(self, state) -> None:
        env = state[0] if isinstance(state, tuple) else state
        close = getattr(env, "close", None)
        if callable(close):
            close()


def _check_step(out) -> tuple:
    if not (isinstance(out, tuple) and len(out) == 3):
        raise TypeError(f"step must return a tuple (observation, done, reward), got {type(out).__name__} {out!r:.80}")
    observation, done, reward = out
    if observation is not None and not isinstance(observation, str) and not _is_messages(observation):
        raise TypeError(f"observation must be a string, a list of messages or None, got {type(observation).__name__}")
    if not isinstance(done, bool):
        raise TypeError(f"done must be a bool, got {type(done).__name__} {done!r:.40}")
    if reward is None:
        reward = 0.0
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(float(reward)):
        raise TypeError(f"reward must be a finite number or None, got {reward!r:.40}")
    return observation, done, float(reward)


def _is_messages(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in value)


def _row(row: dict) -> str:
    prompt = row.get("prompt")
    return f"row with prompt {str(prompt)[:80]!r}" if prompt is not None else f"row with keys {sorted(row)}"


def episode_kind(config, *, tools, environment) -> Optional[object]:
    """The kind a run uses, chosen once (None: single-turn completions)."""
    from gspo.episodes.tools import ToolBox, resolve_parser

    if environment is not None:
        return EnvironmentEpisodes(
            environment, error_policy=config.environment_error_policy, penalty=config.reward_penalty_value
        )
    if tools:
        return ToolEpisodes(ToolBox(tools, timeout_s=config.tool_timeout_s), resolve_parser(config.tool_call_parser))
    return None
