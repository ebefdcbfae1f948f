"""Mixture-of-Experts policies (gspo.moe): routes recorded and replayed through hooks on the routers, the
load-balancing loss over real tokens, expert volatility, and training the transformers MoE models."""

from __future__ import annotations

import fault_worker as fw
import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from gspo.config import ConfigError, GSPOConfig
from gspo.moe import RouterHooks, load_balancing_loss, route_changes
from gspo.trainer import GSPOTrainer

SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
KINDS = {
    "qwen3_moe": lambda v: Qwen3MoeConfig(
        vocab_size=v, intermediate_size=64, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        head_dim=8, max_position_embeddings=64, norm_topk_prob=True, **SHAPE,
    ),
    "mixtral": lambda v: MixtralConfig(
        vocab_size=v, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        **SHAPE,
    ),
    "olmoe": lambda v: OlmoeConfig(
        vocab_size=v, intermediate_size=32, num_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
        **{**SHAPE, "num_key_value_heads": 4},
    ),
    "qwen2_moe": lambda v: Qwen2MoeConfig(  # with its shared expert
        vocab_size=v, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, max_position_embeddings=64, **SHAPE,
    ),
}  # fmt: skip


def moe_model(kind: str, seed: int = 0, **overrides):
    """A random tiny MoE causal LM on the arithmetic tokenizer, routers drawn so that they route (transformers
    initialises some to zero, where every expert ties)."""
    from gspo.tasks.tiny_model import build_tokenizer

    tok = build_tokenizer()
    config = KINDS[kind](len(tok))
    for key, value in overrides.items():
        setattr(config, key, value)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    for router in RouterHooks(model).routers:
        torch.nn.init.normal_(router.weight, std=1.0)
    return model.eval(), tok


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A saved tiny Qwen3-MoE whose config asks for router logits (TRL's setting, which crashed generate)."""
    model, tok = moe_model("qwen3_moe", output_router_logits=True, router_aux_loss_coef=0.01)
    path = tmp_path_factory.mktemp("moe") / "qwen3-moe"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def batch(tok, n=3):
    ids = torch.randint(3, len(tok), (n, 10))
    mask = torch.ones(n, 10, dtype=torch.long)
    mask[0, :4] = 0  # left padding
    return ids, mask


# --- hooks ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_replay_of_the_models_own_routes_changes_nothing(kind):
    model, tok = moe_model(kind)
    hooks = RouterHooks(model)
    ids, mask = batch(tok)
    routes = hooks.buffer(3, 10)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with hooks.tracking(torch.arange(3), record=routes):
            recorded = model(input_ids=ids, attention_mask=mask).logits
        with hooks.tracking(torch.arange(3), replay=routes):
            replayed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, recorded) and torch.equal(plain, replayed)  # exactly: same experts, same scores
    with torch.no_grad():
        logits = []
        handle = hooks.routers[1].register_forward_hook(lambda m, a, out: logits.append(out[0]))
        model(input_ids=ids, attention_mask=mask)
        handle.remove()
    top = torch.softmax(logits[0].float(), -1).topk(2, dim=-1).indices.view(3, 10, 2)
    assert torch.equal(routes[:, 1].long(), top)  # layer 1's recorded experts are its router's top-2


