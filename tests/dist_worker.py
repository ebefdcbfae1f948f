"""Worker script for tests/test_distributed.py (not a test module itself).

Run it with plain `python` (one process) or under a launcher (`torchrun --nproc_per_node 2`,
`accelerate launch --num_processes 2 --cpu`): it trains GSPOTrainer for a few steps on a
tiny model and writes, per rank, `<out>/<scenario>/rank<R>.json` (metric history, kl_coef
trajectory) and `<out>/<scenario>/params_rank<R>.pt` (final parameters).

Rollouts are made world-size independent on purpose: the trainer is given a `DeterministicEngine`
(GSPOTrainer(rollout_engine=...)), whose completions depend only on the prompt's token ids
and the completion's index in its group (a torch.Generator seeded from a hash of both), not
on any process-wide RNG stream. Completion lengths vary (1..max_new_tokens, EOS-terminated),
so ranks see unequal token counts, which is what the global token normaliser must handle.
Everything after generation (rewards, advantages, reference/old log-probs, losses,
gradients, the optimizer, the KL controller) is the real trainer code.

Scenarios (comma-separated in --scenarios):
  seq_offpolicy  GSPO (level sequence), gspo_epochs=2, num_mini_batches=2, adaptive KL
  token_mean     level token, loss_aggregation token-mean, gradient_accumulation_steps=2, adaptive KL
  uneven         2 prompts x 2 completions in 4 mini-batches of 1 sequence: every mini-batch leaves one
                 rank with an empty share (it must still join the gradient all-reduce)
  resume         seq_offpolicy split as 2 steps + checkpoint, then a fresh trainer resuming to step 3
  fail_rank1     a reward function that raises on rank 1 only
  bf16_offpolicy seq_offpolicy under mixed_precision='bf16' (fsdp_bf16: the same with fsdp=True)
  fsdp_offpolicy, fsdp_token, fsdp_resume
                 seq_offpolicy / token_mean / resume with fsdp=True (FSDP2 shards; a no-op in one process)
  fsdp_ckpt      fsdp_offpolicy with gradient_checkpointing (layers recomputed, output head chunked by 5
                 tokens and recomputed in backward inside FSDP's backward)
  fsdp_sampled   fsdp=True with the REAL generate_rollout (weights gathered for sampling), a greedy
                 evaluation every step (5 prompts in batches of 2: rank 0 runs 2 batches, rank 1 one)
                 and the final export; not comparable to one process (each rank samples from its own
                 RNG stream), so it checks that ranks agree and the export is whole
  fsdp_from_plain_ckpt   fsdp=True resuming step 3 from the 'resume' scenario's step-2 checkpoint (written
                 without fsdp: optimizer state by index); run it after 'resume'
  plain_from_ckpt        fsdp=False resuming step 3 from --resume_from (e.g. an fsdp checkpoint: by name)
  accelerate_fsdp        seq_offpolicy with fsdp=False, for `accelerate launch --config_file
                 examples/accelerate/fsdp.yaml`: the sharding must come from the launch config
  dynamic        dynamic_sampling on a reward whose groups have zero spread for half the prompts, truncated
                 completions masked: ranks refill their own shares and must still take the same steps
  episodes, fsdp_episodes, zero3_episodes
                 multi-turn episodes (an environment, the real generate_rollout) where rank 0's episodes end after
                 1 turn and rank 1's after 3: no rank may wait on another's turns
  lora, fsdp_lora, fsdp_lora_resume
                 LoRA (q/v/gate projections, merged on export) in one process, under FSDP2, and resumed
                 under FSDP2 from its step-2 adapter checkpoint
  zero2_*, zero3_*  under `accelerate launch --config_file examples/accelerate/deepspeed_zero{2,3}.yaml`:
                 offpolicy / token / resume / lora as above, sampled (real sampling, evaluation, export),
                 nan (rank 0's loss and gradient are NaN at step 2, the other rank's finite: every rank must
                 skip that update; 'nan' is its 1-process twin), fail_rank1, and zero3_rm (a reward model beside the
                 reward function: it must be loaded whole, not partitioned; 'rm' is its twin)
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from gspo.backends.fsdp import is_sharded  # noqa: E402
from gspo.engines import RolloutEngine  # noqa: E402
from gspo.rewards import RewardError  # noqa: E402

torch.set_num_threads(1)  # two ranks share two cores; oversubscription only slows things down
if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
    # DeepSpeed's CPU-only shared-memory collective is JIT-compiled with g++ on first use (~90 s);
    # plain gloo does the same job here. GPU users never build it.
    import deepspeed.ops  # noqa: E402

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

PROMPTS = [
    f"{a}+{b}="
    for a, b in [
        (1, 2),
        (3, 4),
        (12, 7),
        (5, 5),
        (9, 0),
        (23, 41),
        (6, 8),
        (70, 3),
        (2, 2),
        (11, 11),
        (4, 9),
        (8, 1),
        (31, 5),
        (7, 7),
        (15, 6),
        (3, 30),
    ]
]
STEPS = 3


class DeterministicEngine(RolloutEngine):
    """A rollout engine whose completions are a pure function of (prompt ids, index in group):
    identical whether the prompt is handled by rank 0, rank 1 or a single process. Same Rollout
    layout and masking as the real engine. Records each rollout's completion-token count."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.local_tokens = tokenizer, []

    def generate(self, rows, *, group_size, sampling):
        from gspo.rollout import assemble_rollout, left_pad

        tok, new = self.tokenizer, sampling.max_new_tokens
        eos = [tok.eos_token_id]
        digits = tok.convert_tokens_to_ids(list("0123456789"))
        prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], tok.pad_token_id)
        completions = []
        for r in rows:
            for j in range(group_size):
                key = hashlib.sha256(f"{r['prompt_ids']}|{j}".encode()).digest()
                g = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
                length = int(torch.randint(1, new + 1, (1,), generator=g))
                ids = [digits[int(i)] for i in torch.randint(0, 10, (new,), generator=g)]
                if length < new:
                    ids[length - 1] = eos[0]  # EOS-terminated: `length` tokens count, the rest is padding
                completions.append(ids)
        rollout = assemble_rollout(
            tok,
            rows,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=torch.tensor(completions, dtype=torch.long),
            group_size=group_size,
            eos=eos,
            pad_id=tok.pad_token_id,
        )
        self.local_tokens.append(int(rollout.completion_mask.sum()))
        return rollout


