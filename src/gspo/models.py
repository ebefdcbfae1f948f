"""Loading the policy, reference and tokenizer; LoRA wrapping; dropout off.

`policy_model_name` is a hub id or a local directory (loaded with `from_pretrained`), or
'builtin:tiny-arithmetic' / 'builtin:tiny-tools', the offline demo models built locally on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gspo.config import BUILTIN_MODEL_PREFIX, ConfigError, GSPOConfig

log = logging.getLogger("gspo")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_threads(config: GSPOConfig) -> int:
    """torch's CPU threads from GSPOConfig.num_threads (None keeps torch's choice); returns the number in force."""
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    return torch.get_num_threads()


def resolve_model_path(name: str) -> str:
    """A built-in model's directory (built on first use), else `name` as it is."""
    if name == "builtin:tiny-tools":
        from gspo.tasks.tool_use import ensure_tool_model

        return str(ensure_tool_model())
    if name.startswith(BUILTIN_MODEL_PREFIX):
        from gspo.tasks.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(moe=name == "builtin:tiny-arithmetic-moe"))
    return name


def load_tokenizer(name: str, trust_remote_code: bool = False):
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:  # many causal LMs ship without a pad token
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # prompts are left-padded for generation
    return tok


def load_causal_lm(name: str, config: GSPOConfig):
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name), dtype=DTYPES[config.torch_dtype], trust_remote_code=config.trust_remote_code
    )
    disable_dropout(model)
    router_logits_off(model)
    return model


def router_logits_off(model) -> None:
    """An MoE config's output_router_logits makes transformers compute its load-balancing loss inside every
    forward, generate's included, where it fails on a padded batch; gspo computes that loss itself, over real
    tokens only (gspo.moe), so the model's own is switched off."""
    config = getattr(model, "config", None)
    if getattr(config, "output_router_logits", False):
        config.output_router_logits = False


def disable_dropout(model) -> None:
    """Dropout would make two forward passes of the same weights disagree, so the on-policy
    ratio would not be exactly 1 (TRL also disables it by default)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def apply_lora(model, config: GSPOConfig):
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def reference_context(policy, ref_model):
    """Context in which `policy` computes reference log-probs: with LoRA, the base model with
    adapters disabled (no second copy in memory); otherwise a no-op (ref_model is used)."""
    if ref_model is None and hasattr(policy, "disable_adapter"):
        return policy.disable_adapter()
    return contextlib.nullcontext()


def mixed_precision_mode(config: GSPOConfig, deepspeed: bool) -> str:
    """'bf16' or 'no': GSPOConfig.mixed_precision, or the launcher's `--mixed_precision` when the
    config leaves it at 'no' (accelerate's ACCELERATE_MIXED_PRECISION). gspo applies the autocast
    itself (accelerate's would miss the output head, which gspo runs outside the model's forward);
    under DeepSpeed the engine owns precision, so the config field is refused there."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if deepspeed:
        if config.mixed_precision != "no":
            raise ConfigError(
                f"GSPOConfig.mixed_precision={config.mixed_precision!r} under DeepSpeed: set "
                f"mixed_precision: bf16 in the accelerate config instead (DeepSpeed's own bf16)"
            )
        return "no"
    if launcher == "fp16":
        raise ConfigError(
            "accelerate launch --mixed_precision fp16 is not supported (no loss scaling): use "
            "bf16, i.e. --mixed_precision bf16 or GSPOConfig.mixed_precision='bf16'"
        )
    if config.mixed_precision == "no" and launcher == "bf16":
        log.warning("gspo: bf16 autocast from the launcher's --mixed_precision bf16")
        return "bf16"
    return config.mixed_precision


def autocast(device: torch.device, mode: str):
    """bfloat16 autocast on `device` when mode == 'bf16', else a no-op. Within one block, autocast
    casts each trainable weight once (its cast cache), e.g. once per rollout, not once per token."""
    if mode != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def adamw_factory(config: GSPOConfig, lr: float | None = None):
    """The default optimizer: AdamW over the parameters a back-end hands it (after sharding: its shards);
    `lr` defaults to config.learning_rate (the critic passes value_learning_rate)."""

    def make(params):
        return torch.optim.AdamW(
            params,
            lr=config.learning_rate if lr is None else lr,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.weight_decay,
        )

    return make


def load_policy(config: GSPOConfig, model=None):
    """The policy to train: `model`, or config.policy_model_name loaded; LoRA and gradient checkpointing applied."""
    policy = model if model is not None else load_causal_lm(config.policy_model_name, config)
    router_logits_off(policy)
    if config.use_lora:
        policy = apply_lora(policy, config)
    if config.gradient_checkpointing:
        # transformers >= 5.2x renamed it (the old name warns); older versions only have the old one
        getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
    return policy
