"""Multi-turn episodes: tools or an environment, token-exact (docs/multi_turn.md).

    GSPOTrainer(config, tools=[calculator])            # the model calls Python functions
    GSPOTrainer(config, environment=GuessTheNumber)    # an environment answers each turn

`episode_engine` wraps the run's rollout engine in a MultiTurnEngine when the config or the caller names tools
or an environment; the producer, the learner and evaluation then see ordinary Rollouts, whose loss mask covers
the model's own tokens only.
"""

from __future__ import annotations

from pathlib import Path

from gspo.episodes.engine import MultiTurnEngine
from gspo.episodes.kinds import EnvironmentEpisodes, EpisodeError, Reply, ToolEpisodes, episode_kind
from gspo.episodes.template import TemplateError, TurnTemplate
from gspo.episodes.tools import TOOL_CALL_PARSERS, ToolBox, ToolCall, parse_hermes

__all__ = [
    "EnvironmentEpisodes",
    "EpisodeError",
    "MultiTurnEngine",
    "Reply",
    "TOOL_CALL_PARSERS",
    "TemplateError",
    "ToolBox",
    "ToolCall",
    "ToolEpisodes",
    "TurnTemplate",
    "episode_engine",
    "parse_hermes",
    "resolve_episode",
]


def resolve_episode(config, tools=None, environment=None) -> tuple[list, object]:
    """(tool callables, environment class or None): the config's references plus what the caller passed."""
    from gspo.config import ConfigError
    from gspo.references import resolve_reference

    def load(ref, what):
        return ref if callable(ref) else resolve_reference(ref, what=what, error=ConfigError)

    tool_list = [load(t, "tool") for t in list(config.tools) + list(tools or [])]
    env = environment if environment is not None else config.environment
    env = load(env, "environment") if env is not None else None
    if tool_list and env is not None:
        raise ConfigError("GSPOTrainer: an episode is defined by tools or by an environment, not both")
    return tool_list, env


def episode_engine(config, engine, tokenizer, model, *, tools, environment, eos, accelerator=None):
    """`engine` itself for single-turn runs; else a MultiTurnEngine around it, its template checked once. With an
    `accelerator` of several processes, ranks run their turn loops to the longest (MultiTurnEngine.turn_sync)."""
    kind = episode_kind(config, tools=tools, environment=environment)
    if kind is None:
        return engine
    template = TurnTemplate(tokenizer, tools=kind.toolbox.schemas if tools else None)
    if tools and config.tool_call_parser == "hermes":
        _check_call_survives_decoding(tokenizer)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    limits = [getattr(base.config, "max_position_embeddings", None), engine.max_length]  # the model's, the engine's
    return MultiTurnEngine(
        engine,
        tokenizer,
        kind,
        template,
        max_turns=config.max_turns,
        max_episode_tokens=config.episode_tokens,
        max_response_tokens=config.max_tool_response_tokens,
        max_positions=min((x for x in limits if x is not None), default=None),
        max_prompt_length=config.max_prompt_length,
        eos=eos,
        turn_sync=_any_rank(accelerator) if accelerator is not None and accelerator.num_processes > 1 else None,
    )


def _check_call_survives_decoding(tokenizer) -> None:
    """A turn is decoded without special tokens before its calls are parsed: a tokenizer that marks <tool_call> as
    special would hide every call from the parser, silently."""
    from gspo.config import ConfigError

    probe = '<tool_call>{"name": "probe", "arguments": {}}</tool_call>'
    text = tokenizer.decode(tokenizer.encode(probe, add_special_tokens=False), skip_special_tokens=True)
    if [c.name for c in parse_hermes(text)] != ["probe"]:
        raise ConfigError(
            f"GSPOConfig.tool_call_parser='hermes' cannot read calls with this tokenizer: {probe!r} decodes to "
            f"{text!r} (special tokens are left out of decoded turns); use a tokenizer where <tool_call> is an "
            "ordinary added token, or name your own parser"
        )


def _any_rank(accelerator):
    import torch

    def any_rank(flag: bool) -> bool:
        return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max").item() > 0

    return any_rank


def read_chat_template(path) -> str:
    return Path(path).expanduser().read_text()