def digit_reward(prompts, completions, **kwargs):
    """Deterministic, varied within a group: the digit sum of the completion / 10."""
    return [sum(int(c) for c in text if c.isdigit()) / 10.0 for text in completions]


def half_flat_reward(prompts, completions, **kwargs):
    """digit_reward for prompts whose first operand is odd; 1.0 for every completion of the others, so their
    groups have zero spread and dynamic sampling drops them."""
    return [digit_reward([p], [c])[0] if int(p.split("+")[0]) % 2 else 1.0 for p, c in zip(prompts, completions)]


def fails_on_rank1(prompts, completions, **kwargs):
    if os.environ.get("RANK", "0") == "1":
        raise ValueError("deliberate failure on rank 1 (dist_worker)")
    return digit_reward(prompts, completions)


SCENARIOS = {
    "seq_offpolicy": dict(importance_sampling_level="sequence", gspo_epochs=2, num_mini_batches=2),
    "token_mean": dict(
        importance_sampling_level="token",
        loss_aggregation="token-mean",
        gspo_epochs=2,
        gradient_accumulation_steps=2,
        lr_scheduler_type="linear",
        warmup_steps=1,
    ),
    "uneven": dict(importance_sampling_level="sequence", batch_size=2, group_size=2, gspo_epochs=1, num_mini_batches=4),
    "fail_rank1": dict(importance_sampling_level="sequence", gspo_epochs=1),
    # PPO / VAPO: a critic (second trained model), length-adaptive GAE, positive-example NLL, KL in the reward
    "gae": dict(
        importance_sampling_level="token",
        advantage_estimator="gae",
        gae_lambda="adaptive",
        length_adaptive_alpha=0.5,
        positive_nll_coef=0.1,
        positive_reward_threshold=2.0,
        kl_in_reward=True,
        value_clip_range=1e-3,  # most tokens clip after the first update: none sit at the clip boundary
        gspo_epochs=2,
        num_mini_batches=2,
        gradient_accumulation_steps=2,
    ),
}


