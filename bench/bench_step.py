#!/usr/bin/env python
"""Benchmark of one GSPO training step, phase by phase, against the same model ops done raw.

Not part of the test suite. Run from the repo root with the project venv:

    .venv/bin/python bench/bench_step.py                 # everything: 12 min on 2 CPU cores at load 4-5
    .venv/bin/python bench/bench_step.py --only tiny     # one part: tiny|small|epochs|scaling
    .venv/bin/python bench/bench_step.py --only tiny --steps-tiny 1 --smoke --out /tmp/x.json   # seconds (tests)

Parts (each model size / configuration runs in its own subprocess, so peak RSS is its own):
  tiny     the demo's model (gspo.tasks.tiny_model), 8 prompts x 4 completions, 8 new tokens, KL on,
           gspo_epochs=1, num_mini_batches=1
  small    a randomly initialised Qwen2-architecture model (~27M parameters, vocab 32768) with a
           word-level tokenizer built here, same batch, 64 new tokens
  epochs   forward-call counts with gspo_epochs=3 (one and two mini-batches): a rollout batch costs
           one generation, one reference pass and at most one extra no-grad pass
  scaling  step time and peak RSS as group size, completion length and model width double
(Peak memory of the log-prob function and of the output head: bench/bench_memory.py.)

For tiny and small, every gspo step is followed (same process, same load) by the raw ops at the same
shapes: plain `model.generate` for exactly as many decode steps, a plain no-grad forward of the
reference model (logits_to_keep, log_softmax, gather), a plain forward+backward of the policy copy and
an AdamW step. `overhead` = gspo step time / sum of raw op times, paired per step, median reported.
The raw side is a strict floor: no reward, no metrics, no gradient clipping, no entropy.

Last line of stdout: one JSON object with every figure (also written to bench/results/bench_step.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_common import (  # noqa: E402  (bench/ is on sys.path when run as a script)
    GROUP,
    HERE,
    N_PROMPTS,
    SCALE_BASE,
    current_rss_mb,
    diversity_reward,
    load_word_tokenizer,
    loadavg,
    median,
    model_setup,
    peak_rss_mb,
    record_linear_dtypes,
    run_script,
    spread,
    word_prompts,
)

MIXED_PRECISION = "no"  # --mixed-precision: gspo's GSPOConfig.mixed_precision, and autocast around the raw ops
SMOKE = False  # --smoke: bench_common's smoke-test model shapes (tests/test_bench_smoke.py); figures mean nothing


def make_trainer(model_dir, tok, *, group=GROUP, new_tokens=8, epochs=1, mini=1, out_dir=None):
    from transformers import get_scheduler

    from gspo.config import GSPOConfig
    from gspo.trainer import GSPOTrainer

    cfg = GSPOConfig(
        policy_model_name=str(model_dir),
        batch_size=N_PROMPTS,
        group_size=group,
        max_new_tokens=new_tokens,
        gspo_epochs=epochs,
        num_mini_batches=mini,
        kl_coef=0.04,
        adaptive_kl=False,
        entropy_coef=0.0,
        learning_rate=1e-6,
        max_steps=1000,
        output_dir=str(out_dir or tempfile.mkdtemp(prefix="gspo-bench-")),
        progress_bar=False,
        log_completions_steps=0,
        max_prompt_length=256,
        top_k=0,
        top_p=1.0,
        temperature=1.0,
        mixed_precision=MIXED_PRECISION,
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[diversity_reward], tokenizer=tok)
    trainer.policy.scheduler = get_scheduler(cfg.lr_scheduler_type, trainer.optimizer, 0, 10**6)  # as train() does
    return trainer


def time_optimizer(trainer, sink: list):
    """Wrap the back-end's step (clip + AdamW + zero_grad) to record its wall time."""
    inner = trainer.policy.step

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    trainer.policy.step = timed


