"""Tests for gspo.checkpoint: atomic saves, exact resume, pruning, crash safety, final export."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gspo import checkpoint as ckpt

VOCAB = ["<pad>", "<eos>", "<unk>"] + list("0123456789+-=*/ abcdefghijklmnopq")


def make_tokenizer():
    """A character-level tokenizer built offline with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_model(seed=0, tie=False, hidden=32, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg)


def make_optim(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return opt, sched


def train_step(model, opt, sched):
    ids = torch.randint(3, len(VOCAB), (2, 8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_optimizer(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for idx, state in sa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["state"][idx][name]), (idx, name)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, tie):
    model, tok = make_model(seed=0, tie=tie), make_tokenizer()
    opt, sched = make_optim(model)
    train_step(model, opt, sched)
    state = {"kl_controller": {"kl_coef": 0.21}, "skips": {"consecutive": 0}}
    path = ckpt.save_checkpoint(tmp_path, 3, model, tokenizer=tok, optimizer=opt, scheduler=sched, trainer_state=state)
    assert path == tmp_path / "checkpoint-3" and (path / "complete").is_file()
    expected_rand = (torch.rand(4), random.random(), np.random.rand(3))

    fresh = make_model(seed=1, tie=tie)
    fresh_opt, fresh_sched = make_optim(fresh)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # scramble the RNGs
    restored = ckpt.load_checkpoint(path, fresh, fresh_opt, fresh_sched)

    assert restored == {"step": 3, **state}
    assert torch.equal(torch.rand(4), expected_rand[0])
    assert random.random() == expected_rand[1]
    assert np.array_equal(np.random.rand(3), expected_rand[2])
    assert_same_params(model, fresh)
    assert_same_optimizer(opt, fresh_opt)
    assert fresh_sched.state_dict() == sched.state_dict()
    if tie:
        assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    # Training continues identically from the restored state.
    torch.manual_seed(7)
    train_step(model, opt, sched)
    torch.manual_seed(7)
    train_step(fresh, fresh_opt, fresh_sched)
    assert_same_params(model, fresh)


def test_load_unwraps_module_and_skips_rng_when_asked(tmp_path):
    class Wrapper(torch.nn.Module):  # stands in for DDP / accelerate wrapping
        def __init__(self, m):
            super().__init__()
            self.module = m

    model = make_model()
    path = ckpt.save_checkpoint(tmp_path, 1, Wrapper(model), trainer_state={})
    assert not (path / "optimizer.pt").exists() and not (path / "tokenizer.json").exists()
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    fresh = make_model(seed=9)
    torch.manual_seed(5)
    ckpt.load_checkpoint(path, Wrapper(fresh), restore_rng=False)
    assert torch.equal(torch.rand(2), expected)
    assert_same_params(model, fresh)


def test_missing_optimizer_file_and_bad_weights_are_clear_errors(tmp_path):
    model = make_model()
    path = ckpt.save_checkpoint(tmp_path, 1, model, trainer_state={})
    opt, _ = make_optim(model)
    with pytest.raises(FileNotFoundError, match="optimizer.pt"):
        ckpt.load_checkpoint(path, model, optimizer=opt)
    with pytest.raises(RuntimeError, match="lacks|lack"):
        ckpt.load_checkpoint(path, make_model(layers=3))


def test_trainer_state_must_be_json(tmp_path):
    with pytest.raises(TypeError):
        ckpt.save_checkpoint(tmp_path, 1, make_model(), trainer_state={"bad": object()})
    assert ckpt.find_latest_checkpoint(tmp_path) is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_save_total_limit_prunes_oldest(tmp_path):
    model = make_model()
    for step in (5, 10, 15, 20):
        ckpt.save_checkpoint(tmp_path, step, model, trainer_state={}, save_total_limit=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["checkpoint-15", "checkpoint-20"]
    # Re-saving an existing step replaces it in place.
    ckpt.save_checkpoint(tmp_path, 20, model, trainer_state={"again": True}, save_total_limit=2)
    assert json.loads((tmp_path / "checkpoint-20" / "trainer_state.json").read_text())["again"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15", "checkpoint-20"]


def test_incomplete_dirs_are_ignored_and_resolve(tmp_path):
    assert ckpt.find_latest_checkpoint(tmp_path / "nope") is None
    with pytest.raises(FileNotFoundError, match="no complete"):
        ckpt.resolve_checkpoint(tmp_path, "latest")
    model = make_model()
    good = ckpt.save_checkpoint(tmp_path, 2, model, trainer_state={})
    (tmp_path / "checkpoint-9").mkdir()  # no marker: an interrupted save from another tool
    (tmp_path / "checkpoint-9" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-checkpoint-7-999999").mkdir()
    (tmp_path / "checkpoint-notanumber").mkdir()
    assert ckpt.find_latest_checkpoint(tmp_path) == good
    assert ckpt.resolve_checkpoint(tmp_path, "latest") == good
    assert ckpt.resolve_checkpoint(tmp_path, str(good)) == good
    assert ckpt.resolve_checkpoint("/elsewhere", str(tmp_path)) == good  # a run dir resolves to its newest
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-9"))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "checkpoint-9", model)
    with pytest.raises(FileNotFoundError):
        ckpt.resolve_checkpoint(tmp_path, str(tmp_path / "checkpoint-100"))
    with pytest.raises(ValueError):
        ckpt.resolve_checkpoint(tmp_path, "")


_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_model, make_optim, make_tokenizer, train_step
    from gspo import checkpoint as ckpt
    torch.set_num_threads(1)
    model, tok = make_model(hidden=384, layers=4), make_tokenizer()
    opt, sched = make_optim(model)
    train_step(model, opt, sched)  # non-empty optimizer state; then the loop is all saving
    for step in range(1, 10_000):
        ckpt.save_checkpoint({out!r}, step, model, tokenizer=tok, optimizer=opt, scheduler=sched,
                             trainer_state={{"step": step}}, save_total_limit=3)
        print(step, flush=True)
""")


def _wait_for_temp_dir(out, child, timeout=60.0):
    """Poll until the child is inside a save (its temp dir exists), so the kill lands mid-save."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if any(name.startswith(".tmp-checkpoint-") for name in os.listdir(out)):
            return True
        time.sleep(0.001)
    return False


def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    code = _CHILD.format(tests=os.path.dirname(__file__), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = child.stdout.readline()  # one checkpoint finished
        assert first.strip() == "1", f"child failed before its first checkpoint (rc={child.poll()})"
        assert _wait_for_temp_dir(out, child), "child never started a second save"
        time.sleep(random.uniform(0.0, 0.2))  # a random moment inside (or just after) that save
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    latest = ckpt.find_latest_checkpoint(out)
    assert latest is not None
    for d in out.iterdir():  # every checkpoint-* dir that exists is complete
        if d.name.startswith("checkpoint-"):
            assert (d / "complete").is_file(), d
    model = make_model(hidden=384, layers=4, seed=3)
    opt, sched = make_optim(model)
    state = ckpt.load_checkpoint(latest, model, opt, sched)
    assert state["step"] == int(latest.name.split("-")[1])
    assert opt.state_dict()["state"]
    # The next save from a new process cleans the dead process's temp dir.
    ckpt.save_checkpoint(out, state["step"] + 1, model, optimizer=opt, scheduler=sched, trainer_state={})
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def _greedy(model, tok, text="1+2="):
    ids = tok(text, return_tensors="pt").input_ids
    return model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)


def test_save_final_model_reloads_with_auto_class(tmp_path):
    model, tok = make_model(tie=True), make_tokenizer()
    model.generation_config.eos_token_id = None  # generate all 5 tokens
    (tmp_path / "gspo_config.json").write_text("{}")  # run files already in output_dir stay
    (tmp_path / "adapter_config.json").write_text("{}")  # stale adapter from an earlier export
    out = ckpt.save_final_model(model, tok, tmp_path)
    assert out == tmp_path and (tmp_path / "gspo_config.json").is_file()
    assert not (tmp_path / "adapter_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok2 = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert_same_params(model, reloaded)
    assert torch.equal(_greedy(model, tok), _greedy(reloaded, tok2))
    assert _greedy(reloaded, tok2).shape[1] == len("1+2=") + 5


def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return peft_model


def _lora_params(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def test_peft_adapter_round_trip(tmp_path):
    pytest.importorskip("peft")
    model = _lora(make_model(seed=0))
    opt, sched = make_optim(model)
    train_step(model, opt, sched)  # lora_B starts at zero; one step makes it non-trivial
    path = ckpt.save_checkpoint(
        tmp_path, 4, model, tokenizer=make_tokenizer(), optimizer=opt, scheduler=sched, trainer_state={"k": 1}
    )
    assert (path / "adapter_model.safetensors").is_file() and not (path / "model.safetensors").exists()

    fresh = _lora(make_model(seed=0))  # same base weights, fresh adapters
    fresh_opt, fresh_sched = make_optim(fresh)
    assert not all(torch.equal(v, _lora_params(fresh)[k]) for k, v in _lora_params(model).items())
    assert ckpt.load_checkpoint(path, fresh, fresh_opt, fresh_sched)["k"] == 1
    before, after = _lora_params(model), _lora_params(fresh)
    assert before.keys() == after.keys() and before
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_same_optimizer(opt, fresh_opt)


def test_peft_mismatches_are_clear_errors(tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    path = ckpt.save_checkpoint(tmp_path, 1, _lora(make_model()), trainer_state={})
    other = get_peft_model(make_model(), LoraConfig(r=4, target_modules=["k_proj"]))
    with pytest.raises(RuntimeError, match="adapter weights do not fit"):
        ckpt.load_checkpoint(path, other)
    with pytest.raises(ValueError, match="same use_lora"):
        ckpt.load_checkpoint(path, make_model())
    plain = ckpt.save_checkpoint(tmp_path, 2, make_model(), trainer_state={})
    with pytest.raises(ValueError, match="same use_lora"):
        ckpt.load_checkpoint(plain, _lora(make_model()))


def test_peft_final_model_adapter_and_merged(tmp_path):
    pytest.importorskip("peft")
    model = _lora(make_model(seed=0))
    opt, sched = make_optim(model)
    train_step(model, opt, sched)
    ids = torch.randint(3, len(VOCAB), (1, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    ckpt.save_final_model(model, make_tokenizer(), tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ckpt.save_final_model(model, make_tokenizer(), tmp_path / "merged", merge_lora=True)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora_" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
