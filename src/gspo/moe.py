"""Mixture-of-Experts policies: their routers' choices recorded during the passes that already run, replayed
(Routing Replay), compared with pi_old's (expert volatility), and their load-balancing loss over real tokens.

transformers' MoE causal LMs (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, ...) route through a `*TopKRouter` module
per layer that returns `(router_logits [tokens, E], router_scores [tokens, k], router_indices [tokens, k])`
for the layer's flattened [batch * length] tokens. Everything here hooks those modules (PyTorch forward hooks,
no model code copied):

* recording: each router's indices, written into a [rows, layers, length, k] buffer at the rows the caller
  names (`RouterHooks.tracking`), and, with grad, its logits for the auxiliary loss;
* replay: the router's indices replaced by recorded ones; the scores are recomputed from the live logits at
  those indices (softmax, gather, renormalised where the router renormalises), so only *which* experts is
  replayed and the router still gets its gradient.

Nothing happens outside a `tracking` block (generation, the reference pass, a recompute in backward).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

ROUTER_SUFFIX = "TopKRouter"


def find_routers(model) -> list:
    """The model's routers, in layer order: modules whose class name ends with 'TopKRouter'."""
    return [m for _, m in model.named_modules() if type(m).__name__.endswith(ROUTER_SUFFIX)]


def is_moe(model) -> bool:
    return bool(find_routers(model))


def router_top_k(model) -> int:
    return int(find_routers(model)[0].top_k)


def num_experts(model) -> int:
    return int(find_routers(model)[0].num_experts)