def test_a_replayed_pass_uses_the_old_experts_and_the_gate_still_learns():
    model, tok = moe_model("qwen3_moe")
    hooks = RouterHooks(model)
    ids, mask = batch(tok)
    old = hooks.buffer(3, 10)
    with torch.no_grad(), hooks.tracking(torch.arange(3), record=old):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad():  # new router weights: most tokens would now pick other experts
        for router in hooks.routers:
            router.weight.copy_(torch.randn_like(router.weight))
    used = []
    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_hook(lambda m, args, out: used.append(args[1].detach().clone()))
    own = hooks.buffer(3, 10)
    model.train()
    with hooks.tracking(torch.arange(3), record=own, replay=old):
        out = model(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    assert not torch.equal(own[:, 0], old[:, 0])  # the router's own choice moved ...
    assert torch.equal(used[0].view(3, 10, 2).to(torch.int16), old[:, 0])  # ... but the experts ran pi_old's
    out[mask.bool()].logsumexp(-1).sum().backward()
    gate = hooks.routers[0].weight.grad
    assert gate is not None and gate.abs().sum() > 0  # only which experts is replayed: the gate's weights are live


# --- the load-balancing loss -----------------------------------------------------------------
def test_the_load_balancing_loss_counts_real_tokens_only():
    model, tok = moe_model("mixtral")
    hooks = RouterHooks(model)
    ids, mask = batch(tok)
    with hooks.tracking(torch.arange(3), aux=True) as logits:  # kept with grad only: a training forward
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    theirs = load_balancing_loss_func(out.router_logits, 8, 2, mask)
    assert load_balancing_loss(logits, mask, 2).item() == pytest.approx(theirs.item(), rel=1e-5)
    # the same rows with two rows of pure padding added: the loss over real tokens does not move
    padded_ids, padded_mask = torch.cat([ids, ids[:2]]), torch.cat([mask, torch.zeros(2, 10, dtype=torch.long)])
    with hooks.tracking(torch.arange(5), aux=True) as more:
        model(input_ids=padded_ids, attention_mask=padded_mask)
    with torch.no_grad(), hooks.tracking(torch.arange(3), aux=True) as none:
        model(input_ids=ids, attention_mask=mask)
    assert none == []  # a no-grad pass keeps no logits: rollouts and no-grad passes add no aux loss
    assert load_balancing_loss(more, padded_mask, 2).item() == pytest.approx(theirs.item(), rel=1e-5)
    # by hand, one layer, 2 tokens, 2 experts, top-1: f = (1/2, 1/2), P = (0.5 * (0.73 + 0.27), same) -> 2 * 0.5
    hand = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert load_balancing_loss([hand], torch.ones(1, 2), 1).item() == pytest.approx(1.0)


# --- expert volatility ----------------------------------------------------------------------
def test_route_changes_count_changed_choices_as_sets_over_the_masked_tokens():
    old = torch.tensor([[[[0, 1], [2, 3], [4, 5]]]])  # 1 row, 1 layer, 3 tokens, k = 2
    new = torch.tensor([[[[1, 0], [2, 6], [7, 6]]]])  # token 0: same set; token 1: one changed; token 2: both
    assert route_changes(old, new, torch.ones(1, 3)).tolist() == [[3.0, 6.0]]  # (0 + 1 + 2) of 3 x 2
    assert route_changes(old, new, torch.tensor([[1, 1, 0]])).tolist() == [[1.0, 4.0]]  # token 2 not counted


def test_a_known_number_of_choices_flip_on_a_one_layer_model():
    """Swap expert 0's and expert 1's router rows: a token whose top-2 holds exactly one of them changes one
    choice, one holding both or neither changes none; the count is worked out from the recorded routes."""
    model, tok = moe_model("qwen3_moe", num_hidden_layers=1)
    hooks = RouterHooks(model)
    ids, mask = batch(tok)
    before, after = hooks.buffer(3, 10), hooks.buffer(3, 10)
    with torch.no_grad():
        with hooks.tracking(torch.arange(3), record=before):
            model(input_ids=ids, attention_mask=mask)
        weight = hooks.routers[0].weight
        weight[[0, 1]] = weight[[1, 0]].clone()
        with hooks.tracking(torch.arange(3), record=after):
            model(input_ids=ids, attention_mask=mask)
    has = lambda e: (before == e).any(dim=-1)  # noqa: E731  [3, 1, 10]
    expected = ((has(0) ^ has(1)) & mask.bool()[:, None]).sum().item()  # one of the two: one choice flips
    assert expected > 0
    changed, total = route_changes(before, after, mask)[0].tolist()
    assert changed == expected and total == 2 * mask.sum().item()


# --- training -----------------------------------------------------------------------------------
def moe_config(model_dir, out, **overrides):
    return fw.make_config(out, model_dir, max_steps=2, gspo_epochs=2, **overrides)


def train(model_dir, out, **overrides):
    data = fw.make_dataset(out.parent / f"{out.name}-data.jsonl")
    trainer = GSPOTrainer(moe_config(model_dir, out, **overrides), reward_funcs=[fw.digit_reward])
    return trainer, trainer.train(data)


def test_an_moe_policy_with_router_logits_on_trains_with_the_aux_loss_and_volatility(moe_dir, tmp_path):
    trainer, history = train(moe_dir, tmp_path / "run")
    assert trainer.model.config.output_router_logits is False  # gspo computes the loss itself
    last = history[-1]
    assert last["moe/aux_loss"] > 0  # the model's own router_aux_loss_coef, 0.01, is in force
    assert 0.0 <= last["moe/expert_change_fraction"] <= 1.0  # epoch 2 against epoch 1's routes
    layers = [last[f"moe/expert_change_fraction/layer_{i}"] for i in range(2)]
    assert last["moe/expert_change_fraction"] == pytest.approx(sum(layers) / 2)  # equal token counts per layer
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_no_aux_loss_at_coefficient_zero_and_replay_on_grpo(moe_dir, tmp_path):
    _, history = train(moe_dir, tmp_path / "off", router_aux_loss_coef=0.0)
    assert "moe/aux_loss" not in history[-1]
    _, replayed = train(
        moe_dir,
        tmp_path / "replay",
        importance_sampling_level="token",
        routing_replay="old",
        num_mini_batches=2,  # pi_old from the producer's no-grad pass
    )
    assert replayed[-1]["moe/routes_buffer_mb"] > 0 and "moe/expert_change_fraction" in replayed[-1]


def test_lora_on_an_moe_policy_trains(moe_dir, tmp_path):
    trainer, history = train(moe_dir, tmp_path / "lora", use_lora=True, lora_r=4, lora_alpha=8)
    layer0 = {
        n.split(".layers.0.")[1].split(".lora_A")[0]
        for n, _ in trainer.model.named_parameters()
        if "lora_A" in n and ".layers.0." in n
    }
    # peft's all-linear on transformers' MoE: the attention projections, the router and the experts' 3-D weights
    assert layer0 == {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
        "mlp.gate",
        "mlp.experts",
        "mlp.experts.base_layer",
    }
    assert "moe/expert_change_fraction" in history[-1] and history[-1]["moe/aux_loss"] > 0  # the hooks still fire


def test_replay_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="not with gradient_checkpointing"):
        GSPOConfig(routing_replay="old", gradient_checkpointing=True)
    model_dir = fw.make_model_dir(tmp_path / "dense")
    with pytest.raises(ConfigError, match="has no MoE router to replay"):
        GSPOTrainer(fw.make_config(tmp_path / "run", model_dir, routing_replay="old"), reward_funcs=[fw.digit_reward])


