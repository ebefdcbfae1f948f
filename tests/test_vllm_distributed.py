"""Two CPU processes under torchrun (gloo), each rank with its own in-process vLLM engine
(distributed_executor_backend='external_launcher'): the ranks stay identical after the updates, and
each rank's engine matches the trainer it belongs to (the mismatch guard would stop the run otherwise)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import vllm_or_skip

vllm_or_skip()
pytestmark = pytest.mark.vllm
HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_each_with_an_engine_stay_identical(tmp_path):
    from gspo.tasks.tiny_model import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model_dir = tmp_path / "model"
    build_model(
        tok, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2
    ).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    port = _free_port()
    cmd = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(HERE / "vllm_worker.py"),
        "--model_dir",
        str(model_dir),
        "--out",
        str(tmp_path),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    for r in ranks:
        for m in r["history"]:
            assert m["engine/logprob_abs_diff_max"] < 1e-4, m
    assert (
        ranks[0]["history"][0]["engine/logprob_abs_diff_mean"] == ranks[1]["history"][0]["engine/logprob_abs_diff_mean"]
    )
    assert ranks[0]["completions"] != ranks[1]["completions"]  # each rank sampled its own prompts