def replayed_scores(router, logits: torch.Tensor, indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The router's scores at given expert `indices`, from its live `logits`: softmax in float32, gathered,
    renormalised over the k chosen where the router does it (Mixtral always; others by norm_topk_prob), in the
    dtype of the scores it returned (`like`). At the router's own indices this equals its own scores exactly."""
    probs = torch.softmax(logits.float(), dim=-1)  # [tokens, E]
    top = probs.gather(-1, indices)  # [tokens, k]
    if getattr(router, "norm_topk_prob", True):
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(like.dtype)


@dataclass
class _Pass:
    rows: torch.Tensor  # [n] rollout rows of this forward's batch
    record_rows: torch.Tensor  # [n] rows of `record` the batch's routes go to
    record: Optional[torch.Tensor]  # [R, layers, L, k] written at `record_rows` (None: not recording)
    replay: Optional[torch.Tensor]  # [R, layers, L, k] read at `replay_rows` (None: the router's own choice; -1: too)
    replay_rows: torch.Tensor  # [n]
    logits: Optional[list]  # with grad: each layer's [n * L, E] router logits, for the auxiliary loss


class RouterHooks:
    """Forward hooks on every router of `model`, active only inside `tracking(...)`."""

    def __init__(self, model) -> None:
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE router ('*{ROUTER_SUFFIX}' module) to hook")
        self.layer_of = {id(r): i for i, r in enumerate(self.routers)}
        self.top_k, self.num_experts = int(self.routers[0].top_k), int(self.routers[0].num_experts)
        self._pass: Optional[_Pass] = None
        self._generation: Optional[list] = None  # per layer: each generate forward's [rows * new tokens, k]
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def buffer(self, rows: int, length: int) -> torch.Tensor:
        """An empty route buffer for `rows` sequences of `length` tokens: [rows, layers, length, k]."""
        return torch.zeros(rows, self.num_layers, length, self.top_k, dtype=torch.int16)

    @contextlib.contextmanager
    def tracking(
        self, rows: torch.Tensor, *, record=None, record_rows=None, replay=None, replay_rows=None, aux: bool = False
    ):
        """Inside: the routers of one forward over the rollout rows `rows` (full width: no column trimmed) write
        their own choices into `record` (at `record_rows`, default `rows`), take the experts from `replay` (at
        `replay_rows`, default `rows`; an index of -1 keeps the router's own), and keep their logits (`aux`);
        yields the list the logits go to."""
        logits: Optional[list] = [] if aux else None
        rows = rows.cpu()
        self._pass = _Pass(
            rows=rows,
            record_rows=rows if record_rows is None else record_rows.cpu(),
            record=record,
            replay=replay,
            replay_rows=rows if replay_rows is None else replay_rows.cpu(),
            logits=logits,
        )
        try:
            yield logits
        finally:
            self._pass = None

    def _hook(self, router, args, output):
        if self._generation is not None:  # the rollout engine's own choices, step by step (R3)
            self._generation[self.layer_of[id(router)]].append(output[2].detach().to("cpu", torch.int16))
            return None
        p = self._pass
        if p is None:
            return None
        logits, scores, indices = output
        layer = self.layer_of[id(router)]
        n = len(p.rows)
        if p.record is not None:  # the router's own choice, also under replay (the volatility compares it)
            p.record[p.record_rows, layer] = indices.detach().view(n, -1, self.top_k).to("cpu", torch.int16)
        if p.logits is not None and torch.is_grad_enabled():
            p.logits.append(logits)
        if p.replay is None:
            return None
        old = p.replay[p.replay_rows, layer].reshape(-1, self.top_k).to(indices.device, indices.dtype)  # [n * L, k]
        old = torch.where(old >= 0, old, indices)  # -1: no recorded choice (a position the engine never routed)
        return logits, replayed_scores(router, logits, old, scores), old

    @contextlib.contextmanager
    def generation(self, rows: int, width: int):
        """Around one `generate` over `rows` sequences whose prompts are `width` columns: records the experts the
        routers chose for every position the model processed (the prefill, then one token per step). Yields a
        function returning them as [rows, layers, width + T, k] for T completion columns; -1 where no forward
        routed a position (the last completion token is sampled, never fed back)."""
        self._generation = [[] for _ in self.routers]

        def routes(completion_width: int) -> torch.Tensor:
            out = torch.full((rows, self.num_layers, width + completion_width, self.top_k), -1, dtype=torch.int16)
            for layer, calls in enumerate(recorded):
                seen = torch.cat([c.view(rows, -1, self.top_k) for c in calls], dim=1)[:, : width + completion_width]
                out[:, layer, : seen.shape[1]] = seen
            return out

        try:
            yield routes
        finally:
            recorded, self._generation = self._generation, None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def route_changes(
    old: torch.Tensor,  # [n, layers, L, k] expert indices under pi_old
    new: torch.Tensor,  # [n, layers, L, k] under the current weights
    mask: torch.Tensor,  # [n, L] 1 on the tokens counted (the policy's tokens)
) -> torch.Tensor:  # [layers, 2] (changed choices, all choices) over the masked tokens
    """Per layer, how many of the k expert choices of the masked tokens differ between the two routings, as
    sets (the same experts in another order is no change), and how many choices there were."""
    k = old.shape[-1]
    same = (new.unsqueeze(-1) == old.unsqueeze(-2)).any(dim=-1).sum(dim=-1)  # [n, layers, L] kept choices
    weights = mask.to(torch.float64)[:, None, :]  # [n, 1, L]
    changed = ((k - same).to(torch.float64) * weights).sum(dim=(0, 2))  # [layers]
    total = (weights.expand(-1, old.shape[1], -1) * k).sum(dim=(0, 2))
    return torch.stack([changed, total], dim=1)


def load_balancing_loss(
    router_logits: list,  # layers x [n * L, E] logits of one forward
    attention_mask: torch.Tensor,  # [n, L] 1 on real tokens
    top_k: int,
) -> torch.Tensor:  # [] the Switch Transformer loss, summed over layers as transformers does
    """E * sum_e f_e * P_e over the real tokens of every layer (Switch Transformer, arXiv 2101.03961, Eq. 4-6),
    with f_e the share of top-k assignments to expert e and P_e its mean router probability, both over all
    layers' real tokens (transformers' load_balancing_loss_func with an attention mask); padding never counts."""
    num_experts = router_logits[0].shape[-1]
    mask = attention_mask.reshape(-1).to(router_logits[0].device, torch.float32)  # [n * L]
    assigned = torch.zeros(num_experts, device=mask.device)
    prob_sum = torch.zeros(num_experts, device=mask.device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # [n * L, E]
        chosen = probs.topk(top_k, dim=-1).indices  # [n * L, k]
        assigned = assigned.scatter_add(0, chosen.reshape(-1), mask.repeat_interleave(top_k))  # Eq. 5 counts
        prob_sum = prob_sum + (probs * mask[:, None]).sum(dim=0)  # Eq. 6 sums
    rows = mask.sum() * len(router_logits)
    return num_experts * (assigned / rows * prob_sum / rows).sum()  # Eq. 4


# ----------------------------------------------------------------------------------
# What a run does with an MoE policy's routes: chosen once (build_routing); a dense policy gets DenseRouting
# ----------------------------------------------------------------------------------
class DenseRouting:
    """A dense policy: nothing to record, replay or add. The same interface as MoERouting."""

    full_width = False  # log-prob passes may trim padding columns
    records_old = False
    aux_coef = 0.0
    engine_hooks = None

    def old_pass(self, rows, record):
        return contextlib.nullcontext()

    def train_pass(self, rows, *, old, record, attention_mask, count_mask, engine_routes=None):
        return contextlib.nullcontext(_NoMoE())

    def buffer(self, rows: int, length: int):
        return None

    def step_metrics(self, reduce) -> dict:
        return {}


class _NoMoE:
    def aux_loss(self):
        return None


class _TrainPass:
    """One training forward's MoE results: the load-balancing loss (with grad) and the route changes."""

    def __init__(self, routing: "MoERouting", logits: Optional[list], attention_mask) -> None:
        self.routing, self.logits, self.attention_mask = routing, logits, attention_mask

    def aux_loss(self) -> Optional[torch.Tensor]:
        if not self.logits:
            return None
        return load_balancing_loss(self.logits, self.attention_mask, self.routing.hooks.top_k)


class MoERouting:
    """An MoE policy's routes in a run: the load-balancing loss (`aux_coef`), expert volatility against pi_old
    (`measure`) and Routing Replay ("old": pi_theta's passes use pi_old's experts). The routes of pi_old come
    from the pass that defines pi_old: the producer's no-grad pass (Rollout.old_routes) or the learner's first
    epoch. Log-prob passes run at full width (no padding column trimmed) so a row's routes line up with it."""

    def __init__(self, hooks: RouterHooks, *, aux_coef: float, replay: str, measure: bool) -> None:
        self.hooks, self.aux_coef, self.replay, self.measure = hooks, float(aux_coef), replay, measure
        self.full_width = replay != "none" or measure
        self.records_old = replay == "old" or measure
        self.engine_hooks = hooks if replay == "rollout" else None  # the HF engine records its choices (R3)
        self._changes = torch.zeros(hooks.num_layers, 2, dtype=torch.float64)  # this step's (changed, all)
        self._replay_bytes = 0

    def buffer(self, rows: int, length: int) -> Optional[torch.Tensor]:
        """A buffer for pi_old's routes of `rows` sequences (None when neither replay nor the metric needs them)."""
        if not self.records_old:
            return None
        buf = self.hooks.buffer(rows, length)
        self._replay_bytes = buf.numel() * buf.element_size()
        return buf

    def old_pass(self, rows, record):
        """Around a pass that defines pi_old (no grad): its routes go into `record`."""
        return self.hooks.tracking(rows, record=record)

    @contextlib.contextmanager
    def train_pass(self, rows, *, old, record, attention_mask, count_mask, engine_routes=None):
        """Around one training forward over rollout rows `rows`: `old` is pi_old's routes ([N, layers, L, k], or
        None where none exist yet), `record` a buffer this pass fills as pi_old's (the learner's first epoch), or
        None; the routes are compared with `old` over `count_mask` ([n, L]: the policy's tokens).
        `engine_routes`: this micro-batch's [n, layers, L, k] experts the rollout engine chose (replay 'rollout')."""
        rows = rows.cpu()
        mine = self.hooks.buffer(len(rows), old.shape[2]) if (self.measure and old is not None) else None
        if self.replay == "rollout":
            replay = dict(replay=engine_routes, replay_rows=torch.arange(len(rows)))
        else:
            replay = dict(replay=old if (self.replay == "old" and old is not None) else None)
        if record is not None:  # this pass defines pi_old: its routes are the ones later passes compare with
            target = dict(record=record)
        else:
            target = dict(record=mine, record_rows=torch.arange(len(rows))) if mine is not None else {}
        with self.hooks.tracking(rows, aux=self.aux_coef > 0, **replay, **target) as logits:
            yield _TrainPass(self, logits, attention_mask)
        if mine is not None:
            self._changes += route_changes(old[rows], mine, count_mask.cpu())

    def step_metrics(self, reduce) -> dict:
        """This step's volatility over every rank (`reduce(tensor)` sums over ranks), then reset."""
        changes, self._changes = reduce(self._changes.clone()), torch.zeros_like(self._changes)
        metrics = {}
        if self.records_old:
            metrics["moe/routes_buffer_mb"] = self._replay_bytes / 2**20
        if self.measure and changes[:, 1].sum() > 0:
            metrics["moe/expert_change_fraction"] = (changes[:, 0].sum() / changes[:, 1].sum()).item()
            for i, (changed, total) in enumerate(changes.tolist()):
                metrics[f"moe/expert_change_fraction/layer_{i}"] = changed / total if total else 0.0
        return metrics


def build_routing(config, model):
    """DenseRouting for a dense policy; MoERouting with the config's aux coefficient (None: the model's own
    router_aux_loss_coef), replay mode and the volatility metric (on when a rollout serves several updates)."""
    hooks_model = getattr(model, "base_model", model)  # peft wraps; the routers are inside either way
    if not is_moe(hooks_model):
        if config.routing_replay != "none":
            from gspo.config import ConfigError

            raise ConfigError(
                f"GSPOConfig.routing_replay={config.routing_replay!r} is not allowed: the policy "
                f"{config.policy_model_name} has no MoE router to replay ('none' for a dense model)"
            )
        return DenseRouting()
    coef = config.router_aux_loss_coef
    if coef is None:
        coef = float(getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0) or 0.0)
    several_updates = config.gspo_epochs > 1 or config.num_mini_batches > 1
    measure = several_updates and config.pi_old_source != "engine"
    return MoERouting(RouterHooks(hooks_model), aux_coef=coef, replay=config.routing_replay, measure=measure)