SCENARIOS.update(
    bf16_offpolicy=dict(SCENARIOS["seq_offpolicy"], mixed_precision="bf16"),
    fsdp_bf16=dict(SCENARIOS["seq_offpolicy"], mixed_precision="bf16", fsdp=True),
    fsdp_offpolicy=dict(SCENARIOS["seq_offpolicy"], fsdp=True),
    fsdp_token=dict(SCENARIOS["token_mean"], fsdp=True),
    fsdp_gae=dict(SCENARIOS["gae"], fsdp=True),
    fsdp_resume=dict(SCENARIOS["seq_offpolicy"], fsdp=True),
    fsdp_ckpt=dict(SCENARIOS["seq_offpolicy"], fsdp=True, gradient_checkpointing=True, entropy_chunk_size=5),
    lora=dict(
        SCENARIOS["seq_offpolicy"],
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        lora_target_modules=["q_proj", "v_proj", "gate_proj"],
        merge_lora_on_save=True,
    ),
    fsdp_lora=dict(
        SCENARIOS["seq_offpolicy"],
        fsdp=True,
        use_lora=True,
        lora_r=4,
        lora_alpha=8,
        learning_rate=1e-2,
        lora_target_modules=["q_proj", "v_proj", "gate_proj"],
        merge_lora_on_save=True,
    ),
    fsdp_sampled=dict(SCENARIOS["seq_offpolicy"], fsdp=True, eval_steps=1, eval_max_samples=5, eval_batch_size=2),
)
# DAPO dynamic sampling: half the prompts give zero-spread groups; each rank refills its own share
SCENARIOS["dynamic"] = dict(
    SCENARIOS["seq_offpolicy"], dynamic_sampling=True, dynamic_sampling_max_rounds=3, mask_truncated_completions=True
)
# Multi-turn episodes with the REAL generate_rollout: rank 0's episodes end after 1 turn, rank 1's after 3
# (UnevenEnv); ranks must not wait on each other's turns (fsdp_episodes: the weights are gathered once).
# An MoE policy (model_dir-moe: a tiny Qwen3-MoE), GRPO with Routing Replay and the volatility metric; the aux loss
# is off here: it is a per-micro-batch statistic, so data parallelism changes it (docs/moe.md)
SCENARIOS["moe"] = dict(
    SCENARIOS["seq_offpolicy"], importance_sampling_level="token", routing_replay="old", router_aux_loss_coef=0.0
)
SCENARIOS["fsdp_moe"] = dict(SCENARIOS["moe"], fsdp=True)
MOE = ("moe", "fsdp_moe")
SCENARIOS["episodes"] = dict(SCENARIOS["seq_offpolicy"], max_turns=3, max_new_tokens=2, max_episode_tokens=12)
SCENARIOS["fsdp_episodes"] = dict(SCENARIOS["episodes"], fsdp=True)
SCENARIOS["zero3_episodes"] = SCENARIOS["episodes"]
SCENARIOS.update(accelerate_fsdp=SCENARIOS["seq_offpolicy"])  # fsdp=False: sharding comes from the launch config
SCENARIOS.update(
    resume=SCENARIOS["seq_offpolicy"],
    fsdp_from_plain_ckpt=SCENARIOS["fsdp_offpolicy"],
    plain_from_ckpt=SCENARIOS["seq_offpolicy"],
)
SCENARIOS.update(fsdp_lora_resume=SCENARIOS["fsdp_lora"], fsdp_fail_rank1=dict(SCENARIOS["fail_rank1"], fsdp=True))
SCENARIOS.update(fsdp_gae_resume=SCENARIOS["fsdp_gae"])  # the critic's sharded state through a checkpoint
# DeepSpeed: launched with `accelerate launch --config_file examples/accelerate/deepspeed_zero{2,3}.yaml`;
# the ZeRO stage comes from the launch, these are the GSPO settings.
for _zero in ("zero2", "zero3"):
    SCENARIOS.update(
        {
            f"{_zero}_offpolicy": SCENARIOS["seq_offpolicy"],
            f"{_zero}_token": SCENARIOS["token_mean"],
            f"{_zero}_resume": SCENARIOS["seq_offpolicy"],
            f"{_zero}_lora": SCENARIOS["lora"],
            f"{_zero}_sampled": dict(SCENARIOS["seq_offpolicy"], eval_steps=1, eval_max_samples=5, eval_batch_size=2),
            f"{_zero}_nan": dict(SCENARIOS["seq_offpolicy"], gspo_epochs=1, num_mini_batches=1),
            f"{_zero}_fail_rank1": SCENARIOS["fail_rank1"],
            f"{_zero}_gae": SCENARIOS["gae"],  # the critic as a second DeepSpeed engine
            f"{_zero}_gae_resume": SCENARIOS["gae"],
        }
    )
