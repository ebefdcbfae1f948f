"""GPU check of rollout generation: gspo's inverse-CDF sampler vs generate's own multinomial sampling.

    PYTHONPATH=src python3 bench/gpu_generation.py      # needs CUDA; ~0.5B Qwen2 (random init, bf16)
    PYTHONPATH=src python3 bench/gpu_generation.py --smoke   # CUDA, a 2-layer model, 2x2x8: does it run (tests)

Prints per-call times of the samplers alone on [rows, vocab] logits, and whole generation times
(gspo.rollout.generate_rollout vs model.generate(do_sample=True)) at the same shape. Last line: JSON.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import SMOKE_ARCH, build_qwen2_dir, load_word_tokenizer, word_prompts  # noqa: E402
from gspo.engines import generate_rollout  # noqa: E402
from gspo.sampling import sample_tokens  # noqa: E402

ARCH = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
)
PROMPTS, GROUP, NEW = (
    int(os.environ.get("PROMPTS", 16)),
    int(os.environ.get("GROUP", 8)),
    int(os.environ.get("NEW_TOKENS", 256)),
)


def timed(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


def main():
    global ARCH, PROMPTS, GROUP, NEW
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model, 2 prompts x 2, 8 tokens: checks it runs")
    if ap.parse_args().smoke:
        ARCH = dict(SMOKE_ARCH)
        PROMPTS, GROUP, NEW = 2, 2, 8
    assert torch.cuda.is_available(), "no CUDA device visible"
    from transformers import AutoModelForCausalLM, GenerationConfig

    res = {"device": torch.cuda.get_device_name()}
    logits = torch.randn(PROMPTS * GROUP, ARCH["vocab_size"], device="cuda", dtype=torch.bfloat16) * 3
    res["sampler_inverse_cdf_ms"] = 1e3 * timed(lambda: sample_tokens(logits), 20)
    res["sampler_multinomial_ms"] = 1e3 * timed(lambda: torch.multinomial(logits.float().softmax(-1), 1), 20)
    name = "gspo-gpu-qwen2-" + ("smoke" if ARCH["vocab_size"] == SMOKE_ARCH["vocab_size"] else "0.5b")
    path = build_qwen2_dir(Path(tempfile.gettempdir()) / name, ARCH, dtype=torch.bfloat16)
    tok = load_word_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    rows = [{"prompt": p, "prompt_ids": tok.encode(p)} for p in word_prompts(PROMPTS, ARCH["vocab_size"])]
    widths = []

    def ours():
        r = generate_rollout(model, tok, rows, group_size=GROUP, max_new_tokens=NEW)
        widths.append(r.completion_ids.shape[1])

    def hf():
        ids = torch.tensor([r["prompt_ids"] for r in rows], device="cuda").repeat_interleave(GROUP, 0)
        cfg = GenerationConfig(
            do_sample=True,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            top_k=None,
            top_p=None,
            temperature=1.0,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)

    ours()  # warm-up both, then alternate so both see the same machine state
    hf()
    torch.cuda.synchronize()
    times = {"gspo": [], "hf": []}
    for _ in range(3):
        for name, fn in (("gspo", ours), ("hf", hf)):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    res["generate_gspo_s"], res["generate_hf_multinomial_s"] = sorted(times["gspo"])[1], sorted(times["hf"])[1]
    res["generate_times_s"] = times
    res["gspo_widths"] = widths
    res["shape"] = [PROMPTS * GROUP, NEW, ARCH["vocab_size"]]
    print(json.dumps(res))


if __name__ == "__main__":
    main()
