"""GSPOConfig: every knob of a run, one help string per field, validated once.

The seed's fields keep the seed's names and defaults (`group_size=4`,
`learning_rate=1e-5`, `clip_range`, `kl_coef=0.2`, ...). Departures, each on purpose:

* `clip_range` defaults to None, meaning "the recommended value for the chosen
  policy_loss and importance level": 3e-4 / 4e-4 for GSPO and GSPO-token (paper §5.1),
  0.2 for token level (GRPO); each other objective's own (gspo.core.recommended_clip_range).
  0.2 on a length-normalised sequence ratio almost never clips (TRL #3834). An explicit
  `clip_range` (or `clip_range_low` / `clip_range_high`) always wins, and the trainer logs
  the values it used.
* `advantage_type` and `use_group_normalization` combine as: advantages are divided
  by the group std when `advantage_type == "normalized"` OR
  `use_group_normalization` is True (this is what the seed's code does with its
  defaults "relative" + True). `advantage_type="normalized"` with
  `use_group_normalization=False` contradicts itself and is rejected.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from gspo.core import (
    AGGREGATIONS,
    IMPORTANCE_LEVELS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    allowed_aggregations,
    policy_loss_spec,
    recommended_clip_range,
    resolve_aggregation,
)

BUILTIN_MODEL_PREFIX = "builtin:"
BUILTIN_MODELS = (
    "builtin:tiny-arithmetic",
    "builtin:tiny-arithmetic-moe",
    "builtin:tiny-tools",
)  # built locally on first use (gspo.tasks)
REASONING_GYM_PREFIX = "reasoning_gym:"  # dataset_path "reasoning_gym:<task>?size=N&seed=S" (gspo.data)
ROLLOUT_ENGINES = ("hf", "vllm")
MIN_TEMPERATURE = 1e-3  # the sampling temperature floor (see _check_ranges)
ENGINE_IS_CORRECTIONS = ("none", "token_truncate", "sequence_truncate", "sequence_mask")


class ConfigError(ValueError):
    """A config field holds a value that is not allowed. The message names the field."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class GSPOConfig:
    # --- models ---------------------------------------------------------------------
    policy_model_name: str = _f(
        "builtin:tiny-arithmetic",
        "Policy model: a Hugging Face hub id, a local directory, or 'builtin:tiny-arithmetic' / 'builtin:tiny-tools' "
        "(the offline demo models, built locally on first use).",
    )
    reward_model_name: Optional[str] = _f(
        None,
        "Optional reward model (AutoModelForSequenceClassification with one output label) scoring prompt + "
        "completion; its score is added to the reward functions' weighted sum.",
    )
    reward_model_weight: float = _f(1.0, "Weight of the reward model's score in the total reward.")
    reward_funcs: list = _f(
        [],
        "Reward functions by reference: built-in names, 'module:function' or 'path/to/file.py:function'. Python "
        "callers may also pass callables to GSPOTrainer(reward_funcs=...).",
    )
    reward_weights: Optional[list] = _f(None, "One weight per reward function (default: all 1.0).")
    reward_kwargs: dict = _f(
        {},
        "Keyword parameters for reward functions, by reward name: {math_accuracy: {timeout_s: 2}}. Each must be a "
        "named parameter of its function.",
    )
    reward_error_policy: str = _f(
        "raise",
        "What a failing reward function does: 'raise' (stop with an error naming the function and sample) or "
        "'penalty' (use reward_penalty_value for that sample and count it in the metric reward_penalized).",
        choices=("raise", "penalty"),
    )
    reward_timeout_s: float = _f(
        300.0,
        "Longest a reward function may take on one batch, in seconds (0: no limit); past it the call is an error "
        "naming the function, or the penalty under reward_error_policy='penalty'.",
    )
    reward_penalty_value: float = _f(
        0.0, "Reward given to a sample whose reward function failed, when reward_error_policy='penalty'."
    )
    trust_remote_code: bool = _f(
        False, "Allow model repositories to run their own code. Off unless you trust the source."
    )
    torch_dtype: str = _f("float32", "Dtype the models are loaded in.", choices=("float32", "bfloat16", "float16"))
    mixed_precision: str = _f(
        "no",
        "'bf16': forward passes (rollouts, reference, training) run under bfloat16 autocast "
        "while weights, gradients, AdamW state and the loss math stay float32, like "
        "TrainingArguments(bf16=True); the log-probs are computed in float32 from the bfloat16 logits. 'no': "
        "everything in torch_dtype. Under DeepSpeed, use the DeepSpeed config's own bf16 section instead.",
        choices=("no", "bf16"),
    )
    gradient_checkpointing: bool = _f(
        False,
        "Trade compute for memory in the policy's backward pass: "
        "layer activations are recomputed, and the output head runs "
        "entropy_chunk_size tokens at a time, recomputed in backward, so no "
        "[tokens, vocabulary] logits tensor is ever held (without it this happens "
        "only when a micro-batch's fp32 logits would exceed 1 GiB).",
    )
    fsdp: bool = _f(
        False,
        "Shard parameters, gradients and optimizer state across processes with PyTorch FSDP2 "
        "(fully_shard on every decoder layer, then the root) instead of replicating them (DDP). "
        "Only when launched with more than one process; works with gloo (CPU) and NCCL. The "
        "rollout is generated with the full weights gathered once per step; the reference "
        "model is sharded too.",
    )
    # --- data -----------------------------------------------------------------------
    dataset_path: Optional[str] = _f(
        None,
        "Training prompts: a .jsonl/.json/.csv/.parquet file or a local Hugging Face dataset directory "
        "('builtin:arithmetic' for the demo task).",
    )
    prompt_column: str = _f(
        "prompt",
        "Column holding the prompt (a string, or a list of chat messages formatted with the tokenizer's chat "
        "template). Other columns reach the reward functions as keyword arguments.",
    )
    eval_dataset_path: Optional[str] = _f(None, "Evaluation prompts, same formats as dataset_path.")
    system_prompt: Optional[str] = _f(
        None,
        "A system message put first in every conversation (a chat prompt, or a plain prompt, which becomes a user "
        "message). A string, or the path of a text file holding it.",
    )
    max_prompt_length: int = _f(512, "Longest prompt in tokens; see prompt_truncation.")
    prompt_truncation: str = _f(
        "error",
        "A prompt longer than max_prompt_length: 'error' stops with the offending row, 'left' keeps its last "
        "max_prompt_length tokens and warns once.",
        choices=("error", "left"),
    )
    # --- batch shape ----------------------------------------------------------------
    batch_size: int = _f(8, "Prompts per rollout batch (one training step), across all processes.")
    group_size: int = _f(4, "Completions sampled per prompt (G). Advantages compare completions within a group.")
    num_mini_batches: int = _f(
        1,
        "Optimizer updates per pass over a rollout batch (the paper uses 4). More than 1 makes later updates "
        "off-policy.",
    )
    gradient_accumulation_steps: int = _f(
        1, "Micro-batches each mini-batch is split into for the forward/backward pass; changes memory, not the result."
    )
    # --- schedule -------------------------------------------------------------------
    num_epochs: int = _f(3, "Passes over the prompt dataset.")
    max_steps: int = _f(-1, "Stop after this many training steps (rollout batches); -1 means num_epochs decides.")
    gspo_epochs: int = _f(
        4, "Passes over each rollout batch (PPO-style epochs). 1 with num_mini_batches=1 is strictly on-policy."
    )
    learning_rate: float = _f(1e-5, "AdamW peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")
    lr_scheduler_type: str = _f(
        "constant",
        "Learning-rate schedule after warmup, over optimizer updates.",
        choices=("constant", "linear", "cosine"),
    )
    warmup_steps: int = _f(0, "Optimizer updates of linear warmup.")
    seed: int = _f(42, "Seed for Python, NumPy and torch (sampling included).")
    # --- algorithm ------------------------------------------------------------------
    policy_loss: str = _f(
        "clip",
        "The policy objective (gspo.core.POLICY_LOSSES; docs/objectives.md): 'clip' = the clipped surrogate "
        "(GSPO / GSPO-token / GRPO, by importance_sampling_level); 'cispo' = MiniMax-M1's clipped, stop-gradient "
        "IS weight times log pi (arXiv 2506.13585; importance_sampling_level 'token'); 'sapo' = a soft sigmoid gate "
        "instead of the clip (arXiv 2511.20347; 'token'; see sapo_tau_pos / sapo_tau_neg); 'gmpo' = the geometric "
        "mean of log-space-clipped token ratios per sequence (arXiv 2507.20673; 'sequence').",
        choices=tuple(POLICY_LOSSES),
    )
    importance_sampling_level: str = _f(
        "sequence",
        "'sequence' = GSPO (paper Eq. 5-7), 'sequence_token' = GSPO-token (Eq. 13-14), 'token' = GRPO-style "
        "per-token ratios. policy_loss 'cispo' and 'sapo' need 'token', 'gmpo' needs 'sequence'.",
        choices=IMPORTANCE_LEVELS,
    )
    clip_range: Optional[float] = _f(
        None,
        "Symmetric clip epsilon. None: the recommended value for policy_loss and the level: 'clip' 3e-4/4e-4 at "
        "the sequence levels, 0.2 at token level; 'cispo' 1.0/0.2 (a floor of 0: no lower bound); 'sapo' 0.2 (it "
        "does not clip: only counts clip_fraction); 'gmpo' 0.4/0.4 in log space (ratios within e^-0.4..e^0.4).",
    )
    clip_range_low: Optional[float] = _f(
        None, "Lower clip epsilon (ratio floor 1 - eps; gmpo: log-ratio floor -eps); overrides clip_range."
    )
    clip_range_high: Optional[float] = _f(
        None, "Upper clip epsilon (ratio ceiling 1 + eps; gmpo: log-ratio ceiling eps); overrides clip_range."
    )
    loss_aggregation: Optional[str] = _f(
        None,
        "Token level only: 'seq-mean-token-mean' (mean over each sequence's tokens, then sequences), 'token-mean' "
        "(over all tokens, DAPO), 'seq-mean-token-sum' (token sums, mean over sequences) or "
        "'seq-mean-token-sum-norm' (token sums / (sequences * loss_aggregation_norm_length), Dr. GRPO "
        "arXiv 2503.20783). None: the objective's default ('token-mean' for cispo, else 'seq-mean-token-mean'). "
        "The sequence levels are mean over sequences by definition and accept only None or 'seq-mean-token-mean'.",
        choices=(None,) + AGGREGATIONS,
    )
    loss_aggregation_norm_length: Optional[int] = _f(
        None,
        "The constant token count L of loss_aggregation='seq-mean-token-sum-norm'. None: max_new_tokens (Dr. GRPO "
        "divides by the generation budget, not by each sequence's length).",
    )
    sapo_tau_pos: float = _f(
        1.0, "policy_loss='sapo': the gate's temperature on tokens with advantage > 0 (verl's default 1.0)."
    )
    sapo_tau_neg: float = _f(
        1.05,
        "policy_loss='sapo': the gate's temperature on tokens with advantage <= 0 (verl's default 1.05; the SAPO "
        "paper keeps it above sapo_tau_pos, so negative updates fade faster off-policy).",
    )
    max_log_ratio: float = _f(20.0, "Clamp on |log ratio| before exp, so an outlier cannot overflow to inf/NaN.")
    advantage_type: str = _f(
        "relative",
        "'relative': A = r - mean(group); 'normalized': also divide by the group std. See use_group_normalization.",
        choices=("relative", "normalized"),
    )
    use_group_normalization: bool = _f(
        True,
        "Divide advantages by the group's sample std (+1e-8). Normalisation happens when this is True or "
        "advantage_type='normalized'.",
    )
    entropy_coef: float = _f(0.01, "Weight of the entropy bonus (mean per-token entropy over completion tokens).")
    kl_coef: float = _f(
        0.2,
        "Initial weight of the KL penalty to the frozen reference model. 0 loads no reference model and runs no "
        "reference pass (adaptive_kl multiplies the coefficient, so 0 stays 0).",
    )
    kl_estimator: str = _f(
        "k3",
        "Per-token KL estimator: 'k1' (log ratio), 'k2' (half squared log ratio), 'k3' (exp(ref-logp)-(ref-logp)-1, "
        "unbiased and >= 0).",
        choices=KL_ESTIMATORS,
    )
    target_kl: float = _f(0.01, "KL the adaptive controller steers towards.")
    adaptive_kl: bool = _f(
        True, "Adapt kl_coef (Ziegler et al. 2019): kl_coef *= 1 + clip(kl/target_kl - 1, -0.2, 0.2) * batch/horizon."
    )
    kl_horizon: int = _f(10000, "Horizon of the adaptive KL controller, in samples.")
    entropy_chunk_size: int = _f(
        1024,
        "Tokens per chunk when computing log-probs and entropy over the vocabulary, bounding peak memory "
        "(the output head too, in no-grad passes and under gradient_checkpointing).",
    )
    # --- generation -----------------------------------------------------------------
    max_new_tokens: int = _f(128, "Longest completion in tokens; a completion cut here counts as truncated.")
    temperature: float = _f(1.0, "Sampling temperature for rollouts.")
    top_p: float = _f(1.0, "Nucleus sampling threshold (1.0 disables).")
    top_k: int = _f(0, "Top-k sampling (0 disables).")
    # --- DAPO (arXiv 2503.14476): dynamic sampling, truncated completions ------------------
    dynamic_sampling: bool = _f(
        False,
        "Drop groups whose rewards are all equal (zero advantage, no signal) and generate more prompts until the "
        "step has batch_size groups with signal (DAPO §3.3; verl algorithm.filter_groups). A step then takes more "
        "than one prompt batch, so num_epochs (which counts steps) passes over the data more often.",
    )
    dynamic_sampling_metric: str = _f(
        "reward",
        "What must vary within a group to keep it: 'reward' (the total reward) or the name of one reward "
        "function (as in the reward/<name>_mean metrics).",
    )
    dynamic_sampling_max_rounds: int = _f(
        4,
        "Most generation rounds per step under dynamic_sampling (0: unlimited). When they run out the step "
        "trains on the groups it kept, topped up with zero-spread ones to batch_size, and logs it.",
    )
    mask_truncated_completions: bool = _f(
        False,
        "Completions that hit max_new_tokens without EOS get an all-zero loss mask: no gradient from a cut-off "
        "answer (DAPO §3.4 overlong filtering). They still count in the batch and its metrics.",
    )
    # --- multi-turn episodes: tools or an environment (gspo.episodes, docs/multi_turn.md) ---
    tools: list = _f(
        [],
        "Tools the model may call in multi-turn episodes: 'module:function' or 'path/to/file.py:function' "
        "references to typed Python functions with docstrings (their JSON schemas reach the model through the chat "
        "template). Python callers may pass callables to GSPOTrainer(tools=[...]). Empty with no environment: "
        "single-turn completions.",
    )
    environment: Optional[str] = _f(
        None,
        "A multi-turn environment class by reference ('module:Class' or 'path/to/file.py:Class'), one instance per "
        "episode: reset(**row) -> first messages or None, step(text) -> (observation, done, reward), close(). "
        "Python callers may pass the class to GSPOTrainer(environment=...).",
    )
    tool_call_parser: str = _f(
        "hermes",
        'How tool calls are read from the model\'s text: \'hermes\' (<tool_call>{"name": ..., "arguments": '
        "{...}}</tool_call>, the Qwen / Hermes format) or a reference 'module:function' to a function "
        "text -> list[gspo.episodes.ToolCall].",
    )
    max_turns: int = _f(4, "Most model turns in one episode; an episode that wants more is cut and truncated.")
    max_episode_tokens: Optional[int] = _f(
        None,
        "Most completion tokens in one episode, the environment's tokens included (never past the model's "
        "positions); max_new_tokens bounds each model turn. None: max_new_tokens * max_turns.",
    )
    max_tool_response_tokens: int = _f(
        256, "A longer tool result (or environment observation) is cut to this many tokens and marked as cut."
    )
    tool_timeout_s: float = _f(
        10.0, "A tool call that runs longer is abandoned; the model reads an error message, and it is counted."
    )
    environment_reward_weight: float = _f(
        1.0, "Weight of the environment's reward (the sum of its step rewards) in the total reward."
    )
    environment_error_policy: str = _f(
        "raise",
        "What an environment whose step() raises (or breaks its contract) does: 'raise' (stop, naming the "
        "environment and the row) or 'penalty' (end that episode; its environment reward is reward_penalty_value, "
        "counted in reward_penalized). A constructor or reset() that fails always raises.",
        choices=("raise", "penalty"),
    )
    chat_template: Optional[str] = _f(
        None,
        "A Jinja chat template file used instead of the tokenizer's own (e.g. a prefix-preserving one for "
        "multi-turn episodes); saved with the tokenizer in checkpoints.",
    )
    # --- advantage estimator: group (GSPO / GRPO) or a critic with GAE (PPO / VAPO) ------
    advantage_estimator: str = _f(
        "group",
        "'group': advantages from the group's rewards (Eq. 6, GSPO / GRPO); 'gae': a critic (value model) and GAE "
        "per token (PPO, VAPO), with importance_sampling_level 'token' or 'sequence_token'.",
        choices=("group", "gae"),
    )
    value_model_name: Optional[str] = _f(
        None,
        "The critic (gae): None initialises it from policy_model_name with a fresh scalar head "
        "(AutoModelForTokenClassification, one label); or a directory / hub id, e.g. a reward model.",
    )
    value_learning_rate: float = _f(2e-5, "The critic's AdamW learning rate (VAPO: 2x the actor's).")
    value_clip_range: float = _f(0.2, "Clip of the value update around the rollout-time values (PPO's value clip).")
    gamma: float = _f(1.0, "GAE discount per token.")
    gae_lambda: Union[float, str] = _f(
        0.95,
        "The policy's GAE lambda: a number in [0, 1], or 'adaptive' for VAPO's length-adaptive "
        "lambda = 1 - 1/(length_adaptive_alpha * length) per sequence (Eq. 5).",
        own_check=True,
    )
    gae_lambda_value: float = _f(1.0, "The critic's GAE lambda for its return targets (VAPO's decoupled GAE: 1.0).")
    length_adaptive_alpha: float = _f(
        0.05,
        "alpha of the length-adaptive lambda (VAPO: 0.05, set for chain-of-thought of hundreds of tokens; lambda is 0 "
        "for completions shorter than 1/alpha tokens, so short answers want a larger alpha: examples/vapo.yaml).",
    )
    value_warmup_steps: int = _f(
        0,
        "Critic-only steps at the start (VAPO value pretraining, 50 in the paper): the policy is untouched.",
    )
    positive_nll_coef: float = _f(
        0.0, "Weight mu of VAPO's positive-example LM loss (Eq. 9; 0.1 in the paper) on completions scored as correct."
    )
    positive_reward_threshold: float = _f(1.0, "A completion is a positive example when its reward is >= this.")
    whiten_advantages: bool = _f(True, "Normalise GAE advantages to mean 0, std 1 over the batch's tokens.")
    kl_in_reward: bool = _f(
        False,
        "gae: put the KL to the reference in the per-token reward (-kl_coef * (log pi_old - log pi_ref)), as "
        "classic PPO-RLHF does, instead of in the loss.",
    )
    # --- rollout engine -------------------------------------------------------------
    rollout_engine: str = _f(
        "hf",
        "What generates rollouts: 'hf' (transformers generate on the live policy) or 'vllm' (one vllm.LLM per "
        "rank in this process, weights pushed after every step; pip install 'gspo[vllm]').",
        choices=ROLLOUT_ENGINES,
    )
    old_logprobs_source: str = _f(
        "trainer",
        "pi_old in the ratio: 'trainer' (log-probs recomputed by the trained model) or 'engine' (the vLLM engine's "
        "own sampled-token log-probs, GSPO paper §5.4: no old-log-prob pass; sequence levels only).",
        choices=("trainer", "engine"),
    )
    engine_is_correction: str = _f(
        "none",
        "With pi_old from the trainer, reweight for the engine's sampling distribution: 'token_truncate' "
        "min(pi_old/pi_engine, cap) per token, 'sequence_truncate' the same on the length-normalised sequence "
        "ratio, 'sequence_mask' drops sequences whose ratio is outside [1/cap, cap], or 'none'.",
        choices=ENGINE_IS_CORRECTIONS,
    )
    engine_is_cap: float = _f(3.0, "Cap C of engine_is_correction (TRL's cap is 3.0, verl's rollout_is threshold 2.0).")
    engine_mismatch_tolerance: float = _f(
        0.1,
        "Stop the run when engine/logprob_abs_diff_mean (|trainer - engine| sampled-token log-prob, before the "
        "step's first update) exceeds this: a stale or broken weight sync. Set it well above the mismatch that "
        "kernels and precision alone cause (figures measured for fp32 and bf16: docs/benchmarks.md).",
    )
    vllm_gpu_memory_utilization: float = _f(0.3, "Fraction of GPU memory the vLLM engine may take (weights + KV).")
    vllm_max_model_len: Optional[int] = _f(
        None, "vLLM's context length (None: max_prompt_length + max_new_tokens, capped at the model's positions)."
    )
    vllm_enable_sleep_mode: bool = _f(
        False,
        "Release the vLLM engine's weights and KV cache (sleep level 2) during the update; on wake the weights come "
        "back, the trained ones are pushed, then the KV cache (CUDA only; an error on CPU).",
    )
    vllm_cpu_kv_cache_gb: float = _f(1.0, "CPU only: GiB of KV cache for the vLLM engine (VLLM_CPU_KVCACHE_SPACE).")
    vllm_block_size: Optional[int] = _f(
        None,
        "Tokens per vLLM KV-cache block (None: vLLM's default, 16 on GPU, 128 on CPU). The prefix cache reuses whole "
        "blocks only: a multi-turn episode's next turn finds its context cached block by block.",
    )
    # --- Mixture-of-Experts policies (gspo.moe, docs/moe.md) -----------------------------
    router_aux_loss_coef: Optional[float] = _f(
        None,
        "MoE policies: weight of the routers' load-balancing loss (Switch Transformer), over real tokens only, added "
        "to the policy loss; None takes the model's own router_aux_loss_coef, 0 switches it off.",
    )
    routing_replay: str = _f(
        "none",
        "MoE policies: Routing Replay. 'old' (R2): pi_theta's passes over a rollout use the experts pi_old chose "
        "for the same tokens (the gate weights stay live, so the router still learns); 'rollout' (R3): the experts "
        "the rollout engine chose while sampling (the hf engine records them); 'none'. GSPO needs none.",
        choices=("none", "old", "rollout"),
    )
    # --- LoRA -----------------------------------------------------------------------
    use_lora: bool = _f(
        False,
        "Train LoRA adapters (peft) instead of all weights; the reference policy is the base model with adapters "
        "disabled.",
    )
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target_modules: list = _f(
        ["all-linear"], "Modules to adapt ('all-linear' or module names such as q_proj, v_proj)."
    )
    merge_lora_on_save: bool = _f(
        False, "Save the final model with adapters merged into the base weights instead of the adapter alone."
    )
    # --- DAPO overlong handling -----------------------------------------------------
    overlong_buffer_len: Optional[int] = _f(
        None,
        "L_cache of the 'soft_overlong_punishment' reward (DAPO Eq. 13), with L_max = max_new_tokens: completions "
        "up to L_max - L_cache tokens get 0, longer ones a penalty growing linearly to -overlong_penalty at L_max. "
        "An int in [1, max_new_tokens); needed when that reward is in reward_funcs, unused otherwise.",
    )
    overlong_penalty: float = _f(
        1.0, "Largest penalty of the 'soft_overlong_punishment' reward (at L_max and beyond); DAPO's is 1.0."
    )
    # --- output, logging, evaluation, checkpoints -----------------------------------
    output_dir: str = _f("outputs/gspo", "Where metrics, plots, checkpoints and the final model go.")
    logging_steps: int = _f(1, "Print a progress line every N steps (metrics.jsonl always gets every step).")
    log_completions_steps: int = _f(
        10, "Print a table of sampled completions (one per distinct prompt) every N steps (0 disables)."
    )
    log_completions: bool = _f(
        True,
        "Append every step's completions, with each reward and the advantage, to <output_dir>/completions/ as "
        "parquet (`gspo completions RUN_DIR` reads them).",
    )
    log_completions_max_per_step: int = _f(
        256, "Most completions recorded per step (the first rows of the rollout; 0 records none)."
    )
    samples_max_chars: int = _f(600, "Longest completion text shown in the printed samples table.")
    num_threads: Optional[int] = _f(
        None,
        "torch CPU threads (torch.set_num_threads); None keeps torch's choice. Printed at start: an oversubscribed "
        "CPU machine can swing by 40x.",
    )
    report_to: list = _f(["jsonl"], "Metric sinks: any of 'jsonl' (always on), 'tensorboard', 'wandb'.")
    progress_bar: bool = _f(True, "Show a live progress bar.")
    plot_curves: bool = _f(
        True,
        "Draw <output_dir>/training_curves.png from metrics.jsonl at the end of training (matplotlib); false "
        "skips it. `gspo plot RUN_DIR` draws it later from any run.",
    )
    eval_steps: int = _f(
        0,
        "Evaluate on eval_dataset_path every N steps (greedy, or eval_num_samples sampled; 0: only at the end, if "
        "an eval set is given).",
    )
    eval_max_samples: int = _f(256, "Evaluate on at most this many eval prompts.")
    eval_batch_size: int = _f(64, "Prompts per decoding batch during evaluation.")
    accuracy_threshold: float = _f(
        1.0, "A completion counts as correct in eval/accuracy when its accuracy_reward value is >= this."
    )
    accuracy_reward: Optional[str] = _f(
        None,
        "The reward whose value defines eval/accuracy (>= accuracy_threshold). None: the first correctness reward "
        "(math_accuracy, reasoning_gym, exact_answer, answer_match), else the total reward; the log says which.",
    )
    eval_num_samples: int = _f(
        1, "Completions per eval prompt: 1 decodes greedily; k > 1 samples k at eval_temperature (mean@k, pass@k)."
    )
    eval_temperature: float = _f(1.0, "Sampling temperature of evaluation when eval_num_samples > 1.")
    save_steps: int = _f(0, "Save a checkpoint every N steps (0 disables; the final model is always saved).")
    save_total_limit: Optional[int] = _f(None, "Keep at most this many checkpoints (oldest deleted first).")
    resume_from_checkpoint: Optional[str] = _f(
        None, "A checkpoint directory, or 'latest' for the newest one in output_dir that verifies."
    )
    allow_config_change: bool = _f(
        False,
        "Resume even when the config changes what the run is (model, batch_size, group_size, objective and level, "
        "seed, max_new_tokens, rewards, schedule); without it such a resume is refused with the differences.",
    )
    overwrite_output_dir: bool = _f(
        False,
        "Start a fresh run in an output_dir that holds another run's checkpoints or final model, removing them "
        "(and its completions record); without it such a start is refused.",
    )
    max_consecutive_skipped_updates: int = _f(
        3, "A non-finite loss or gradient skips that update; this many in a row stops the run with a checkpoint."
    )

    def __post_init__(self) -> None:
        validate(self)

    # --- derived values -------------------------------------------------------------
    @property
    def normalize_advantages(self) -> bool:
        return self.advantage_type == "normalized" or self.use_group_normalization

    @property
    def clip_low(self) -> float:
        """Lower epsilon in force: clip_range_low > clip_range > the objective's recommendation at the level."""
        for v in (self.clip_range_low, self.clip_range):
            if v is not None:
                return float(v)
        return recommended_clip_range(self.importance_sampling_level, self.policy_loss)[0]

    @property
    def clip_high(self) -> float:
        for v in (self.clip_range_high, self.clip_range):
            if v is not None:
                return float(v)
        return recommended_clip_range(self.importance_sampling_level, self.policy_loss)[1]

    @property
    def loss_aggregation_in_force(self) -> str:
        """loss_aggregation, or the objective's default at the level when it is None."""
        return resolve_aggregation(self.policy_loss, self.importance_sampling_level, self.loss_aggregation)

    def policy_loss_kwargs(self) -> dict:
        """Everything POLICY_LOSSES[policy_loss] needs from the config; the caller adds the per-batch
        num_sequences / num_tokens / is_weights:
        POLICY_LOSSES[cfg.policy_loss](logp, old, adv, loss_mask, num_sequences=.., num_tokens=.., is_weights=..,
        **cfg.policy_loss_kwargs())."""
        kwargs = {
            "level": self.importance_sampling_level,
            "clip_low": self.clip_low,
            "clip_high": self.clip_high,
            "aggregation": self.loss_aggregation_in_force,
            "max_log_ratio": self.max_log_ratio,
            "norm_length": (
                self.loss_aggregation_norm_length
                if self.loss_aggregation_norm_length is not None
                else self.max_new_tokens
            ),
        }
        # an objective's options (sapo_tau_pos, ...) are config fields of the same name
        kwargs.update({name: getattr(self, name) for name in policy_loss_spec(self.policy_loss).options})
        return kwargs

    @property
    def multi_turn(self) -> bool:
        """Episodes with tools or an environment from the config (tools passed in code count too: the trainer)."""
        return bool(self.tools) or self.environment is not None

    @property
    def episode_tokens(self) -> int:
        """Most completion tokens of one episode: max_episode_tokens, or max_new_tokens * max_turns."""
        return self.max_episode_tokens if self.max_episode_tokens is not None else self.max_new_tokens * self.max_turns

    @property
    def pi_old_source(self) -> str:
        """Where pi_old comes from, decided once: 'engine' (the rollout engine's log-probs, GSPO §5.4),
        'no_grad_pass' (the producer's pass before any update: several mini-batches change the weights before
        the last one is used, and a KL reward needs pi_old up front), or 'first_epoch' (the learner's own
        first-epoch log-probs: with one mini-batch that forward runs before any update, so it *is* pi_old)."""
        if self.old_logprobs_source == "engine":
            return "engine"
        return "no_grad_pass" if self.num_mini_batches > 1 or self.kl_in_reward else "first_epoch"

    @property
    def uses_reference_model(self) -> bool:
        """A KL term needs the reference policy; kl_coef 0 stays 0 under adaptive_kl (it multiplies), so none."""
        return self.kl_coef > 0

    def clip_summary(self) -> str:
        """The objective, importance level, aggregation and clip epsilons in force, for the start-up log line."""
        default = self.clip_range is None and self.clip_range_low is None and self.clip_range_high is None
        note = " (the recommended values for the objective and level)" if default else ""
        extra = {
            "cispo": " (caps the stop-gradient IS weight)",
            "sapo": f" (SAPO does not clip: it only counts clip_fraction; gate tau_pos={self.sapo_tau_pos:g} "
            f"tau_neg={self.sapo_tau_neg:g})",
            "gmpo": " (in log space)",
        }.get(self.policy_loss, "")
        return (
            f"policy_loss={self.policy_loss}, importance_sampling_level={self.importance_sampling_level}, "
            f"loss_aggregation={self.loss_aggregation_in_force}, clip eps low={self.clip_low:g} "
            f"high={self.clip_high:g}{extra}{note}"
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_help(cls) -> dict:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _err(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"GSPOConfig.{name}={value!r} is not allowed: {allowed}.")


def _check_choices(cfg: GSPOConfig) -> None:
    for f in fields(cfg):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(cfg, f.name) not in choices:
            raise _err(f.name, getattr(cfg, f.name), f"expected one of {list(choices)}")


# Fields whose default is None: the type of a value that is not None.
_OPTIONAL_TYPES = {
    "reward_model_name": str,
    "reward_weights": list,
    "dataset_path": str,
    "eval_dataset_path": str,
    "clip_range": float,
    "clip_range_low": float,
    "clip_range_high": float,
    "loss_aggregation_norm_length": int,
    "save_total_limit": int,
    "resume_from_checkpoint": str,
    "vllm_max_model_len": int,
    "value_model_name": str,
    "overlong_buffer_len": int,
    "system_prompt": str,
    "num_threads": int,
    "accuracy_reward": str,
    "router_aux_loss_coef": float,
}


def _check_types(cfg: GSPOConfig) -> None:
    for f in fields(cfg):
        if f.metadata.get("own_check"):
            continue  # a number or a word: _check_critic
        v, d = getattr(cfg, f.name), f.default
        if d is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            d = f.default_factory()  # list fields (reward_funcs, report_to, ...)
        if d is None:
            if v is None or f.name not in _OPTIONAL_TYPES:
                continue
            d = _OPTIONAL_TYPES[f.name]()
        if d is dataclasses.MISSING:
            continue
        if isinstance(d, bool):
            ok = isinstance(v, bool)
        elif isinstance(d, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(d, float):  # NaN / inf are never a sensible setting and slip past range checks
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = isinstance(v, type(d))
        if not ok:
            raise _err(
                f.name,
                v,
                f"expected a {'finite ' if isinstance(d, float) else ''}{type(d).__name__}"
                + (" or None" if f.default is None else ""),
            )


# fmt: off
_POSITIVE_FIELDS = ("batch_size", "num_mini_batches", "gradient_accumulation_steps", "num_epochs", "gspo_epochs",
                    "max_new_tokens", "max_prompt_length", "kl_horizon", "entropy_chunk_size", "eval_batch_size",
                    "eval_max_samples", "logging_steps", "max_consecutive_skipped_updates", "lora_r", "lora_alpha",
                    "max_turns", "max_tool_response_tokens", "eval_num_samples", "samples_max_chars")
_NON_NEGATIVE_INT_FIELDS = ("dynamic_sampling_max_rounds",)
_NON_NEGATIVE_FIELDS = ("weight_decay", "max_grad_norm", "warmup_steps", "entropy_coef", "kl_coef", "eval_steps",
                        "save_steps", "log_completions_steps", "top_k", "lora_dropout",
                        "log_completions_max_per_step", "reward_timeout_s")
# fmt: on


def _check_ranges(cfg: GSPOConfig) -> None:
    for name in _POSITIVE_FIELDS:
        if getattr(cfg, name) < 1:
            raise _err(name, getattr(cfg, name), "must be >= 1")
    for name in _NON_NEGATIVE_FIELDS + _NON_NEGATIVE_INT_FIELDS:
        if getattr(cfg, name) < 0:
            raise _err(name, getattr(cfg, name), "must be >= 0")
    if cfg.group_size < 2:
        raise _err("group_size", cfg.group_size, "must be >= 2 (advantages compare completions within a group)")
    if not cfg.learning_rate > 0:
        raise _err("learning_rate", cfg.learning_rate, "must be > 0")
    for name in ("clip_range", "clip_range_low", "clip_range_high"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and 0 < v):
            raise _err(name, v, "must be a number > 0, or None for the level's recommended value")
    if cfg.policy_loss == "clip" and cfg.clip_low >= 1:  # cispo: >= 1 is "no lower bound"; gmpo: log space
        raise _err(
            "clip_range_low" if cfg.clip_range_low is not None else "clip_range",
            cfg.clip_low,
            "the lower epsilon must be < 1 (the ratio floor is 1 - eps)",
        )
    if cfg.seed < 0:
        raise _err("seed", cfg.seed, "must be >= 0 (NumPy rejects negative seeds)")
    if not 0 <= cfg.lora_dropout < 1:
        raise _err("lora_dropout", cfg.lora_dropout, "must be in [0, 1)")
    if not cfg.prompt_column.strip():
        raise _err("prompt_column", cfg.prompt_column, "must name a column")
    for name in ("temperature", "eval_temperature"):
        if not getattr(cfg, name) >= MIN_TEMPERATURE:
            raise _err(
                name,
                getattr(cfg, name),
                f"must be >= {MIN_TEMPERATURE:g}: log-probs are taken of logits / temperature, which below that "
                "leave the range where float32 softmax and its gradient stay finite (1e-40 gave NaN after 3 steps); "
                "evaluation decodes greedily by default",
            )
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise _err("num_threads", cfg.num_threads, "must be >= 1, or None for torch's choice")
    if not 0 < cfg.top_p <= 1:
        raise _err("top_p", cfg.top_p, "must be in (0, 1]")
    if not cfg.target_kl > 0:
        raise _err("target_kl", cfg.target_kl, "must be > 0")
    if not cfg.max_log_ratio > 0:
        raise _err("max_log_ratio", cfg.max_log_ratio, "must be > 0")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise _err(name, getattr(cfg, name), "must be in [0, 1)")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise _err("max_steps", cfg.max_steps, "must be -1 (use num_epochs) or >= 1")
    if cfg.save_total_limit is not None and cfg.save_total_limit < 1:
        raise _err("save_total_limit", cfg.save_total_limit, "must be None or >= 1")


def _check_objective(cfg: GSPOConfig) -> None:
    """policy_loss with importance_sampling_level, loss_aggregation and its options (gspo.core's rules)."""
    spec, level = policy_loss_spec(cfg.policy_loss), cfg.importance_sampling_level
    if level not in spec.clip:
        raise _err(
            "importance_sampling_level",
            level,
            f"policy_loss={cfg.policy_loss!r} is defined at {list(spec.clip)} only ({spec.level_rule})",
        )
    allowed = allowed_aggregations(cfg.policy_loss, level)
    if cfg.loss_aggregation not in (None,) + allowed:
        raise _err(
            "loss_aggregation",
            cfg.loss_aggregation,
            f"importance_sampling_level={level!r} is defined per sequence (mean over sequences); only None or "
            "'seq-mean-token-mean' apply"
            if level != "token"
            else f"policy_loss={cfg.policy_loss!r} at token level takes None or one of {list(allowed)}",
        )
    n = cfg.loss_aggregation_norm_length
    if n is not None and n < 1:
        raise _err("loss_aggregation_norm_length", n, "must be >= 1, or None for max_new_tokens")
    if n is not None and cfg.loss_aggregation_in_force != "seq-mean-token-sum-norm":
        raise _err(
            "loss_aggregation_norm_length",
            n,
            "applies only with loss_aggregation='seq-mean-token-sum-norm' (importance_sampling_level='token'); "
            f"the aggregation in force is {cfg.loss_aggregation_in_force!r}",
        )
    for name in ("sapo_tau_pos", "sapo_tau_neg"):
        if not getattr(cfg, name) > 0:
            raise _err(name, getattr(cfg, name), "must be > 0 (the temperature of SAPO's gate)")


def _check_combinations(cfg: GSPOConfig) -> None:
    if cfg.advantage_type == "normalized" and not cfg.use_group_normalization:
        raise ConfigError(
            "GSPOConfig.advantage_type='normalized' contradicts use_group_normalization=False: "
            "set use_group_normalization=True, or advantage_type='relative' for unnormalised advantages."
        )
    rollout = cfg.batch_size * cfg.group_size
    if rollout % cfg.num_mini_batches:
        raise _err(
            "num_mini_batches",
            cfg.num_mini_batches,
            f"must divide batch_size * group_size = {cfg.batch_size} * {cfg.group_size} = {rollout}",
        )
    mini = rollout // cfg.num_mini_batches
    if mini % cfg.gradient_accumulation_steps:
        raise _err(
            "gradient_accumulation_steps",
            cfg.gradient_accumulation_steps,
            f"must divide the mini-batch of {mini} sequences (batch_size * group_size / num_mini_batches)",
        )
    if cfg.mixed_precision == "bf16" and cfg.torch_dtype == "float16":
        raise _err(
            "mixed_precision",
            cfg.mixed_precision,
            "bf16 autocast over float16 weights mixes two half "
            "precisions: use torch_dtype='float32' (master weights) or 'bfloat16'",
        )
    _check_engine(cfg)
    _check_overlong(cfg)
    _check_episodes(cfg)
    unknown = set(cfg.report_to) - {"jsonl", "tensorboard", "wandb", "none"}
    if unknown:
        raise _err("report_to", cfg.report_to, "entries must be among 'jsonl', 'tensorboard', 'wandb'")
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(cfg.reward_funcs):
        raise _err(
            "reward_weights",
            cfg.reward_weights,
            f"needs one weight per entry of reward_funcs ({len(cfg.reward_funcs)})",
        )


def _reward_names(cfg: GSPOConfig) -> list:
    """The names of reward_funcs given as strings or dict specs (callables have no name to match)."""
    return [spec.get("name") if isinstance(spec, dict) else spec for spec in cfg.reward_funcs]


def _check_overlong(cfg: GSPOConfig) -> None:
    n = cfg.overlong_buffer_len
    if n is not None and not 1 <= n < cfg.max_new_tokens:
        raise _err(
            "overlong_buffer_len",
            n,
            f"L_cache must be >= 1 and < max_new_tokens={cfg.max_new_tokens} (L_max), so that some lengths go "
            "unpunished",
        )
    if not cfg.overlong_penalty >= 0:
        raise _err("overlong_penalty", cfg.overlong_penalty, "must be >= 0 (it is subtracted)")
    if n is None and "soft_overlong_punishment" in _reward_names(cfg):
        raise _err(
            "overlong_buffer_len",
            None,
            "reward_funcs has 'soft_overlong_punishment', which needs L_cache: set overlong_buffer_len to an int in "
            f"[1, max_new_tokens={cfg.max_new_tokens})",
        )


def _check_episodes(cfg: GSPOConfig) -> None:
    if cfg.tools and cfg.environment is not None:
        raise _err(
            "environment",
            cfg.environment,
            f"an episode is defined by tools or by an environment, not both (tools={cfg.tools}); an environment can "
            "call tools itself in step()",
        )
    for i, ref in enumerate(cfg.tools):
        if not callable(ref) and not (isinstance(ref, str) and ":" in ref):
            raise _err("tools", cfg.tools, f"entry {i} ({ref!r}) must be 'module:function' or 'path/file.py:function'")
    if cfg.environment is not None and ":" not in cfg.environment:
        raise _err("environment", cfg.environment, "must be 'module:Class' or 'path/to/file.py:Class'")
    if cfg.max_episode_tokens is not None and cfg.max_episode_tokens < 1:
        raise _err("max_episode_tokens", cfg.max_episode_tokens, "must be >= 1, or None for max_new_tokens * max_turns")
    if not cfg.tool_timeout_s > 0:
        raise _err("tool_timeout_s", cfg.tool_timeout_s, "must be > 0")
    if cfg.multi_turn and "soft_overlong_punishment" in _reward_names(cfg):
        raise _err(
            "reward_funcs",
            cfg.reward_funcs,
            "'soft_overlong_punishment' measures a completion against max_new_tokens, which bounds one model turn of a "
            "multi-turn episode (tools / environment) and not the episode: leave it out of episode runs",
        )
    if cfg.chat_template is not None and not os.path.isfile(os.path.expanduser(cfg.chat_template)):
        raise _err("chat_template", cfg.chat_template, "must be a Jinja template file that exists")


def _check_engine(cfg: GSPOConfig) -> None:
    if cfg.old_logprobs_source == "engine" and cfg.rollout_engine != "vllm":
        raise _err(
            "old_logprobs_source", "engine", "needs rollout_engine='vllm' (the 'hf' engine returns no log-probs)"
        )
    if cfg.old_logprobs_source == "engine" and cfg.importance_sampling_level == "token":
        raise _err(
            "old_logprobs_source",
            "engine",
            "is for the sequence levels (GSPO paper §5.4: only sequence likelihoods tolerate the engine's precision "
            "mismatch); with importance_sampling_level='token' use old_logprobs_source='trainer', optionally with "
            "engine_is_correction='token_truncate', or importance_sampling_level='sequence' / 'sequence_token'",
        )
    if cfg.engine_is_correction != "none" and (cfg.rollout_engine != "vllm" or cfg.old_logprobs_source != "trainer"):
        raise _err(
            "engine_is_correction",
            cfg.engine_is_correction,
            "corrects pi_old from the trainer for a vLLM engine's sampling: needs rollout_engine='vllm' and "
            "old_logprobs_source='trainer' (with 'engine', pi_old already is the sampling distribution)",
        )
    _check_critic(cfg)
    if not cfg.engine_is_cap > 1.0:
        raise _err("engine_is_cap", cfg.engine_is_cap, "must be > 1")
    if not cfg.engine_mismatch_tolerance > 0:
        raise _err("engine_mismatch_tolerance", cfg.engine_mismatch_tolerance, "must be > 0")
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        raise _err("vllm_gpu_memory_utilization", cfg.vllm_gpu_memory_utilization, "must be in (0, 1]")
    if cfg.vllm_max_model_len is not None and cfg.vllm_max_model_len <= cfg.max_new_tokens:
        raise _err("vllm_max_model_len", cfg.vllm_max_model_len, f"must exceed max_new_tokens={cfg.max_new_tokens}")
    if not cfg.vllm_cpu_kv_cache_gb > 0:
        raise _err("vllm_cpu_kv_cache_gb", cfg.vllm_cpu_kv_cache_gb, "must be > 0")
    if cfg.vllm_block_size is not None and cfg.vllm_block_size < 1:
        raise _err("vllm_block_size", cfg.vllm_block_size, "must be >= 1, or None for vLLM's default")


def _check_critic(cfg: GSPOConfig) -> None:
    lam = cfg.gae_lambda
    if lam != "adaptive" and not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0 <= lam <= 1):
        raise _err("gae_lambda", lam, "must be a number in [0, 1] or 'adaptive'")
    if cfg.advantage_estimator == "gae" and cfg.importance_sampling_level == "sequence":
        raise _err(
            "advantage_estimator",
            "gae",
            "GAE gives one advantage per token and importance_sampling_level='sequence' (GSPO, Eq. 5) takes one "
            "per sequence: use importance_sampling_level='token' (PPO / VAPO) or 'sequence_token' (GSPO-token, "
            "Eq. 13-14), or advantage_estimator='group'",
        )
    if cfg.kl_in_reward and cfg.advantage_estimator != "gae":
        raise _err("kl_in_reward", True, "needs advantage_estimator='gae' (group advantages have no per-token reward)")
    for name in ("value_learning_rate", "value_clip_range", "length_adaptive_alpha"):
        if not getattr(cfg, name) > 0:
            raise _err(name, getattr(cfg, name), "must be > 0")
    if not 0 < cfg.gamma <= 1:
        raise _err("gamma", cfg.gamma, "must be in (0, 1]")
    if not 0 <= cfg.gae_lambda_value <= 1:
        raise _err("gae_lambda_value", cfg.gae_lambda_value, "must be in [0, 1]")
    if cfg.value_warmup_steps < 0 or cfg.positive_nll_coef < 0:
        bad = "value_warmup_steps" if cfg.value_warmup_steps < 0 else "positive_nll_coef"
        raise _err(bad, getattr(cfg, bad), "must be >= 0")


def _looks_local(name: str) -> bool:
    """A hub id is 'owner/name' or 'name'; anything else (./x, /x, ~/x, a/b/c) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name)


def _check_paths(cfg: GSPOConfig) -> None:
    for name in ("policy_model_name", "reward_model_name", "value_model_name"):
        v = getattr(cfg, name)
        if v is None or v.startswith(BUILTIN_MODEL_PREFIX):
            continue
        if _looks_local(v) and not os.path.isdir(os.path.expanduser(v)):
            raise _err(name, v, "this local model directory does not exist")
    if cfg.policy_model_name.startswith(BUILTIN_MODEL_PREFIX) and cfg.policy_model_name not in BUILTIN_MODELS:
        raise _err(
            "policy_model_name", cfg.policy_model_name, f"must be one of the built-in models {list(BUILTIN_MODELS)}"
        )
    for name in ("dataset_path", "eval_dataset_path"):
        v = getattr(cfg, name)
        generated = v is not None and v.startswith((BUILTIN_MODEL_PREFIX, REASONING_GYM_PREFIX))
        if v is not None and not generated and not os.path.exists(os.path.expanduser(v)):
            raise _err(name, v, "no such file or directory")


def _check_moe(cfg: GSPOConfig) -> None:
    """What Routing Replay needs (whether the model is MoE is checked when it loads: gspo.moe.build_routing)."""
    if cfg.router_aux_loss_coef is not None and cfg.router_aux_loss_coef < 0:
        raise _err("router_aux_loss_coef", cfg.router_aux_loss_coef, "must be >= 0, or None for the model's own")
    if cfg.routing_replay == "rollout" and cfg.rollout_engine != "hf":
        raise _err(
            "routing_replay",
            "rollout",
            "R3 needs the experts the rollout engine chose while sampling, and the vLLM engine cannot return them "
            "here (vLLM's CPU build: enable_return_routed_experts needs a runner that needs Triton); use "
            "rollout_engine 'hf', or routing_replay 'old' (R2), or GSPO, which needs no replay",
        )
    if cfg.routing_replay == "rollout" and (cfg.tools or cfg.environment is not None):
        raise _err("routing_replay", "rollout", "not with multi-turn episodes yet (each turn is a generate of its own)")
    if cfg.routing_replay == "old" and cfg.pi_old_source == "engine":
        raise _err(
            "routing_replay",
            "old",
            "pi_old's experts come from a trainer pass, and old_logprobs_source='engine' takes pi_old from the engine",
        )
    if cfg.routing_replay != "none" and cfg.gradient_checkpointing:
        raise _err(
            "routing_replay",
            cfg.routing_replay,
            "not with gradient_checkpointing (the backward's recompute would route afresh)",
        )


def _check_generated_data(cfg: GSPOConfig) -> None:
    """A system_prompt that looks like a file path names a file; reasoning-gym train and eval sets differ."""
    sp = cfg.system_prompt
    if sp is not None and not any(ch.isspace() for ch in sp) and ("/" in sp or sp.endswith((".txt", ".md"))):
        if not os.path.isfile(os.path.expanduser(sp)):
            raise _err(
                "system_prompt", sp, "it looks like a file path, and no such file exists (give the text, or a file)"
            )
    train, held_out = (_reasoning_gym_key(cfg, v) for v in (cfg.dataset_path, cfg.eval_dataset_path))
    if train is not None and train == held_out:
        raise _err(
            "eval_dataset_path",
            cfg.eval_dataset_path,
            f"it builds reasoning-gym task {train[0]!r} with the same seed ({train[1]}) as dataset_path, so its items "
            "are the first training items; give it another seed= (a spec without one takes GSPOConfig.seed)",
        )


def _reasoning_gym_key(cfg: GSPOConfig, spec: Optional[str]):
    """(task, seed) of a reasoning_gym: dataset spec, else None."""
    if not spec or not spec.startswith(REASONING_GYM_PREFIX):
        return None
    from urllib.parse import parse_qsl

    task, _, query = spec[len(REASONING_GYM_PREFIX) :].partition("?")
    seed = dict(parse_qsl(query)).get("seed", str(cfg.seed))
    return task, seed


def validate(cfg: GSPOConfig) -> None:
    """Check every field once; raise ConfigError naming the field, value and what is allowed."""
    _check_types(cfg)
    _check_choices(cfg)
    _check_objective(cfg)
    _check_ranges(cfg)
    _check_combinations(cfg)
    _check_paths(cfg)
    _check_generated_data(cfg)
    _check_moe(cfg)