SCENARIOS["nan"] = SCENARIOS["zero2_nan"]  # the 1-process twin
# A reward model (--reward_model, built by the test) next to the digit reward: under ZeRO-3 it must stay whole.
SCENARIOS["rm"] = SCENARIOS["zero3_rm"] = dict(
    SCENARIOS["seq_offpolicy"], gspo_epochs=1, num_mini_batches=1, reward_model_weight=0.5
)
RESUMES = {
    "resume": "seq_offpolicy",
    "fsdp_resume": "fsdp_offpolicy",
    "fsdp_lora_resume": "fsdp_lora",
    "fsdp_gae_resume": "fsdp_gae",
    "zero2_resume": "zero2_offpolicy",
    "zero3_resume": "zero3_offpolicy",
    "zero2_gae_resume": "zero2_gae",
    "zero3_gae_resume": "zero3_gae",
}
SAMPLED = ("fsdp_sampled", "zero2_sampled", "zero3_sampled")
EPISODES = ("episodes", "fsdp_episodes", "zero3_episodes")
# The episodes' chat template for the arithmetic tokenizer (its characters only): a message's content, then
# "=" after a user message and <eos> after the model's; prefix-preserving.
EPISODE_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{ m['content'] + '<eos>' }}"
    "{%- else %}{{ m['content'] + '=' }}{%- endif %}{%- endfor %}"
)


class UnevenEnv:
    """Rank 0's episodes end after 1 model turn, rank 1's after 3; the observation is "1", the reward the
    turn's digit sum / 10. Records each episode's turns in `turns` (this process's)."""

    turns: list = []

    def reset(self, **row):
        self.left = 1 if os.environ.get("RANK", "0") == "0" else 3
        self.count = 0
        return None

    def step(self, text):
        self.count += 1
        done = self.count >= self.left
        if done:
            UnevenEnv.turns.append(self.count)
        return (None if done else "1"), done, sum(int(c) for c in text if c.isdigit()) / 10.0


def make_config(model_dir: str, output_dir: Path, scenario: str, **overrides):
    from gspo.config import GSPOConfig

    base = SCENARIOS[scenario]
    settings = dict(
        policy_model_name=model_dir,
        batch_size=4,
        group_size=4,
        max_new_tokens=4,
        max_steps=STEPS,
        learning_rate=1e-3,
        seed=7,
        kl_coef=0.1,
        adaptive_kl=True,
        target_kl=0.3,
        kl_horizon=100,
        entropy_coef=0.01,
        output_dir=str(output_dir),
        progress_bar=False,
        log_completions_steps=0,
        report_to=["jsonl"],
    )
    settings.update(base)
    settings.update(overrides)
    return GSPOConfig(**settings)


def run(model_dir: str, out: Path, scenario: str, resume_from: str = "", reward_model: str = "") -> None:
    from gspo.models import load_tokenizer
    from gspo.trainer import GSPOTrainer

    engine = None if scenario in SAMPLED + EPISODES else DeterministicEngine(load_tokenizer(model_dir))
    out_dir = out / scenario
    episodes = {}
    if scenario in MOE:
        model_dir = model_dir + "-moe"
    if scenario in EPISODES:  # every token ends a turn, so that a random model's turns end (model_dir-episodes)
        model_dir = model_dir + "-episodes"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "template.jinja").write_text(EPISODE_TEMPLATE)
        episodes = dict(environment=UnevenEnv)
        UnevenEnv.turns = []  # this scenario's episodes only (scenarios run one after another in a process)

    def trainer_for(reward_fn=None, **config):
        if episodes:
            config["chat_template"] = str(out_dir / "template.jinja")
        return GSPOTrainer(
            make_config(model_dir, out_dir, scenario, **config),
            reward_funcs=[] if episodes else [reward_fn or reward],
            rollout_engine=engine,
            **episodes,
        )

    reward = fails_on_rank1 if scenario.endswith("fail_rank1") else digit_reward
    reward = half_flat_reward if scenario == "dynamic" else reward
    rows = [{"prompt": p} for p in PROMPTS]
    if scenario in RESUMES:  # 2 steps with a checkpoint, then a fresh trainer resumes and runs step 3
        _train_until(trainer_for, reward, rows, stop_after=2)
        trainer = trainer_for(resume_from_checkpoint="latest")
    elif scenario in ("fsdp_from_plain_ckpt", "plain_from_ckpt"):
        source = str(out / "resume" / "checkpoint-2") if scenario == "fsdp_from_plain_ckpt" else resume_from
        trainer = trainer_for(resume_from_checkpoint=source)
    else:
        trainer = trainer_for(**({"reward_model_name": reward_model} if scenario.endswith("rm") else {}))
    if scenario == "nan" or scenario.endswith("_nan"):
        _nan_update_at_step(trainer.policy.unwrapped(), 2, rank=trainer.accelerator.process_index)
    history = trainer.train(rows, eval_dataset=rows if scenario in SAMPLED else None)
    acc = trainer.accelerator
    rank = acc.process_index
    params = full_params(trainer.policy.unwrapped())
    torch.save(params, out_dir / f"params_rank{rank}.pt")
    (out_dir / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "world": acc.num_processes,
                "rank": rank,
                "distributed_type": str(acc.distributed_type),
                "backend": trainer.backend.name,
                "zero_stage": getattr(trainer.backend, "stage", -1),
                "history": history,
                "final_kl_coef": trainer.kl_ctl.value,
                "start_step": history[0]["step"] - 1,
                "local_tokens": engine.local_tokens if engine is not None else [],
                "local_turns": UnevenEnv.turns,
                **shard_info(trainer.policy.unwrapped()),
                "ref_sharded": trainer.ref_model is not None
                and (
                    is_sharded(trainer.ref_model)
                    or any(hasattr(p, "ds_tensor") for p in trainer.ref_model.parameters())
                ),
            }
        )
    )


