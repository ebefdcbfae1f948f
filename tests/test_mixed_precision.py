"""mixed_precision='bf16': bfloat16 autocast for the forward passes, float32 everywhere else."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForCausalLM

from gspo.config import ConfigError
from gspo.kernels import label_logprob
from gspo.logprobs import HeadMode, completion_logprobs
from gspo.models import autocast, mixed_precision_mode
from gspo.trainer import GSPOTrainer


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def test_config_names_the_field_and_what_is_allowed(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"mixed_precision='fp16'.*\['no', 'bf16'\]"):
        small_config(tiny_model_dir, tmp_path, mixed_precision="fp16")
    with pytest.raises(ConfigError, match=r"mixed_precision='bf16'.*float16"):
        small_config(tiny_model_dir, tmp_path, mixed_precision="bf16", torch_dtype="float16")


def test_launcher_setting_is_adopted_or_refused(tiny_model_dir, tmp_path, monkeypatch):
    cfg_no = small_config(tiny_model_dir, tmp_path)
    cfg_bf16 = small_config(tiny_model_dir, tmp_path, mixed_precision="bf16")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert mixed_precision_mode(cfg_no, deepspeed=False) == "no"
    assert mixed_precision_mode(cfg_bf16, deepspeed=False) == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert mixed_precision_mode(cfg_no, deepspeed=False) == "bf16"
    assert mixed_precision_mode(cfg_no, deepspeed=True) == "no"  # the DeepSpeed engine's own bf16
    with pytest.raises(ConfigError, match="under DeepSpeed"):
        mixed_precision_mode(cfg_bf16, deepspeed=True)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="fp16 is not supported"):
        mixed_precision_mode(cfg_no, deepspeed=False)


def test_label_logprob_stays_float32_under_autocast():
    # bmm (the entropy's dot product) is on CPU autocast's bfloat16 list: the Function must opt out.
    torch.manual_seed(0)
    logits = torch.randn(16, 3000) * 4
    labels = torch.randint(0, 3000, (16,))
    plain_lp, plain_h = label_logprob(logits, labels, with_entropy=True)
    with autocast(torch.device("cpu"), "bf16"):
        lp, h = label_logprob(logits, labels, with_entropy=True)
    assert lp.dtype == h.dtype == torch.float32
    torch.testing.assert_close(lp, plain_lp, rtol=0, atol=0)
    torch.testing.assert_close(h, plain_h, rtol=0, atol=0)


def test_bf16_log_probs_and_gradients_track_float32(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (4, 6))
    completion = torch.randint(3, vocab, (4, 5))
    ones_p, ones_c = torch.ones_like(prompt), torch.ones_like(completion)
    results = []
    for mode in ("no", "bf16"):
        model.zero_grad(set_to_none=True)
        with autocast(torch.device("cpu"), mode):
            logp, _ = completion_logprobs(
                model, prompt, ones_p, completion, ones_c, temperature=0.7, head=HeadMode.CHUNKED
            )
        logp.sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((logp.detach(), grad))
    (lp32, g32), (lp16, g16) = results
    assert lp16.dtype == torch.float32
    # bfloat16 keeps 8 significant bits (relative error 2^-9 ~ 0.002 per rounding): log-probs of ~-3.0 moved
    # by at most 0.0026 through 2 layers and the head (measured); gradient cosine measured 0.999994.
    assert (lp16 - lp32).abs().max() < 0.01
    assert not torch.equal(lp16, lp32)  # the matmuls really ran in bfloat16
    cosine = torch.nn.functional.cosine_similarity(g16, g32, dim=0)
    assert cosine > 0.9999, float(cosine)


def test_bf16_training_keeps_float32_master_weights(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        mixed_precision="bf16",
        batch_size=2,
        group_size=4,
        kl_coef=0.1,
        adaptive_kl=False,
        max_steps=2,
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    seen = {}  # Linear module -> output dtypes over generation, reference and training passes
    for name, module in trainer.model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, a, out, n=name: seen.setdefault(n, set()).add(out.dtype))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    history = trainer.train(arithmetic_rows)
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen.values()), seen
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    states = [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim()]
    assert states and all(v.dtype == torch.float32 for v in states)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    for m in history:
        assert all(math.isfinite(m[k]) for k in ("loss", "kl_divergence", "entropy", "grad_norm"))
    # Before the first update the policy is the reference, and both passes run the same bf16 kernels on
    # the same rows: the KL is exactly 0, not bfloat16 noise.
    assert history[0]["kl_divergence"] == 0.0
    assert history[1]["kl_divergence"] > 0.0


def test_bf16_with_lora_trains_the_adapters_only(tiny_model_dir, arithmetic_rows, tmp_path):
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        mixed_precision="bf16",
        use_lora=True,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj"],
        batch_size=2,
        group_size=4,
        kl_coef=0.1,
        adaptive_kl=False,
        max_steps=2,
        learning_rate=1e-2,
    )
    trainer = GSPOTrainer(cfg, reward_funcs=[length_reward])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    history = trainer.train(arithmetic_rows)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed), changed
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    # LoRA's B starts at 0: the policy equals its adapter-free reference until the first update.
    assert history[0]["kl_divergence"] == 0.0
    assert all(math.isfinite(m["loss"]) for m in history)