def test_the_builtin_moe_model_is_the_demo_model_with_moe_layers(tmp_path):
    from gspo.moe import find_routers
    from gspo.tasks.tiny_model import MODEL_KWARGS, ensure_tiny_model, model_dir_name

    path = ensure_tiny_model(cache_dir=tmp_path, sft_steps=2, moe=True, verbose=False)  # the recipe, 2 SFT steps
    assert path.name == model_dir_name(sft_steps=2, moe=True) == "tiny-arithmetic-moe-v5-sft2"
    model = AutoModelForCausalLM.from_pretrained(path)
    routers = find_routers(model)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and len(routers) == MODEL_KWARGS["num_hidden_layers"]
    assert (routers[0].num_experts, routers[0].top_k) == (8, 2)
    assert model.config.hidden_size == MODEL_KWARGS["hidden_size"]
    assert GSPOConfig(policy_model_name="builtin:tiny-arithmetic-moe").policy_model_name.endswith("-moe")


def test_the_hf_engine_records_the_experts_it_sampled_with():
    """R3: the experts chosen while generating (the prefill, then one token per step) are those a full forward
    over the finished sequences chooses, position by position; the last completion token is sampled, never fed
    back, so its route is -1 (replay keeps the router's own there)."""
    from gspo.engines import SamplingParams, TransformersEngine

    model, tok = moe_model("qwen3_moe")
    hooks = RouterHooks(model)
    rows = [{"prompt": p, "prompt_ids": tok(p)["input_ids"]} for p in ("1+2=", "13+45=")]
    rollout = TransformersEngine(model, tok, routes=hooks).generate(
        rows, group_size=2, sampling=SamplingParams(max_new_tokens=5)
    )
    routes = rollout.engine_routes
    width = rollout.prompt_ids.shape[1] + rollout.completion_ids.shape[1]
    assert routes.shape == (4, 2, width, 2)
    assert (routes[:, :, -1] == -1).all() and (routes[:, :, :-1] >= 0).all()
    full = hooks.buffer(4, width)
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask, torch.ones_like(rollout.completion_ids)], dim=1)  # as generate saw them
    with torch.no_grad(), hooks.tracking(torch.arange(4), record=full):
        model(input_ids=ids, attention_mask=mask)
    real = mask.bool()[:, None, :-1, None].expand(-1, 2, -1, 2)
    same = (routes[:, :, :-1] == full[:, :, :-1])[real].float().mean().item()
    assert same == 1.0  # the cached, step-by-step forwards route like the full one here (fp32, CPU)


def test_grpo_with_rollout_replay_trains(moe_dir, tmp_path):
    trainer, history = train(moe_dir, tmp_path / "r3", importance_sampling_level="token", routing_replay="rollout")
    assert trainer.step == 2 and "moe/expert_change_fraction" in history[-1]
    with pytest.raises(ConfigError, match="routing_replay='rollout' is not allowed: R3 needs"):
        GSPOConfig(routing_replay="rollout", rollout_engine="vllm")