def time_phases_cpu(trainer, sink: dict):
    """Record each phase's process CPU time into sink[name], by wrapping the objects the producer and the learner
    call (instance attributes only; the library is unchanged). With one torch thread, CPU time is the work done,
    and much less sensitive than wall time to other processes' load."""
    policy_module = trainer.policy.module

    def wrap(owner, attr, name_of):
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            c0 = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                name = name_of(args)
                sink[name] = sink.get(name, 0.0) + time.process_time() - c0

        setattr(owner, attr, timed)

    wrap(trainer.engine, "generate", lambda a: "generation")
    wrap(trainer.producer, "scorer", lambda a: "reward")
    wrap(trainer.logprobs, "no_grad", lambda a: "old_logprobs" if a[0] is policy_module else "reference")
    wrap(trainer.learner, "learn", lambda a: "update")


# ---------------------------------------------------------------------------- raw ops
class RawOps:
    """The same model work at the same shapes, with nothing around it."""

    def __init__(self, policy, ref, lr=1e-6):
        self.model = copy.deepcopy(policy)
        self.ref = ref
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr)

    def run(self, rollout, group: int, pad_id: int) -> tuple[dict, dict]:
        """(wall seconds, CPU seconds) per op."""
        amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=MIXED_PRECISION == "bf16")
        with amp:
            t, c = self._model_ops(rollout, group, pad_id)
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t["optimizer"], c["optimizer"] = time.perf_counter() - t0, time.process_time() - c0
        return t, c

    def _model_ops(self, rollout, group: int, pad_id: int) -> tuple[dict, dict]:
        from gspo.logprobs import trim_padding

        t, c = {}, {}
        n_dec = rollout.completion_ids.shape[1]  # generate ran exactly this many decode steps
        p_ids, p_mask = rollout.prompt_ids[::group], rollout.prompt_mask[::group]
        t0, c0 = time.perf_counter(), time.process_time()
        self.model.generate(
            input_ids=p_ids,
            attention_mask=p_mask,
            do_sample=True,
            max_new_tokens=n_dec,
            min_new_tokens=n_dec,
            num_return_sequences=group,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            pad_token_id=pad_id,
        )
        t["generation"], c["generation"] = time.perf_counter() - t0, time.process_time() - c0
        pi, pm, ci, cm = trim_padding(
            rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask
        )
        ids, mask = torch.cat([pi, ci], 1), torch.cat([pm, cm], 1)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        keep = ci.shape[1] + 1
        adv = rollout.advantages
        if self.ref is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.no_grad():
                lg = self.ref(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits[:, :-1]
                torch.log_softmax(lg.float(), -1).gather(-1, ci[..., None])
            t["reference"], c["reference"] = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        lg = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits[:, :-1]
        logp = torch.log_softmax(lg.float(), -1).gather(-1, ci[..., None]).squeeze(-1)
        loss = -((logp * cm).sum(1) / cm.sum(1).clamp(min=1) * adv).mean()
        loss.backward()
        t["fwd_bwd"], c["fwd_bwd"] = time.perf_counter() - t0, time.process_time() - c0
        return t, c


# ---------------------------------------------------------------------------- workers
def check_logits_to_keep(model) -> bool:
    ids = torch.ones(2, 10, dtype=torch.long) * 5
    with torch.no_grad():
        out = model(input_ids=ids, logits_to_keep=3, use_cache=False)
    return out.logits.shape[1] == 3


def worker_step(size: str, steps: int, workdir: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    new_tokens = 8 if size == "tiny" else 64
    model_dir, tok, rows = model_setup(size, workdir, smoke=SMOKE)
    trainer = make_trainer(model_dir, tok, new_tokens=new_tokens)
    from gspo.data import GSPODataset

    ds = GSPODataset(rows, tok, max_prompt_length=256)
    batch = [ds[i] for i in range(len(ds))]
    policy = trainer.policy.unwrapped()
    raw = RawOps(policy, trainer.ref_model)
    opt_times: list = []
    time_optimizer(trainer, opt_times)
    opt_cpu: list = []
    inner_opt = trainer.policy.step

    def opt_cpu_timed(*args, **kwargs):
        c0 = time.process_time()
        try:
            return inner_opt(*args, **kwargs)
        finally:
            opt_cpu.append(time.process_time() - c0)

    trainer.policy.step = opt_cpu_timed
    phase_cpu: dict = {}
    time_phases_cpu(trainer, phase_cpu)
    rss_before = current_rss_mb()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gspo_rows, raw_rows, gspo_cpu, raw_cpu, loads = [], [], [], [], []
    for step in range(steps + 1):  # step 0 warms up both sides and is dropped
        torch.manual_seed(1000 + step)
        phase_cpu.clear()
        c0 = time.process_time()
        metrics, rollout = trainer.training_step(batch)
        step_cpu = time.process_time() - c0
        trainer.step += 1
        torch.manual_seed(1000 + step)
        r, rc = raw.run(rollout, GROUP, pad_id)
        if step == 0:
            continue
        gc = {k: phase_cpu.get(k, 0.0) for k in ("generation", "reward", "reference", "old_logprobs")}
        gc["optimizer"] = opt_cpu[-1]
        gc["fwd_bwd"] = phase_cpu["update"] - opt_cpu[-1]
        gc["step"] = step_cpu
        gc["other"] = step_cpu - sum(phase_cpu.values())
        rc["sum"] = sum(rc.values())
        gspo_cpu.append(gc)
        raw_cpu.append(rc)
        tokens = float(rollout.lengths.sum())
        g = {
            "step": metrics["step_time_s"],
            "generation": metrics["time/generation_s"],
            "reward": metrics["time/reward_s"],
            "reference": metrics.get("time/reference_s", 0.0),
            "old_logprobs": metrics.get("time/old_logprobs_s", 0.0),
            "optimizer": opt_times[-1],
            "update": metrics["time/update_s"],
            "tokens": tokens,
            "decode_steps": rollout.completion_ids.shape[1],
        }
        g["fwd_bwd"] = g["update"] - g["optimizer"]
        g["other"] = g["step"] - sum(g[k] for k in ("generation", "reward", "reference", "old_logprobs", "update"))
        r["sum"] = sum(r.values())
        gspo_rows.append(g)
        raw_rows.append(r)
        loads.append(loadavg())
    n_params = sum(p.numel() for p in policy.parameters())
    phases = ["generation", "reward", "reference", "old_logprobs", "fwd_bwd", "optimizer", "other", "step"]
    res = {
        "size": size,
        "model": type(policy).__name__,
        "params_M": n_params / 1e6,
        "threads": threads,
        "steps": steps,
        "batch": f"{N_PROMPTS}x{GROUP}",
        "max_new_tokens": new_tokens,
        "logits_to_keep_effective": check_logits_to_keep(policy),
        "gspo_median_s": {k: median([g[k] for g in gspo_rows]) for k in phases},
        "raw_median_s": {k: median([r[k] for r in raw_rows]) for k in raw_rows[0]},
        "step_spread_pct": spread([g["step"] for g in gspo_rows]),
        "completion_tokens_median": median([g["tokens"] for g in gspo_rows]),
        "decode_steps_median": median([g["decode_steps"] for g in gspo_rows]),
        "overhead_ratio_median": median([g["step"] / r["sum"] for g, r in zip(gspo_rows, raw_rows)]),
        "overhead_ratios": [round(g["step"] / r["sum"], 4) for g, r in zip(gspo_rows, raw_rows)],
        "gspo_cpu_median_s": {k: median([g[k] for g in gspo_cpu]) for k in phases},
        "raw_cpu_median_s": {k: median([r[k] for r in raw_cpu]) for k in raw_cpu[0]},
        "overhead_ratio_cpu_median": median([g["step"] / r["sum"] for g, r in zip(gspo_cpu, raw_cpu)]),
        "overhead_ratios_cpu": [round(g["step"] / r["sum"], 4) for g, r in zip(gspo_cpu, raw_cpu)],
        "step_cpu_spread_pct": spread([g["step"] for g in gspo_cpu]),
        "tokens_per_s": median([g["tokens"] / g["step"] for g in gspo_rows]),
        "gen_tokens_per_s": median([g["tokens"] / g["generation"] for g in gspo_rows]),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_steps_mb": rss_before,
        "loadavg_during": [round(x, 2) for x in loads],
    }
    return res


def worker_gspo_only(
    size: str,
    steps: int,
    workdir: Path,
    threads: int,
    model_dir: str,
    new_tokens: int,
    arch: dict | None = None,
    group: int = GROUP,
) -> dict:
    """gspo steps alone (no raw ops, no copy): for the TRL comparison and the scaling table."""
    torch.set_num_threads(threads)
    if model_dir:
        path = Path(model_dir)
        tok = load_word_tokenizer(path) if (path / "tokenizer.json").is_file() and size != "tiny" else None
        if tok is None:
            _, tok, _ = model_setup("tiny", workdir, smoke=SMOKE)
        rows = (
            [
                {"prompt": p}
                for p in word_prompts(N_PROMPTS, json.loads((path / "config.json").read_text())["vocab_size"])
            ]
            if size != "tiny"
            else model_setup("tiny", workdir, smoke=SMOKE)[2]
        )
    else:
        path, tok, rows = model_setup(size, workdir, arch, smoke=SMOKE)
    trainer = make_trainer(path, tok, group=group, new_tokens=new_tokens)
    from gspo.data import GSPODataset

    ds = GSPODataset(rows, tok, max_prompt_length=256)
    batch = [ds[i] for i in range(len(ds))]
    rss_before = current_rss_mb()
    matmul_dtypes = record_linear_dtypes(trainer.policy.unwrapped())
    times, cpus, tokens = [], [], []
    for step in range(steps + 1):
        torch.manual_seed(1000 + step)
        c0 = time.process_time()
        metrics, rollout = trainer.training_step(batch)
        cpu = time.process_time() - c0
        trainer.step += 1
        if step:
            times.append(metrics["step_time_s"])
            cpus.append(cpu)
            tokens.append(float(rollout.lengths.sum()))
    policy = trainer.policy.unwrapped()
    return {
        "step_median_s": median(times),
        "step_times_s": [round(x, 4) for x in times],
        "spread_pct": spread(times),
        "step_cpu_median_s": median(cpus),
        "step_cpu_s": [round(x, 4) for x in cpus],
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_steps_mb": rss_before,
        "completion_tokens": median(tokens),
        "params_M": sum(p.numel() for p in policy.parameters()) / 1e6,
        "linear_output_dtypes": sorted(matmul_dtypes),
    }


def worker_epochs(workdir: Path, threads: int) -> list:
    """Count forward calls per rollout batch with gspo_epochs=3."""
    torch.set_num_threads(threads)
    model_dir, tok, rows = model_setup("tiny", workdir, smoke=SMOKE)
    from gspo.data import GSPODataset

    out = []
    for mini in (1, 2):
        trainer = make_trainer(model_dir, tok, epochs=3, mini=mini)
        batch = [GSPODataset(rows, tok)[i] for i in range(len(rows))]
        policy = trainer.policy.unwrapped()
        counts = {"generate_calls": 0, "policy_grad_rows": 0, "policy_nograd_rows": 0, "ref_rows": 0}
        in_gen = [False]

        def wrap_forward(model, key_grad, key_nograd):
            inner = model.forward

            def fwd(*a, **k):
                if not in_gen[0]:
                    n = (k.get("input_ids") if k.get("input_ids") is not None else a[0]).shape[0]
                    counts[key_grad if torch.is_grad_enabled() else key_nograd] += n
                return inner(*a, **k)

            model.forward = fwd

        inner_gen = policy.generate

        def gen(*a, **k):
            counts["generate_calls"] += 1
            in_gen[0] = True
            try:
                return inner_gen(*a, **k)
            finally:
                in_gen[0] = False

        policy.generate = gen
        wrap_forward(policy, "policy_grad_rows", "policy_nograd_rows")
        wrap_forward(trainer.ref_model, "ref_rows", "ref_rows")
        trainer.training_step(batch)
        n = N_PROMPTS * GROUP
        out.append(
            {
                "gspo_epochs": 3,
                "num_mini_batches": mini,
                "generate_calls": counts["generate_calls"],
                "reference_passes": counts["ref_rows"] / n,
                "extra_no_grad_policy_passes": counts["policy_nograd_rows"] / n,
                "grad_passes": counts["policy_grad_rows"] / n,
            }
        )
    return out


# ---------------------------------------------------------------------------- parent
def run_worker(args: list, timeout=900) -> dict:
    return run_script(Path(__file__).resolve(), args, timeout=timeout)


def fmt_ms(s):
    return f"{1000 * s:9.1f}"


def print_step(res: dict) -> None:
    g, r = res["gspo_median_s"], res["raw_median_s"]
    gc, rc = res["gspo_cpu_median_s"], res["raw_cpu_median_s"]
    print(
        f"\n== {res['size']}: {res['model']} {res['params_M']:.2f}M params, batch {res['batch']}, "
        f"{res['max_new_tokens']} new tokens, {res['steps']} timed steps, {res['threads']} threads; "
        f"logits_to_keep takes effect: {res['logits_to_keep_effective']}"
    )
    print(f"   median per step  {'gspo wall ms':>12s} {'raw wall ms':>12s} {'gspo CPU ms':>12s} {'raw CPU ms':>12s}")
    dash = "           -"
    for k in ("generation", "reward", "reference", "old_logprobs", "fwd_bwd", "optimizer", "other"):
        print(
            f"   {k:14s}   {1000 * g[k]:12.1f} {f'{1000 * r[k]:12.1f}' if k in r else dash} "
            f"{1000 * gc[k]:12.1f} {f'{1000 * rc[k]:12.1f}' if k in rc else dash}"
        )
    print(
        f"   {'step':14s}   {1000 * g['step']:12.1f} {1000 * r['sum']:12.1f} {1000 * gc['step']:12.1f} "
        f"{1000 * rc['sum']:12.1f}"
    )
    print(
        f"   overhead ratio gspo/raw, median of paired steps: CPU time {res['overhead_ratio_cpu_median']:.3f} "
        f"{res['overhead_ratios_cpu']}; wall {res['overhead_ratio_median']:.3f} {res['overhead_ratios']}"
    )
    print(
        f"   completion tokens/step {res['completion_tokens_median']:.0f}, tokens/s {res['tokens_per_s']:.1f}, "
        f"generation tokens/s {res['gen_tokens_per_s']:.1f}, peak RSS {res['peak_rss_mb']:.0f} MB, "
        f"step time spread {res['step_spread_pct']:.0f}%, load avg {res['loadavg_during']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="tiny,small,epochs,scaling")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16: GSPOConfig.mixed_precision='bf16' and bf16 autocast around the raw ops",
    )
    ap.add_argument(
        "--rollout-engine",
        choices=("hf", "vllm"),
        default="hf",
        help="vllm: hf vs vllm generation tokens/s, weight sync, mismatch (bench_engines.py; needs vllm)",
    )
    ap.add_argument("--steps-tiny", type=int, default=10)
    ap.add_argument("--steps-small", type=int, default=3)
    ap.add_argument("--steps-scaling", type=int, default=2)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "gspo-bench-models"))
    ap.add_argument("--out", default=str(HERE / "results" / "bench_step.json"))
    ap.add_argument(
        "--smoke", action="store_true", help="tiny model shapes, for a seconds-long check that the script runs"
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    global MIXED_PRECISION, SMOKE
    MIXED_PRECISION, SMOKE = a.mixed_precision, a.smoke
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = json.loads(a.spec)
    if a.rollout_engine == "vllm":  # the engines side by side (bench_engines.py), tiny and small only
        import bench_engines

        a.only, a.reps, a.out = ",".join(p for p in a.only.split(",") if p in ("tiny", "small")), 3, None
        return bench_engines.run(a)
    if a.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import logging

        logging.disable(logging.WARNING)
        if a.worker == "step":
            res = worker_step(spec["size"], spec["steps"], workdir, a.threads)
        elif a.worker == "gspo_only":
            res = worker_gspo_only(
                spec.get("size", "small"),
                spec["steps"],
                workdir,
                a.threads,
                spec.get("model_dir", ""),
                spec["new_tokens"],
                spec.get("arch"),
                spec.get("group", GROUP),
            )
        elif a.worker == "epochs":
            res = worker_epochs(workdir, a.threads)
        else:
            raise SystemExit(f"unknown worker {a.worker}")
        print(json.dumps(res))
        return

    parts = a.only.split(",")
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "threads": a.threads,
        "cpu_count": os.cpu_count(),
        "mixed_precision": a.mixed_precision,
        "torch": torch.__version__,
        "loadavg_start": os.getloadavg(),
    }
    t_start = time.perf_counter()
    th = ["--threads", str(a.threads), "--workdir", str(workdir), "--mixed-precision", a.mixed_precision]
    th += ["--smoke"] if a.smoke else []
    print(
        f"gspo bench: torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} CPUs, "
        f"mixed precision {a.mixed_precision}, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for size in ("tiny", "small"):
        if size in parts:
            steps = a.steps_tiny if size == "tiny" else a.steps_small
            res = run_worker(["--worker", "step", "--spec", json.dumps({"size": size, "steps": steps})] + th)
            out[size] = res
            print_step(res)
            sys.stdout.flush()
    if "epochs" in parts:
        res = run_worker(["--worker", "epochs"] + th)
        out["epochs"] = res
        print("\n== forward passes per rollout batch (tiny model, gspo_epochs=3; passes = rows forwarded / batch)")
        for r in res:
            print(
                f"   num_mini_batches={r['num_mini_batches']}: generate calls {r['generate_calls']}, reference "
                f"passes {r['reference_passes']:.0f}, extra no-grad policy passes "
                f"{r['extra_no_grad_policy_passes']:.0f}"
                f", grad passes {r['grad_passes']:.0f}"
            )
        sys.stdout.flush()
    if "scaling" in parts:
        base = dict(new_tokens=32, group=GROUP, arch=SCALE_BASE)
        wide = dict(SCALE_BASE, hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4)
        variants = [
            ("base", base),
            ("group x2", dict(base, group=2 * GROUP)),
            ("length x2", dict(base, new_tokens=64)),
            ("width x2", dict(base, arch=wide)),
        ]
        rows = []
        print(
            f"\n== scaling (Qwen2 random init, {N_PROMPTS} prompts, median of {a.steps_scaling} steps after 1 warm-up;"
            f" peak RSS of a fresh process)"
        )
        for name, v in variants:
            res = run_worker(
                ["--worker", "gspo_only", "--spec", json.dumps({"size": "small", "steps": a.steps_scaling, **v})] + th
            )
            res["variant"], res["spec"] = (
                name,
                {"group": v["group"], "new_tokens": v["new_tokens"], "hidden": v["arch"]["hidden_size"]},
            )
            rows.append(res)
        b = rows[0]
        print(
            f"   {'variant':10s} {'G':>3s} {'T':>4s} {'hidden':>6s} {'params M':>8s} {'step s':>8s} {'x base':>6s} "
            f"{'CPU s':>7s} {'x base':>6s} "
            f"{'peak RSS MB':>11s} {'RSS growth MB':>13s}"
        )
        for r in rows:
            s = r["spec"]
            print(
                f"   {r['variant']:10s} {s['group']:3d} {s['new_tokens']:4d} {s['hidden']:6d} {r['params_M']:8.2f} "
                f"{r['step_median_s']:8.3f} {r['step_median_s'] / b['step_median_s']:6.2f} "
                f"{r['step_cpu_median_s']:7.3f} {r['step_cpu_median_s'] / b['step_cpu_median_s']:6.2f} "
                f"{r['peak_rss_mb']:11.0f} "
                f"{r['peak_rss_mb'] - r['rss_before_steps_mb']:13.0f}"
            )
        out["scaling"] = rows
        sys.stdout.flush()
    out["total_s"] = time.perf_counter() - t_start
    out["loadavg_end"] = os.getloadavg()
    summary = {"bench": "gspo_step", **{k: out[k] for k in ("date", "threads", "mixed_precision", "total_s")}}
    for size in ("tiny", "small"):
        if size in out:
            summary[f"{size}_overhead_ratio_cpu"] = round(out[size]["overhead_ratio_cpu_median"], 4)
            summary[f"{size}_overhead_ratio_wall"] = round(out[size]["overhead_ratio_median"], 4)
            summary[f"{size}_step_s"] = round(out[size]["gspo_median_s"]["step"], 4)
            summary[f"{size}_peak_rss_mb"] = round(out[size]["peak_rss_mb"], 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"\nfull results: {a.out}; total {out['total_s']:.0f}s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
