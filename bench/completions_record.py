#!/usr/bin/env python
"""What the completions record (log_completions) costs per step on the offline demo.

    .venv/bin/python bench/completions_record.py                # 30 demo steps, one torch thread
    .venv/bin/python bench/completions_record.py --smoke --model DIR   # 2 steps, no figure worth reading (CI)

The demo's steps (16 prompts x 8 completions, the built-in tiny model) run through GSPOTrainer.training_step;
after each one, the two parts of the record are timed on that step's rollout: what runs on the training thread
(`completion_rows`: the rows taken from the finished Rollout, the same call record_step makes) and the parquet
write (`write_records`, which the trainer runs on a background thread while the next step generates). Printed:
the median of each and of the step itself, in ms, and the training-thread part as a share of the step. Run it
alone: the figures move when another process shares the cores.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--model", default=None, help="A model directory instead of builtin:tiny-arithmetic.")
    ap.add_argument("--smoke", action="store_true", help="2 steps: checks the script runs, measures nothing.")
    args = ap.parse_args()
    import torch

    from gspo.completions import completion_rows, write_records
    from gspo.data import PromptStream
    from gspo.demo import demo_config
    from gspo.trainer import GSPOTrainer

    torch.set_num_threads(1)
    steps = 2 if args.smoke else args.steps
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {"policy_model_name": args.model} if args.model else {}
        cfg = demo_config(str(Path(tmp) / "run"), max_steps=steps, log_completions_steps=0, **overrides)
        trainer = GSPOTrainer(cfg)
        data = trainer._as_dataset(cfg.dataset_path)
        prompts = iter(PromptStream(data, batch_size=cfg.batch_size, seed=cfg.seed, rank=0, world_size=1))
        rows_ms, write_ms, step_ms = [], [], []
        for step in range(1, steps + 1):
            start = time.perf_counter()
            _, rollout = trainer.training_step(next(prompts))
            step_ms.append(1e3 * (time.perf_counter() - start))
            start = time.perf_counter()
            rows = completion_rows(rollout, step, limit=cfg.log_completions_max_per_step)
            rows_ms.append(1e3 * (time.perf_counter() - start))
            start = time.perf_counter()
            write_records(rows, Path(tmp) / "completions" / f"completions_{step:05d}.parquet")
            write_ms.append(1e3 * (time.perf_counter() - start))
        size = sum(f.stat().st_size for f in (Path(tmp) / "completions").iterdir()) / steps
    med = statistics.median
    print(f"{steps} demo steps, {len(rows)} completions recorded per step, {size / 1024:.1f} KiB per step file")
    print(f"step (generate, score, update) median {med(step_ms):8.1f} ms")
    print(
        f"record rows (training thread)  median {med(rows_ms):8.2f} ms  = {med(rows_ms) / med(step_ms):.2%} of a step"
    )
    print(
        f"parquet write (background)     median {med(write_ms):8.2f} ms  = {med(write_ms) / med(step_ms):.2%} of a step"
    )


if __name__ == "__main__":
    main()
