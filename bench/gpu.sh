#!/usr/bin/env bash
# GSPO step on one H100/H200: a ~0.5B-parameter Qwen2-architecture model (Qwen2.5-0.5B shape, random init,
# bf16), a few steps; prints generation tokens/s, training tokens/s and MFU. Meant to finish in < 10 min.
#
#   bash bench/gpu.sh                 # needs the project venv with a CUDA torch (pip install torch==2.13.0
#                                     # from the CUDA index on the GPU machine) and `pip install -e .`
#   STEPS=4 PROMPTS=16 GROUP=8 NEW_TOKENS=256 bash bench/gpu.sh
#   MIXED=1 bash bench/gpu.sh         # float32 weights + bf16 autocast (mixed_precision="bf16"), as
#                                     # TRL's default; without it the weights themselves are bf16
#
# Run on an NVIDIA H200 on 2026-11-28 (torch 2.11.0+cu130, transformers 5.17.0) with the image's python and the
# source tree on PYTHONPATH: `PYTHON=python3 PYTHONPATH=$PWD/src bash bench/gpu.sh`; figures in bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export STEPS=${STEPS:-4} PROMPTS=${PROMPTS:-16} GROUP=${GROUP:-8} NEW_TOKENS=${NEW_TOKENS:-256} MIXED=${MIXED:-0}
export ENGINE=${ENGINE:-hf}  # ENGINE=vllm: rollouts from the in-process vLLM engine (needs vllm)
export TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF'
import json, os, statistics, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
from bench_common import build_qwen2_dir, diversity_reward, load_word_tokenizer, word_prompts

DRY = os.environ.get("DRY_RUN") == "1"  # CPU smoke test of this script with a tiny model: DRY_RUN=1
assert DRY or torch.cuda.is_available(), "no CUDA device visible"
steps, prompts, group, new_tokens = (int(os.environ[k]) for k in ("STEPS", "PROMPTS", "GROUP", "NEW_TOKENS"))
ARCH = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
            num_key_value_heads=2, vocab_size=151936)  # Qwen2.5-0.5B shape
if DRY:
    ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=1024)
MIXED = os.environ.get("MIXED") == "1"  # float32 master weights + bf16 autocast instead of bf16 weights
model_dir = build_qwen2_dir(Path(tempfile.gettempdir()) / f"gspo-gpu-qwen2-{'dry' if DRY else '0.5b'}", ARCH,
                            dtype=torch.bfloat16)
tok = load_word_tokenizer(model_dir)

from gspo.config import GSPOConfig
from gspo.data import GSPODataset
from gspo.trainer import GSPOTrainer
from transformers import get_scheduler

cfg = GSPOConfig(policy_model_name=str(model_dir), torch_dtype="float32" if MIXED else "bfloat16",
                 mixed_precision="bf16" if MIXED else "no", batch_size=prompts, group_size=group,
                 max_new_tokens=new_tokens, gspo_epochs=1, num_mini_batches=1, kl_coef=0.04, adaptive_kl=False,
                 entropy_coef=0.0, learning_rate=1e-6, max_steps=1000, output_dir=tempfile.mkdtemp(),
                 progress_bar=False, log_completions_steps=0, top_k=0, rollout_engine=os.environ["ENGINE"],
                 max_prompt_length=256)
trainer = GSPOTrainer(cfg, reward_funcs=[diversity_reward], tokenizer=tok)
trainer.policy.scheduler = get_scheduler("constant", trainer.optimizer, 0, 10**6)
policy = trainer.accelerator.unwrap_model(trainer.model)
n_params = sum(p.numel() for p in policy.parameters())
n_nonembed = n_params - policy.get_input_embeddings().weight.numel()
ds = GSPODataset([{"prompt": p} for p in word_prompts(prompts, ARCH["vocab_size"])], tok, max_prompt_length=256)
batch = [ds[i] for i in range(len(ds))]
name = "cpu (dry run)" if DRY else torch.cuda.get_device_name()
peak = 989e12  # dense bf16 tensor-core peak of H100 SXM and H200 (no sparsity)
print(f"device {name}; model {n_params / 1e6:.0f}M params ({n_nonembed / 1e6:.0f}M non-embedding), {'fp32 weights + bf16 autocast' if MIXED else 'bf16 weights'}; "
      f"{prompts}x{group}, {new_tokens} new tokens; {steps} timed steps after 1 warm-up", flush=True)
rows = []
if not DRY:
    torch.cuda.reset_peak_memory_stats()
for step in range(steps + 1):
    m, r = trainer.training_step(batch)
    trainer.step += 1
    comp = float(r.lengths.sum())
    seq = float((r.prompt_mask.sum() + r.completion_mask.sum()))  # tokens through each full forward
    # FLOPs per token ~ 2N forward (+4N backward); logits at completion positions only, so the lm_head
    # term is counted for completion tokens: 2*V*H per completion token per forward.
    head = 2 * ARCH["vocab_size"] * ARCH["hidden_size"]
    fwd = 2 * n_nonembed * seq + head * comp
    row = {"step_s": m["step_time_s"], "gen_s": m["time/generation_s"], "ref_s": m.get("time/reference_s", 0.0),
           "upd_s": m["time/update_s"], "sync_s": m["time/weight_sync_s"], "comp_tokens": comp, "seq_tokens": seq,
           "gen_flops": (2 * n_nonembed + head) * comp, "ref_flops": fwd, "upd_flops": 3 * fwd}
    row["mismatch"] = m.get("engine/logprob_abs_diff_mean")
    if step:
        rows.append(row)
    print(f"  step {step}: {json.dumps({k: round(v, 3) for k, v in row.items() if k.endswith('_s') or k == 'mismatch' and v is not None})}"
          f"{' (warm-up)' if not step else ''}", flush=True)
med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731
gen_tps = med("comp_tokens") / med("gen_s")
train_tps = med("seq_tokens") / med("upd_s")
mfu_train = med("upd_flops") / med("upd_s") / peak
mfu_ref = med("ref_flops") / med("ref_s") / peak if med("ref_s") else 0.0
mfu_step = (med("gen_flops") + med("ref_flops") + med("upd_flops")) / med("step_s") / peak
out = {"device": name, "engine": os.environ["ENGINE"], "weight_sync_s": med("sync_s"),
       "engine_logprob_abs_diff_mean": rows[-1].get("mismatch"), "precision": "fp32 weights + bf16 autocast" if MIXED else "bf16 weights", "params_M": n_params / 1e6, "step_s": med("step_s"), "generation_tokens_per_s": gen_tps,
       "training_tokens_per_s": train_tps, "mfu_update": mfu_train, "mfu_reference": mfu_ref, "mfu_step": mfu_step,
       "peak_gpu_mem_gb": 0.0 if DRY else torch.cuda.max_memory_allocated() / 2**30}
print(f"engine {out['engine']}: generation {gen_tps:,.0f} completion tokens/s; weight sync {out['weight_sync_s']:.3f}s; training (fwd+bwd+AdamW): {train_tps:,.0f} tokens/s; "
      f"MFU update {100 * mfu_train:.1f}%, reference pass {100 * mfu_ref:.1f}%, whole step {100 * mfu_step:.1f}%; "
      f"step {med('step_s'):.2f}s; peak GPU memory {out['peak_gpu_mem_gb']:.1f} GiB")
print(json.dumps(out))
EOF
