"""Shared by the benchmarks: model and tokenizer builders, prompts, rewards and small measuring helpers.

Imports only torch, transformers and tokenizers at module level (bench_trl.py's TRL worker uses it from
a venv without gspo).
"""

from __future__ import annotations

import os
import resource
import statistics
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
N_PROMPTS, GROUP = 8, 4
SMALL_ARCH = dict(
    hidden_size=384,
    intermediate_size=1280,
    num_hidden_layers=8,
    num_attention_heads=6,
    num_key_value_heads=2,
    vocab_size=32768,
)
SCALE_BASE = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=8192,
)
PROMPT_WORDS = 16
# --smoke (tests/test_bench_smoke.py): every size becomes small enough that a script runs end to end in seconds.
# The tiny demo model gets a fixed 2-step warm start instead of the recipe's (minutes from an empty cache), and
# the Qwen2 sizes a 2-layer, 1024-word shape. Figures measured this way mean nothing; only the exit status does.
SMOKE_SFT_STEPS = 2
SMOKE_ARCH = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    vocab_size=1024,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def record_linear_dtypes(model) -> set:
    """A set that collects the output dtype of every nn.Linear call of `model` (evidence of what
    precision the matmuls really ran in: bf16 under autocast)."""
    seen: set = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, a, out: seen.add(str(out.dtype).replace("torch.", "")))
    return seen


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def spread(xs):
    """(max - min) / median, as a percentage: how noisy the repeats were."""
    return 100.0 * (max(xs) - min(xs)) / median(xs) if len(xs) > 1 else 0.0


def loadavg() -> float:
    return os.getloadavg()[0]


def diversity_reward(prompts=None, completions=None, **kwargs):
    """Cheap deterministic reward that differs within a group (so advantages are non-zero):
    the fraction of distinct characters. Used by both gspo and TRL."""
    return [len(set(c)) / (len(c) + 1.0) for c in completions]


# ---------------------------------------------------------------------------- models
def build_word_tokenizer(vocab_size: int):
    """Word-level fast tokenizer: 'w0'..'wK' plus specials. Loaded back with
    PreTrainedTokenizerFast.from_pretrained (never AutoTokenizer, which may swap in Qwen's own class)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def load_word_tokenizer(path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok


def build_qwen2_dir(path: Path, arch: dict, dtype=torch.float32, seed: int = 0) -> Path:
    """A randomly initialised Qwen2ForCausalLM (+ tokenizer) saved to `path`; returns path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (path / "model.safetensors").is_file():
        return path
    torch.manual_seed(seed)
    tok = build_word_tokenizer(arch["vocab_size"])
    cfg = Qwen2Config(
        **arch,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        use_cache=True,
    )
    model = Qwen2ForCausalLM(cfg).to(dtype)
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    gen.do_sample, gen.top_k, gen.top_p, gen.temperature = True, 0, 1.0, 1.0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    assert load_word_tokenizer(path).encode("w1 w2") == tok.encode("w1 w2"), "tokenizer round trip failed"
    return path


def word_prompts(n: int, vocab: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 8, (n, PROMPT_WORDS), generator=g)
    return [" ".join(f"w{int(i)}" for i in row) for row in ids]


def model_setup(size: str, workdir: Path, arch: dict | None = None, smoke: bool = False):
    """(model_dir, tokenizer, prompt rows) for a size name; `smoke`: the smoke-test shapes (SMOKE_ARCH)."""
    if size == "tiny":
        from gspo.models import load_tokenizer
        from gspo.tasks.arithmetic import make_problems
        from gspo.tasks.tiny_model import ensure_tiny_model

        path = (
            ensure_tiny_model(cache_dir=workdir / "tiny-smoke", sft_steps=SMOKE_SFT_STEPS, verbose=False)
            if smoke
            else ensure_tiny_model(verbose=False)
        )
        tok = load_tokenizer(str(path))
        rows = [{"prompt": p["prompt"], "answer": p["answer"]} for p in make_problems(N_PROMPTS, seed=7, split="train")]
        return path, tok, rows
    arch = SMOKE_ARCH if smoke else (arch or SMALL_ARCH)
    key = "-".join(f"{k[:3]}{v}" for k, v in sorted(arch.items()))
    path = build_qwen2_dir(workdir / f"qwen2-{key}", arch)
    return path, load_word_tokenizer(path), [{"prompt": p} for p in word_prompts(N_PROMPTS, arch["vocab_size"])]


def run_script(script: Path, args: list, timeout: int = 900) -> dict:
    """Run `script args` in a fresh interpreter (its own peak RSS); its last stdout line is JSON."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, str(script)] + args, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
