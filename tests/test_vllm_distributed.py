"""Two CPU processes (gloo), each rank with its own in-process vLLM engine
(distributed_executor_backend='external_launcher'), under DDP, FSDP2, DeepSpeed ZeRO-3 and FSDP2 with LoRA:
each rank's engine matches its trainer after every step (the sync gathered the sharded weights one at a
time; LoRA adapters merged from the gathered shards), the ranks agree, and the three full-weight back-ends
end at the same weights (same rollouts: the per-prompt seeds come from each rank's torch RNG, the same under
every back-end)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import vllm_or_skip

from test_distributed import accelerate_launch

vllm_or_skip()
pytestmark = pytest.mark.vllm
HERE = Path(__file__).parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(backend: str, model_dir: Path, out: Path) -> None:
    port = _free_port()
    worker = [str(HERE / "vllm_worker.py"), "--model_dir", str(model_dir), "--out", str(out), "--backend", backend]
    if backend == "zero3":
        cmd = accelerate_launch(HERE.parent / "examples" / "accelerate" / "deepspeed_zero3.yaml", port, *worker)
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port)] + worker
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from gspo.tasks.tiny_model import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("vllm-dist")
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    results = {"initial": {k: v.detach().clone() for k, v in model.named_parameters()}}
    for backend in ("ddp", "fsdp2", "zero3", "fsdp2_lora"):
        _launch(backend, root / "model", root / backend)
        results[backend] = [torch.load(root / backend / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return results


@pytest.mark.parametrize("backend", ["ddp", "fsdp2", "zero3", "fsdp2_lora"])
def test_each_rank_engine_tracks_its_trainer_and_ranks_agree(runs, backend):
    ranks = runs[backend]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    for r in ranks:
        assert len(r["history"]) == 2
        for m in r["history"]:
            assert m["engine/logprob_abs_diff_max"] < 1e-4, m
            assert m["grad_norm"] > 0
    assert ranks[0]["completions"] != ranks[1]["completions"]  # each rank sampled its own prompts


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_sharded_back_ends_end_where_ddp_does(runs, backend):
    ddp, other = runs["ddp"][0]["params"], runs[backend][0]["params"]
    assert set(ddp) == set(other)
    worst = max((ddp[k] - other[k]).abs().max().item() for k in ddp)
    # measured: ZeRO-3 1.6e-5 (DeepSpeed sums gradients in another order; AdamW at lr 3e-3 amplifies it),
    # FSDP2 below 1e-5
    assert worst < 5e-5, worst
    moved = max((ddp[k] - runs["initial"][k]).abs().max().item() for k in ddp)
    assert moved > 1e-3  # the two updates changed the weights far beyond the back-ends' difference
