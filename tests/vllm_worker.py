"""One rank of a 2-process run with a vLLM engine per rank, launched by test_vllm_distributed.py: under
torchrun as DDP (`--backend ddp`), FSDP2 (`fsdp2`) or FSDP2 with LoRA (`fsdp2_lora`), or under `accelerate
launch` with the DeepSpeed ZeRO-3 example config (`zero3`). Trains a few steps, then writes its whole
parameters (gathered one at a time, as the engine sync gathers them), its metrics and what it sampled to
--out/rank{r}.pt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def main(argv=None) -> int:
    from gspo.config import GSPOConfig
    from gspo.tasks.arithmetic import make_problems
    from gspo.trainer import GSPOTrainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--backend", choices=("ddp", "fsdp2", "zero3", "fsdp2_lora"), default="ddp")
    args = parser.parse_args(argv)
    cfg = GSPOConfig(
        policy_model_name=args.model_dir,
        rollout_engine="vllm",
        fsdp=args.backend.startswith("fsdp2"),
        use_lora=args.backend.endswith("lora"),
        lora_r=4,
        reward_funcs=[],
        batch_size=2,
        group_size=4,
        max_new_tokens=6,
        max_prompt_length=16,
        max_steps=2,
        learning_rate=3e-3,
        kl_coef=0.0,
        adaptive_kl=False,
        entropy_coef=0.0,
        temperature=0.8,
        output_dir=str(Path(args.out) / "run"),
        progress_bar=False,
        log_completions_steps=0,
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    history = trainer.train(make_problems(n=32, seed=0, split="train"))
    rank = trainer.accelerator.process_index
    rows = [trainer._as_dataset(make_problems(n=2, seed=rank + 1, split="train"))[i] for i in range(2)]
    rollout = trainer.engine.generate(rows, group_size=2, sampling=trainer.sampling)
    params = {k: v.detach().cpu().clone() for k, v in trainer.policy.whole_parameters()}  # collective
    torch.save(
        {"params": params, "history": history, "completions": rollout.completion_id_lists},
        Path(args.out) / f"rank{rank}.pt",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
