"""Helpers for the fault and resume tests, and a training script they launch as a subprocess.

As a module (tests import it): `make_model_dir`, `make_dataset`, `make_config`, `digit_reward`,
`params_of`, `read_metrics`, `comparable`.

As a script:
    python tests/fault_worker.py OUTPUT_DIR MODEL_DIR DATA [--steps N] [--save-steps K]
        [--resume latest] [--lora] [--slow SECONDS] [--dump-params FILE] [--hang-at-step K]
        [--reward-timeout S] [--reward-error-policy raise|penalty]
runs a real GSPOTrainer.train() (the same code path users run) so that tests can send it
SIGKILL / SIGTERM / SIGINT at awkward moments. It prints "STEP <n>" after each step's
reward computation, so a test knows when a step is in progress. `--slow` sleeps inside
the reward function, which widens the window in which a signal lands mid-step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Timing keys differ between any two runs; everything else in metrics.jsonl must match on resume.
TIMING_KEYS = ("step_time_s", "tokens_per_s")
TIMING_PREFIXES = ("time/",)

PROMPTS = [f"{a}+{b}=" for a in range(1, 9) for b in range(1, 3)]  # 16 prompts -> 8 steps/epoch at batch 2


def make_model_dir(path) -> str:
    """A freshly initialised tiny Llama + char tokenizer saved to `path` (no warm start: fast)."""
    import torch

    from gspo.tasks.tiny_model import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(
        tok, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4
    )  # small: fast tests
    path = Path(path)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


# Multi-turn episodes on the arithmetic tokenizer: its characters only, prefix-preserving.
EPISODE_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{ m['content'] + '<eos>' }}"
    "{%- else %}{{ m['content'] + '=' }}{%- endif %}{%- endfor %}"
)


def make_episode_model_dir(path, template_path) -> str:
    """make_model_dir's model with every character also ending a turn (a random model seldom writes <eos>, and a
    turn without one ends its episode), and EPISODE_TEMPLATE written to `template_path`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = make_model_dir(Path(path).with_name(Path(path).name + "-base"))
    model, tok = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    model.generation_config.eos_token_id = [tok.eos_token_id] + tok.convert_tokens_to_ids(list("0123456789+-*= "))
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    Path(template_path).write_text(EPISODE_TEMPLATE)
    return str(path)


class TwoTurnEnv:
    """Two model turns: "1" comes back after the first; rewards the digits of each turn."""

    def reset(self, **row):
        self.turns = 0

    def step(self, text):
        self.turns += 1
        return ("1" if self.turns < 2 else None), self.turns >= 2, float(sum(ch.isdigit() for ch in text))


def make_dataset(path, n: int = len(PROMPTS)) -> str:
    """A JSONL of arithmetic prompts with an 'answer' column."""
    rows = [{"prompt": p, "answer": str(eval(p[:-1]))} for p in PROMPTS[:n]]  # noqa: S307 (our own literals)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def digit_reward(completions, **kwargs):
    """Number of digits in the completion: varies within a group, so advantages (and the
    policy gradient) are non-zero even for an untrained model, unlike exact_answer."""
    delay = float(os.environ.get("GSPO_TEST_REWARD_DELAY", "0"))
    if delay:
        time.sleep(delay)
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def make_config(output_dir, model_dir, **overrides):
    from gspo.config import GSPOConfig

    kw = dict(
        policy_model_name=str(model_dir),
        output_dir=str(output_dir),
        batch_size=2,
        group_size=2,
        max_new_tokens=4,
        max_prompt_length=16,
        gspo_epochs=2,
        num_mini_batches=1,
        learning_rate=1e-3,
        kl_coef=0.0,
        adaptive_kl=False,
        progress_bar=False,
        log_completions_steps=0,
        plot_curves=False,  # the end-of-run PNG costs seconds (matplotlib import) and is not what these tests check
        lr_scheduler_type="constant",
        num_epochs=1,
        seed=7,
    )
    kw.update(overrides)
    return GSPOConfig(**kw)


def params_of(model) -> dict:
    """Trainable-or-not parameters of the unwrapped policy, detached copies on CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without timing keys (and without the run-level bookkeeping a resume may add)."""
    out = []
    for r in rows:
        out.append(
            {
                k: v
                for k, v in r.items()
                if k not in TIMING_KEYS and not k.startswith(TIMING_PREFIXES) and not k.startswith("_")
            }
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("output_dir")
    ap.add_argument("model_dir")
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=-1)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--save-steps", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--adaptive-kl", action="store_true")
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--hang-at-step", type=int, default=0, help="the reward never returns at this step")
    ap.add_argument("--reward-timeout", type=float, default=None, help="reward_timeout_s")
    ap.add_argument("--reward-error-policy", default="raise")
    ap.add_argument("--dump-params", default=None)
    ap.add_argument(
        "--slow-save",
        type=float,
        default=0.0,
        help="sleep this long inside each checkpoint save (after the files are written, before "
        "the fsync, marker and rename), so a test can reliably kill the process mid-save",
    )
    args = ap.parse_args(argv)

    import torch

    from gspo.trainer import GSPOTrainer

    torch.set_num_threads(1)
    if args.slow_save:
        import gspo.checkpoint as ckpt

        real_fsync_tree = ckpt._fsync_tree

        def slow_fsync_tree(root):
            time.sleep(args.slow_save)
            real_fsync_tree(root)

        ckpt._fsync_tree = slow_fsync_tree
    extra = {}
    if args.lora:
        extra.update(use_lora=True, lora_target_modules=["q_proj", "v_proj"], lora_r=4, lora_alpha=8)
    if args.adaptive_kl:
        extra.update(kl_coef=0.05, adaptive_kl=True, target_kl=0.001, kl_horizon=100)
    cfg = make_config(
        args.output_dir,
        args.model_dir,
        max_steps=args.steps,
        num_epochs=args.epochs,
        save_steps=args.save_steps,
        resume_from_checkpoint=args.resume,
        reward_error_policy=args.reward_error_policy,
        **({"reward_timeout_s": args.reward_timeout} if args.reward_timeout is not None else {}),
        **extra,
    )

    def reward(completions, **kw):
        out = digit_reward(completions, **kw)
        print(f"STEP {trainer.step + 1}", flush=True)  # a step is in progress now
        if args.slow:
            time.sleep(args.slow)
        if trainer.step + 1 == args.hang_at_step:
            time.sleep(10**6)  # a reward that never returns
        return out

    reward.__name__ = "digit_reward"
    trainer = GSPOTrainer(cfg, reward_funcs=[reward])
    trainer.train(args.data)
    if args.dump_params:
        model = trainer.accelerator.unwrap_model(trainer.model)
        torch.save(params_of(model), args.dump_params)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
