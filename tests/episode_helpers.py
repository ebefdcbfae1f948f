"""Shared pieces of the multi-turn tests: a scripted rollout engine, a random tiny model with the tool task's
tokenizer (its chat template), and small environments."""

from __future__ import annotations

import torch

from gspo.engines.base import RolloutEngine
from gspo.rollout import assemble_rollout, left_pad


class ScriptedEngine(RolloutEngine):
    """A rollout engine whose 'samples' are `script(call_index, context_ids) -> text`, encoded and closed with EOS
    (unless the text ends with '...', then it is cut off, as a turn without EOS). Each token's log-prob is
    -0.01 * (its position in the turn + 1), so their placement can be checked (`logprobs=False`: none, as the
    transformers engine; a trainer's stale-engine guard would rightly reject the made-up ones). It records every
    context."""

    def __init__(self, tokenizer, script, logprobs: bool = True) -> None:
        self.tokenizer, self.script, self.contexts, self.logprobs = tokenizer, script, [], logprobs

    def generate(self, rows, *, group_size, sampling):
        assert group_size == 1  # episodes are generated one context per row
        self.contexts.append([list(r["prompt_ids"]) for r in rows])
        turns = []
        for r in rows:
            text = self.script(len(self.contexts) - 1, list(r["prompt_ids"]))
            cut = text.endswith("...")
            ids = self.tokenizer.encode(text[:-3] if cut else text, add_special_tokens=False)
            turns.append((ids if cut else ids + [self.tokenizer.eos_token_id])[: sampling.max_new_tokens])
        width = max(len(t) for t in turns)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([t + [pad] * (width - len(t)) for t in turns])
        prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], pad)
        rollout = assemble_rollout(
            self.tokenizer,
            rows,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=ids,
            group_size=1,
            eos=[self.tokenizer.eos_token_id],
            pad_id=pad,
        )
        if not self.logprobs:
            return rollout
        logp = -0.01 * torch.arange(1, width + 1, dtype=torch.float32).expand(len(rows), width)
        return rollout.with_(engine_logprobs=logp * rollout.completion_mask)


def tools_tokenizer():
    from gspo.tasks.tool_use import build_tokenizer

    return build_tokenizer()


def random_tools_model(tokenizer, seed: int = 0, tied: bool = True):
    """`tied=False`: an untied output head, whose greedy choices vary with the context (a random tied model
    mostly repeats its last input token)."""
    from gspo.tasks.tiny_model import build_model

    torch.manual_seed(seed)
    model = build_model(
        tokenizer,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    return model.eval()


def user_row(text: str, **extra) -> dict:
    return {"prompt": text, "prompt_ids": [], "prompt_messages": [{"role": "user", "content": text}], **extra}


class CountdownEnv:
    """Replies 'again' until the model has spoken `turns` times (from the row), rewarding 0.5 per step, then done
    with reward 1. Counts its instances' close() calls."""

    closed = 0

    def reset(self, prompt=None, turns=2, **row):
        self.left = int(turns)
        return None

    def step(self, text):
        self.left -= 1
        if self.left <= 0:
            return None, True, 1.0
        return "again", False, 0.5

    def close(self):
        type(self).closed += 1
