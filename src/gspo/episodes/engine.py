"""MultiTurnEngine: multi-turn episodes behind the rollout-engine interface, token-exact.

It wraps a rollout engine (transformers or vLLM) and runs the batch's episodes turn by turn: every unfinished
episode's context (prompt ids + everything so far) goes to the inner engine in one batched `generate`, the
sampled ids are kept as sampled, the episode kind (tools or an environment) answers each turn, and the
template's tokens for that answer (gspo.episodes.template) are appended. The producer, the learner and
evaluation see an ordinary Rollout:

    completion = turn_1 ids | inserted ids | turn_2 ids | inserted ids | ... | turn_k ids
    completion_mask  1 on all of it (attention)
    loss_mask        1 on the model's sampled ids (each turn's end-of-turn token included), 0 on inserted ones
    engine_logprobs  the inner engine's log-probs on sampled ids (vLLM), 0 on inserted ones

so log-probs, GSPO's |y_i| and sequence ratio (Eq. 7, over all the episode's model tokens), entropy, KL and
the engine-mismatch metrics count the model's tokens only.

Limits: max_turns model turns; max_episode_tokens completion tokens in all (inserted ones included), never past
the model's positions; a turn is at most max_new_tokens. An episode cut by a limit is truncated (and
mask_truncated_completions applies to it); a turn that ends without end-of-turn ends its episode, truncated.

Ranks: the session makes the inner engine's weights whole once (a sharded back-end's collective). With several
processes every rank runs as many turns as the rank with the longest episodes (`turn_sync`; a rank whose
episodes ended generates for a placeholder and drops it): under ZeRO-3 each forward, generation's included, can
be a collective, so ranks whose episodes take different numbers of turns must still run the same forwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from gspo.engines.base import RolloutEngine, SamplingParams
from gspo.rollout import Rollout, left_pad, row_extras

STATS = ("turns", "tool_calls", "tool_failures", "environment_errors", "model_tokens", "inserted_tokens")
log = logging.getLogger("gspo")


@dataclass
class Episode:
    row: dict
    messages: list
    prompt_text: str
    prompt_ids: list
    limit: int  # most completion tokens: max_episode_tokens, capped by the model's positions
    state: object = None
    ids: list = field(default_factory=list)
    model: list = field(default_factory=list)  # 1 where the model sampled the token
    logprobs: list = field(default_factory=list)
    last_text: str = ""
    reward: float = 0.0
    stats: dict = field(default_factory=lambda: dict.fromkeys(STATS, 0))
    sampled_eos: Optional[int] = None  # the end-of-turn id the model's last turn closed with
    done: bool = False
    truncated: bool = False


class MultiTurnEngine(RolloutEngine):
    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer,
        kind,
        template,
        *,
        max_turns: int,
        max_episode_tokens: int,
        max_response_tokens: int,
        max_positions: Optional[int],
        max_prompt_length: Optional[int] = None,
        eos: list,
        turn_sync: Optional[Callable[[bool], bool]] = None,
    ) -> None:
        """`turn_sync(this rank has unfinished episodes) -> any rank has`: with several processes, every rank runs
        as many turns as the rank with the longest episodes (a rank whose episodes ended generates for a
        placeholder context and drops it), so that a back-end whose forwards are collectives (ZeRO-3) never waits
        on a rank that stopped generating."""
        self.engine, self.tokenizer, self.kind, self.template = engine, tokenizer, kind, template
        self.max_turns, self.max_episode_tokens = max_turns, max_episode_tokens
        self.max_response_tokens, self.max_positions = max_response_tokens, max_positions
        self.max_prompt_length, self.eos, self.turn_sync = max_prompt_length, list(eos), turn_sync
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self._context_tokens = self._cached_tokens = 0  # a generate's context tokens, and those the cache held
        template.check_prefix_preserving(kind.observation_role)

    # the inner engine's lifecycle, unchanged
    def session(self):
        return self.engine.session()

    def close(self) -> None:
        self.engine.close()

    def release_memory(self) -> None:
        self.engine.release_memory()

    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def generate(self, rows: list, *, group_size: int, sampling: SamplingParams) -> Rollout:
        episodes = []
        with self.engine.session():
            try:
                for row in rows:
                    for _ in range(group_size):
                        episodes.append(self._start(row))
                logprobs = sampling.do_sample  # the inner engine's log-probs, when every turn came with them
                self._context_tokens = self._cached_tokens = 0
                for turn in range(self.max_turns):
                    active = [e for e in episodes if not e.done]
                    if not (self.turn_sync(bool(active)) if self.turn_sync else active):
                        break  # no rank has an unfinished episode
                    if not active:
                        self._placeholder_turn(episodes[0], sampling)  # another rank still generates
                        continue
                    logprobs &= self._model_turn(active, sampling)
                    for e in active:
                        if not e.done:
                            self._environment_turn(e, last_turn=turn == self.max_turns - 1)
            except BaseException:
                _close_all(self.kind, [e.state for e in episodes], failed=True)
                raise
            _close_all(self.kind, [e.state for e in episodes], failed=False)
        rollout = self._assemble(episodes, group_size, with_logprobs=logprobs)
        if not self._context_tokens:
            return rollout
        hit = self._cached_tokens / self._context_tokens  # an engine with a prefix cache (vLLM) says how much
        return rollout.with_(info={"metrics": {"episode/prefix_cache_hit_fraction": hit}})

    # ------------------------------------------------------------------ one episode
    def _start(self, row: dict) -> Episode:
        columns = {k: v for k, v in row.items() if k not in ("prompt_ids", "prompt_messages")}
        state, first = self.kind.start(columns)
        try:
            return self._first_context(row, first, state)
        except BaseException:
            _close_all(self.kind, [state], failed=True)  # this episode is not in the batch's list yet
            raise

    def _first_context(self, row: dict, first, state) -> Episode:
        messages = list(first) if first is not None else list(row.get("prompt_messages") or [_user(row["prompt"])])
        text, ids = self.template.prompt_ids(messages)
        if self.max_prompt_length is not None and len(ids) > self.max_prompt_length:
            raise ValueError(
                f"the episode's first context is {len(ids)} tokens with the tools and the template, longer than "
                f"max_prompt_length={self.max_prompt_length} (prompt {str(row.get('prompt'))[:80]!r}); raise "
                "max_prompt_length"
            )
        room = self.max_episode_tokens if self.max_positions is None else self.max_positions - len(ids)
        limit = min(self.max_episode_tokens, room)
        if limit < 1:
            raise ValueError(
                f"the episode's first context is {len(ids)} tokens, and the model (or the engine) has "
                f"{self.max_positions} positions: no room for a completion"
            )
        return Episode(row=row, messages=messages, prompt_text=text, prompt_ids=ids, limit=limit, state=state)

    def _model_turn(self, active: list, sampling: SamplingParams) -> bool:
        """One batched generate over every unfinished episode's whole context; whether it gave log-probs."""
        budgets = [min(sampling.max_new_tokens, e.limit - len(e.ids)) for e in active]
        contexts = [{"prompt": e.prompt_text, "prompt_ids": e.prompt_ids + e.ids} for e in active]
        out = self.engine.generate(contexts, group_size=1, sampling=replace(sampling, max_new_tokens=max(budgets)))
        for i, (e, budget) in enumerate(zip(active, budgets)):
            n = int(out.completion_mask[i].sum())
            ids = out.completion_ids[i, :n].tolist()
            ended = not bool(out.truncated[i])  # the turn closed with an end-of-turn token
            if n > budget:  # sampled past this episode's own budget: keep the first `budget` (a prefix of a
                ids, n, ended = ids[:budget], budget, False  # sample is a sample of the prefix)
            logp = out.engine_logprobs[i, :n].tolist() if out.engine_logprobs is not None else [0.0] * n
            e.ids += ids
            e.model += [1] * n
            e.stats["model_tokens"] += n
            e.logprobs += logp
            e.stats["turns"] += 1
            body = ids[:-1] if ended else ids
            e.last_text = self.tokenizer.decode(body, skip_special_tokens=True)
            e.messages.append({"role": "assistant", "content": e.last_text})
            if not ended:
                e.done = e.truncated = True
            e.sampled_eos = ids[-1] if ended else None
        self._context_tokens += out.info.get("prompt_tokens", 0)
        self._cached_tokens += out.info.get("cached_tokens", 0)
        return out.engine_logprobs is not None

    def _placeholder_turn(self, e: Episode, sampling: SamplingParams) -> None:
        """A generate whose result is dropped, on a rank with no unfinished episode while another rank has some."""
        self.engine.generate([{"prompt": e.prompt_text, "prompt_ids": e.prompt_ids}], group_size=1, sampling=sampling)

    def _environment_turn(self, e: Episode, *, last_turn: bool) -> None:
        reply = self.kind.step(e.state, e.last_text)
        e.reward = reply.reward if reply.error else e.reward + reply.reward  # a failed step: the penalty, alone
        e.stats["tool_calls"] += reply.calls
        e.stats["tool_failures"] += reply.failures
        e.stats["environment_errors"] += int(reply.error)
        if reply.done:
            e.done = True
            return
        if last_turn:  # the episode wanted another turn: cut by max_turns
            e.done = e.truncated = True
            return
        new = [self._bounded(m) for m in reply.messages]
        inserted = self.template.between_turns(e.messages, new, e.sampled_eos)
        if len(e.ids) + len(inserted) >= e.limit:  # no room left for the model's next turn
            e.done = e.truncated = True
            return
        e.ids += inserted
        e.model += [0] * len(inserted)
        e.stats["inserted_tokens"] += len(inserted)
        e.logprobs += [0.0] * len(inserted)
        e.messages += new

    def _bounded(self, message: dict) -> dict:
        """A tool result or observation cut to max_tool_response_tokens tokens, and marked as cut."""
        content = message.get("content")
        if not isinstance(content, str):
            return message
        ids = self.tokenizer.encode(content, add_special_tokens=False)
        if len(ids) <= self.max_response_tokens:
            return message
        kept = self.tokenizer.decode(ids[: self.max_response_tokens], skip_special_tokens=True)
        return {**message, "content": f"{kept} [cut: {len(ids) - self.max_response_tokens} more tokens]"}

    # ------------------------------------------------------------------ the Rollout
    def _assemble(self, episodes: list, group_size: int, *, with_logprobs: bool) -> Rollout:
        prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], self.pad_id)
        width = max(len(e.ids) for e in episodes)
        n = len(episodes)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask, model = torch.zeros((n, width), dtype=torch.long), torch.zeros((n, width), dtype=torch.long)
        logprobs = torch.zeros((n, width), dtype=torch.float32)
        for i, e in enumerate(episodes):
            k = len(e.ids)
            ids[i, :k], mask[i, :k] = torch.tensor(e.ids, dtype=torch.long), 1
            model[i, :k], logprobs[i, :k] = torch.tensor(e.model), torch.tensor(e.logprobs)
        rows = [e.row for e in episodes]
        return Rollout(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=ids,
            completion_mask=mask,
            loss_mask=model,
            truncated=torch.tensor([e.truncated for e in episodes], dtype=torch.bool),
            group_size=group_size,
            prompts=[e.prompt_text for e in episodes],
            completions=[e.last_text for e in episodes],
            extra=row_extras(rows, repeat=1),
            messages=[e.messages for e in episodes],
            environment_rewards=torch.tensor([e.reward for e in episodes], dtype=torch.float32)
            if self.kind.rewards
            else None,
            episode_stats={k: torch.tensor([float(e.stats[k]) for e in episodes]) for k in STATS},
            engine_logprobs=logprobs * model if with_logprobs else None,
        )


def _close_all(kind, states: list, *, failed: bool) -> None:
    """Close every episode's state, each on its own: one close that raises does not skip the others. After a
    failure (`failed`) a close error is only logged, so the error that ended the batch is the one raised."""
    errors = []
    for state in states:
        try:
            kind.close(state)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    if errors and failed:
        log.warning(
            "gspo: %d environment close() calls raised while a batch of episodes failed; the first: %r",
            len(errors),
            errors[0],
        )
    elif errors:
        raise errors[0]


def _user(text: str) -> dict:
    return {"role": "user", "content": text}
