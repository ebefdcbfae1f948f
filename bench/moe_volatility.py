#!/usr/bin/env python
"""Expert volatility on a tiny MoE policy at the paper's off-policy setting (GSPO §5.1/§5.3: each rollout batch
split into 4 mini-batches, so 3 of the 4 updates use a rollout sampled by older weights).

    .venv/bin/python bench/moe_volatility.py                # 20 steps per learning rate, one torch thread
    .venv/bin/python bench/moe_volatility.py --smoke        # 2 steps, no figure worth reading (CI)

The policy: a random-init Qwen3-MoE (2 layers, 8 experts, top-2, width 64; routers drawn N(0, 1)) on the demo's
arithmetic prompts and character tokenizer, rewarded for digits (fault_worker's digit_reward: varies within
groups, so every update has a signal). For each learning rate, GSPO and GRPO (token level) each train `--steps`
steps of 8 prompts x 4 completions with num_mini_batches=4; printed: the mean and last
moe/expert_change_fraction (the share of top-k expert choices, over policy tokens and layers, that differ from
pi_old's for the same token when an update uses the rollout) and the clip fractions. A random tiny model is not
Qwen3-30B-A3B: the figure shows the metric and how it grows with the update size, nothing about large models.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def build_model(path: Path) -> str:
    import torch

    from gspo.moe import find_routers
    from gspo.tasks.tiny_model import build_moe_model, build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_moe_model(
        tok, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    for router in find_routers(model):
        torch.nn.init.normal_(router.weight, std=1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run(model_dir: str, data: str, out: Path, *, level: str, lr: float, steps: int) -> dict:
    import fault_worker as fw

    from gspo.trainer import GSPOTrainer

    cfg = fw.make_config(
        out, model_dir, max_steps=steps, batch_size=8, group_size=4, num_mini_batches=4, gspo_epochs=1,
        importance_sampling_level=level, learning_rate=lr, num_epochs=10,
    )  # fmt: skip
    history = GSPOTrainer(cfg, reward_funcs=[fw.digit_reward]).train(data)
    change = [h["moe/expert_change_fraction"] for h in history]
    return {
        "change_mean": statistics.mean(change),
        "change_last": change[-1],
        "clip_token": statistics.mean(h["clip_fraction_token"] for h in history),
        "clip_seq": statistics.mean(h["clip_fraction_seq"] for h in history),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lrs", default="1e-4,1e-3,3e-3")
    ap.add_argument("--smoke", action="store_true", help="2 steps, one learning rate: checks the script runs")
    args = ap.parse_args()
    import fault_worker as fw
    import torch

    torch.set_num_threads(1)
    steps = 2 if args.smoke else args.steps
    lrs = [float(x) for x in args.lrs.split(",")][: 1 if args.smoke else None]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data = build_model(root / "model"), fw.make_dataset(root / "data.jsonl")
        print("| learning rate | objective | expert change, mean / last step | clip fraction token / seq |")
        print("|---|---|---|---|")
        for lr in lrs:
            for level, name in (("sequence", "GSPO"), ("token", "GRPO")):
                r = run(model_dir, data, root / f"{name}-{lr}", level=level, lr=lr, steps=steps)
                print(
                    f"| {lr:g} | {name} | {r['change_mean']:.4f} / {r['change_last']:.4f} | "
                    f"{r['clip_token']:.4f} / {r['clip_seq']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