def _nan_update_at_step(model, step: int, rank: int) -> None:
    """Rank 0's update of `step` (1-based; one update per step here) gets NaN hidden states before the output
    head, so its loss and gradient are NaN while the other rank's are finite: every rank must skip that update.
    PyTorch forward hooks on the policy; nothing in gspo is patched."""
    calls = {"n": 0}

    def count(module, args):
        calls["n"] += torch.is_grad_enabled()

    def poison(module, args):
        if rank == 0 and torch.is_grad_enabled() and calls["n"] == step:
            return (args[0] * float("nan"),) + tuple(args[1:])
        return None

    model.register_forward_pre_hook(count)
    model.get_output_embeddings().register_forward_pre_hook(poison)


def shard_info(model) -> dict:
    """How many parameter elements this rank stores, against the model's full count."""
    params = list(model.parameters())
    zero3 = any(hasattr(p, "ds_tensor") for p in params)
    local = sum(
        p.ds_tensor.numel() if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p).numel()
        for p in params
    )
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return {"sharded": is_sharded(model) or zero3, "local_numel": local, "full_numel": full}


def _zero3_params(model) -> dict:
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {k: v.detach().cpu().clone() for k, v in params.items()}


def full_params(model) -> dict:
    """Every parameter whole, on every rank (FSDP2: all-gathered, so each rank can be compared)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if any(hasattr(p, "ds_id") for p in model.parameters()):  # DeepSpeed ZeRO-3 partitions
        return _zero3_params(model)
    state = (
        get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if is_sharded(model)
        else model.state_dict()
    )
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _train_until(make_trainer, reward, rows, stop_after: int) -> None:
    """Run the real train() but crash (an exception from the reward function) in step `stop_after + 1`,
    after step `stop_after`'s checkpoint."""
    calls = {"n": 0}

    @functools.wraps(reward)
    def crashing(prompts, completions, **kwargs):
        calls["n"] += 1  # once per step (no evaluation in these scenarios)
        if calls["n"] > stop_after:
            raise RuntimeError("simulated crash")
        return reward(prompts, completions, **kwargs)

    try:
        make_trainer(crashing, max_steps=STEPS, save_steps=2).train(rows)
    except RewardError:
        pass


def build_model_dir(path: Path) -> str:
    from transformers import AutoModelForCausalLM

    from gspo.tasks.tiny_model import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    build_model(
        tok, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4
    ).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)  # the same weights; every token ends a turn (never cut)
    model.generation_config.eos_token_id = [tok.eos_token_id] + tok.convert_tokens_to_ids(
        list("0123456789+-*= ") + ["<bos>", "<unk>"]
    )
    model.save_pretrained(f"{path}-episodes", safe_serialization=True)
    tok.save_pretrained(f"{path}-episodes")
    build_moe_model_dir(f"{path}-moe", tok)
    return str(path)


def build_moe_model_dir(path, tok) -> None:
    """A tiny Qwen3-MoE (2 layers, 8 experts, top-2) on the same tokenizer, its routers drawn so that they route."""
    from gspo.moe import find_routers
    from gspo.tasks.tiny_model import build_moe_model

    torch.manual_seed(1)
    model = build_moe_model(
        tok, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
    )  # fmt: skip
    for router in find_routers(model):
        torch.nn.init.normal_(router.weight, std=1.0)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", help="tiny model directory (built here with --build_model)")
    parser.add_argument("--build_model", action="store_true")
    parser.add_argument("--out", required=False)
    parser.add_argument("--scenarios", default="seq_offpolicy,token_mean")
    parser.add_argument("--resume_from", default="", help="checkpoint for the plain_from_ckpt scenario")
    parser.add_argument("--reward_model", default="", help="reward model directory for the *rm scenarios")
    args = parser.parse_args(argv)
    if args.build_model:
        build_model_dir(Path(args.model_dir))
        return 0
    for scenario in args.scenarios.split(","):
        run(args.model_dir, Path(args.out), scenario, args.resume_from, args.reward_model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
