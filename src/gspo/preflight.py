"""Checks at start-up, before anything slow or anything written: each error names the fields to change.

* the output directory can be written and has room, before a model loads;
* the tokenizer has a pad or an EOS token (padding needs one);
* the longest prompt plus max_new_tokens fits the model's positions (a GPT-2-style model would crash mid-run with
  an IndexError, a rotary one would silently train past its context);
* a dead policy: an exactly-zero gradient step after step while the rewards still vary (DeadPolicyMonitor).

The temperature floor is GSPOConfig's (MIN_TEMPERATURE in gspo.config).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from gspo.config import ConfigError

log = logging.getLogger("gspo")
MIN_FREE_BYTES = 64 << 20  # below this a checkpoint save fails part-way (it is written whole, then renamed)
POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def check_output_dir(output_dir) -> None:
    """output_dir exists or can be made, a file can be written in it, and it has MIN_FREE_BYTES free."""
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".gspo-write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"GSPOConfig.output_dir={str(output_dir)!r} cannot be written ({e.strerror or e}); choose a writable one"
        ) from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            f"GSPOConfig.output_dir={str(output_dir)!r} has {free / 2**20:.1f} MiB free, less than the "
            f"{MIN_FREE_BYTES >> 20} MiB a run needs to save anything; free space or choose another output_dir"
        )


def check_tokenizer(tokenizer, name: str) -> None:
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ConfigError(
            f"the tokenizer of {name!r} has neither a pad token nor an EOS token: batches cannot be padded and "
            "completions cannot end; set tokenizer.pad_token (and an EOS token) and pass the tokenizer to GSPOTrainer"
        )


def model_positions(model) -> Optional[int]:
    """The longest sequence the model's config allows (None when it states none)."""
    config = getattr(model, "config", None)
    for attr in POSITION_ATTRIBUTES:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(config, model, dataset, *, completion_tokens: int) -> None:
    """The longest prompt actually present (at most max_prompt_length) plus `completion_tokens` fits the model."""
    positions = model_positions(model)
    if positions is None or dataset is None or len(dataset) == 0:
        return
    longest = max(len(dataset[i]["prompt_ids"]) for i in range(len(dataset)))
    if longest + completion_tokens <= positions:
        return
    which = (
        f"max_prompt_length={config.max_prompt_length}"
        if longest >= config.max_prompt_length
        else f"the longest prompt in the data, {longest} tokens (below max_prompt_length={config.max_prompt_length})"
    )
    raise ConfigError(
        f"GSPOConfig.max_new_tokens={completion_tokens} plus {which} is {longest + completion_tokens} tokens, more "
        f"than the model's {positions} positions ({config.policy_model_name}); lower max_new_tokens or "
        "max_prompt_length"
    )


class DeadPolicyMonitor:
    """Warns once when the gradient norm is exactly 0 for `patience` steps in a row while the rewards vary within
    groups: the policy no longer learns (a learning rate that blew the weights away, say). And once when every
    group's rewards were all equal for `flat_patience` steps: no reward signal at all, so only the entropy bonus
    and the KL term move the model."""

    def __init__(self, patience: int = 3, flat_patience: int = 10) -> None:
        self.patience, self.in_a_row, self.warned = patience, 0, False
        self.flat_patience, self.flat_in_a_row, self.warned_flat = flat_patience, 0, False

    def update(self, metrics: dict, step: int, *, skipped: bool) -> None:
        """`skipped`: this step skipped an update (its norm reads 0 without the policy being dead)."""
        flat = metrics.get("frac_reward_zero_std") == 1.0
        self.flat_in_a_row = self.flat_in_a_row + 1 if flat else 0
        if self.flat_in_a_row >= self.flat_patience and not self.warned_flat:
            self.warned_flat = True
            log.warning(
                "gspo: every group's rewards were all equal for %d steps (to step %d): no reward signal, so only the "
                "entropy bonus (entropy_coef) and the KL term change the model; check the rewards on the completions "
                "record (gspo completions RUN_DIR)",
                self.flat_in_a_row,
                step,
            )
        varied = metrics.get("frac_reward_zero_std", 1.0) < 1.0
        dead = metrics.get("grad_norm") == 0.0 and not skipped
        self.in_a_row = self.in_a_row + 1 if dead and varied else 0
        if self.in_a_row >= self.patience and not self.warned:
            self.warned = True
            log.warning(
                "gspo: the gradient norm has been exactly 0 for %d steps (to step %d) while rewards vary within "
                "groups: the policy is not learning (a learning_rate too high for the model can leave it "
                "saturated); check learning_rate and the curves",
                self.in_a_row,
                step,
            )
