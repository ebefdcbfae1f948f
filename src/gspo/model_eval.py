"""`gspo eval` as a function: load a model from the config, decode a dataset greedily, score it.

Apart from gspo.evaluate (engine + scorer + rows -> metrics, loads nothing) because loading goes through
gspo.models, which builds the demo model, whose warm start evaluates through gspo.evaluate.
"""

from __future__ import annotations

from accelerate import PartialState

from gspo.backends import destroy_process_group_at_exit
from gspo.data import as_dataset
from gspo.engines import TransformersEngine
from gspo.episodes import episode_engine, read_chat_template, resolve_episode
from gspo.evaluate import evaluate_as_configured
from gspo.models import autocast, load_causal_lm, load_tokenizer, mixed_precision_mode, set_threads
from gspo.preflight import check_lengths
from gspo.rewards import RewardModelScorer, RewardScorer
from gspo.rollout import eos_ids


def evaluate_model(config, dataset, *, reward_funcs=(), model=None, tokenizer=None, records: bool = False):
    """`gspo eval`: load config.policy_model_name (or take `model`), decode `dataset` (greedily, or
    eval_num_samples sampled completions per prompt) and score it with the config's rewards. Builds no optimizer
    and no reference model; under a launcher each process decodes its shard and every process returns the
    gathered metrics, and with `records` also the per-sample records: (metrics, records)."""
    set_threads(config)
    state = PartialState()
    if state.num_processes > 1:
        destroy_process_group_at_exit()
    tokenizer = (
        tokenizer if tokenizer is not None else load_tokenizer(config.policy_model_name, config.trust_remote_code)
    )
    model = (model if model is not None else load_causal_lm(config.policy_model_name, config)).to(state.device).eval()
    reward_model = (
        RewardModelScorer(config.reward_model_name, device=state.device, trust_remote_code=config.trust_remote_code)
        if config.reward_model_name
        else None
    )
    if config.chat_template is not None:
        tokenizer.chat_template = read_chat_template(config.chat_template)
    tools, environment = resolve_episode(config)  # multi-turn episodes, as in training
    scorer = RewardScorer.from_config(config, list(reward_funcs), reward_model, environment=environment is not None)
    dataset = as_dataset(dataset, tokenizer, config)
    check_lengths(config, model, dataset, completion_tokens=config.max_new_tokens)
    mode = mixed_precision_mode(config, deepspeed=False)
    engine = TransformersEngine(model, tokenizer, precision_context=lambda: autocast(state.device, mode))
    engine = episode_engine(
        config, engine, tokenizer, model, tools=tools, environment=environment, eos=eos_ids(model, tokenizer)
    )
    metrics, rows = evaluate_as_configured(
        engine, scorer, dataset, config, rank=state.process_index, world_size=state.num_processes
    )
    return (metrics, rows) if records else metrics
