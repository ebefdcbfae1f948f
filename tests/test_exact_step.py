"""One training step on a fixed model and fixed rollouts, against an independent computation.

The rollout engine and the optimizer are injected through GSPOTrainer's constructor (no patching):
the engine returns hand-written completions, the optimizer is plain SGD. The expected loss,
gradient norm and parameter update are computed here from scratch: one model forward per
sequence, log_softmax, GSPO's Eq. 5-7 written out, autograd, then SGD's p - lr * clip * g.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_config
from transformers import AutoModelForCausalLM

from gspo.engines import RolloutEngine
from gspo.models import load_tokenizer
from gspo.rollout import assemble_rollout, left_pad
from gspo.trainer import GSPOTrainer

COMPLETIONS = {"1+2=": ["3", "12"], "4+4=": ["8", "88"]}  # per prompt: the correct answer first
ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "4+4=", "answer": "8"}]
LR = 0.1


class FixedEngine(RolloutEngine):
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def generate(self, rows, *, group_size, sampling):
        tok, eos = self.tok, self.tok.eos_token_id
        ids = [tok.encode(c) + [eos] for r in rows for c in COMPLETIONS[r["prompt"]][:group_size]]
        width = max(len(x) for x in ids)
        completion_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
        prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], tok.pad_token_id)
        return assemble_rollout(
            tok,
            rows,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            group_size=group_size,
            eos=[eos],
            pad_id=tok.pad_token_id,
        )


def expected_step(model_dir, max_grad_norm):
    """(loss, grad norm, updated parameters) computed without gspo."""
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # rewards (exact_answer): 1, 0 in each group; relative advantages r - mean: +0.5, -0.5, +0.5, -0.5
    terms = []
    for prompt, completions in COMPLETIONS.items():
        for completion, advantage in zip(completions, (0.5, -0.5)):
            p, c = tok.encode(prompt), tok.encode(completion) + [tok.eos_token_id]
            logits = model(torch.tensor([p + c])).logits[0]  # [len(p) + len(c), V]
            logp = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1).gather(1, torch.tensor(c)[:, None])[:, 0]
            s = torch.exp((logp - logp.detach()).mean())  # Eq. 7 on-policy: pi_old = pi_theta, s_i = 1
            terms.append(torch.min(s * advantage, s.clamp(1 - 3e-4, 1 + 4e-4) * advantage))  # Eq. 5
    loss = -torch.stack(terms).mean()  # = -(0.5 - 0.5 + 0.5 - 0.5) / 4 = 0, with a non-zero gradient
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    clip = min(1.0, max_grad_norm / (norm + 1e-6))  # torch's clip_grad_norm_ rule
    updated = {n: (p - LR * clip * grads[n]).detach() for n, p in model.named_parameters()}
    return loss.item(), norm, updated


@pytest.mark.parametrize("max_grad_norm", [1e6, 0.1])  # clipping off; clipping active (norm 1.77)
def test_one_step_loss_grad_norm_and_update_match_an_independent_computation(tiny_model_dir, tmp_path, max_grad_norm):
    cfg = small_config(
        tiny_model_dir,
        tmp_path,
        max_steps=1,
        kl_coef=0.0,
        adaptive_kl=False,
        entropy_coef=0.0,
        use_group_normalization=False,
        advantage_type="relative",
        max_grad_norm=max_grad_norm,
        gspo_epochs=1,
        num_mini_batches=1,
        save_steps=0,
    )
    trainer = GSPOTrainer(
        cfg,
        rollout_engine=FixedEngine(load_tokenizer(tiny_model_dir)),
        optimizer_factory=lambda params: torch.optim.SGD(params, lr=LR),
    )
    metrics = trainer.train(ROWS)[0]
    loss, norm, updated = expected_step(tiny_model_dir, max_grad_norm)
    assert metrics["raw_reward_mean"] == 0.5 and metrics["frac_reward_zero_std"] == 0.0
    assert abs(metrics["policy_loss"] - loss) < 1e-7 and abs(loss) < 1e-7
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5) and norm > 1e-3
    for name, p in trainer.policy.unwrapped().named_parameters():
        assert torch.allclose(p.detach(), updated[name], rtol=0, atol=1e-7), name
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    step = max((updated[n] - before[n]).abs().max().item() for n in updated)
    assert step > 1e-4  # the update is far larger than the tolerance: the comparison means something


class SyncRecordingEngine(FixedEngine):
    """Records every sync_weights call with the parameters it was handed, as an engine with its own copy would."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.synced = []

    def sync_weights(self, model):
        self.synced.append((model, {n: p.detach().clone() for n, p in model.unwrapped().named_parameters()}))


def test_the_engine_is_synced_once_per_step_with_the_updated_weights(tiny_model_dir, tmp_path):
    engine = SyncRecordingEngine(load_tokenizer(tiny_model_dir))
    cfg = small_config(tiny_model_dir, tmp_path, max_steps=2, kl_coef=0.0, adaptive_kl=False, gspo_epochs=2)
    trainer = GSPOTrainer(cfg, rollout_engine=engine)
    history = trainer.train(ROWS)
    assert [m is trainer.policy for m, _ in engine.synced] == [True, True]  # after each step's updates
    final = {n: p.detach() for n, p in trainer.policy.unwrapped().named_parameters()}
    assert all(torch.equal(engine.synced[-1][1][n], final[n]) for n in final)  # the last sync saw the final weights
    assert any(not torch.equal(engine.synced[0][1][n], final[n]) for n in final)  # step 2 changed them again
    assert all("time/weight_sync_s" in m for m in history)
