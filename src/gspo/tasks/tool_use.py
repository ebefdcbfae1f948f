"""An offline task where a tool visibly helps: two-digit multiplication with a `calculator` tool.

"37*48=" -> "1776". The tiny character-level model (gspo.tasks.tiny_model's architecture, 128 positions) gets
almost none of these right by itself, and a calculator solves them: an episode that calls

    <tool_call>{"name":"calculator","arguments":{"expression":"37*48"}}</tool_call><eos>

reads `<tool>1776` back and only has to copy it. The warm start imitates a teacher that calls the tool on
TOOL_RATE of the problems and answers directly (correctly) on the rest; the model learns the tool call's
format and to copy the result, but calls the tool only as often as the teacher did. GSPO with a correctness
reward (exact_answer on the last turn) then raises the tool-call rate, and with it the accuracy:
`gspo demo --task tools`.

The tokenizer's chat template renders the tool names after a <tools> marker, each message after a role
token, and closes an assistant turn with <eos>; it is prefix-preserving, as multi-turn episodes need
(gspo.episodes.template).
"""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import random
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

RECIPE_VERSION = "v1"
MODEL_NAME = "tiny-tools"
TOOL_RATE = 0.3  # share of the warm start's problems on which the teacher calls the calculator
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<tools>", "<user>", "<assistant>", "<tool>")
CALL_TOKENS = ("<tool_call>", "</tool_call>")  # ordinary tokens: they stay in decoded text, for the parser
CHARS = string.printable[:95]  # every printable ASCII character (tool errors are read back by the model), then "\n"
MAX_POSITIONS = 128
MAX_NEW_TOKENS = 64  # per model turn: a tool call is 59 tokens
EVAL_FRACTION = 0.15
SFT_STEPS = 400
SFT_BATCH = 64
SFT_LR = 1e-3
SFT_SEED = 1234
CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<tools>' }}{%- for t in tools %}{{ t['function']['name'] }}{%- endfor %}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{ '<assistant>' + m['content'] + '<eos>' }}"
    "{%- elif m['role'] == 'tool' %}{{ '<tool>' + m['content'] }}"
    "{%- else %}{{ '<user>' + m['content'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<assistant>' }}{%- endif %}"
)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculator(expression: str) -> str:
    """Evaluate an integer arithmetic expression with +, - and *.

    Args:
        expression: The expression to evaluate, for example "37*48".
    """

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not an integer expression with +, -, *: {expression!r}")

    if len(expression) > 64:
        raise ValueError("expression too long")
    return str(value(ast.parse(expression, mode="eval").body))


# ------------------------------------------------------------------ problems
def _split_of(a: int, b: int) -> str:
    u = int.from_bytes(hashlib.sha256(f"{a}*{b}".encode()).digest()[:4], "big") / 2**32
    return "eval" if u < EVAL_FRACTION else "train"


def make_problems(n: int, seed: int, split: str = "train") -> list:
    """`n` problems "a*b=" (a, b in [10, 99]) of `split`, with their answers; train and eval never share one."""
    pool = [(a, b) for a in range(10, 100) for b in range(10, 100) if _split_of(a, b) == split]
    rng = random.Random(f"tools:{split}:{seed}")
    chosen = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
    return [{"prompt": f"{a}*{b}=", "answer": str(a * b)} for a, b in chosen]


def tool_call_text(expression: str) -> str:
    return '<tool_call>{"name":"calculator","arguments":{"expression":"' + expression + '"}}</tool_call>'


def called_tool(rollout) -> list:
    """Per episode: did the model call a tool (gspo.episodes' per-episode counts)."""
    return [c > 0 for c in rollout.episode_stats["tool_calls"].tolist()]


# ------------------------------------------------------------------ tokenizer and model
def build_tokenizer():
    from gspo.tasks.tiny_model import char_tokenizer

    tok = char_tokenizer(SPECIALS, CHARS, ordinary=CALL_TOKENS, model_max_length=MAX_POSITIONS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def episode_ids(template, problem: dict, *, use_tool: bool, eos: int) -> tuple[list, list]:
    """(ids, loss labels mask) of the teacher's episode for `problem`, laid out exactly as gspo.episodes lays
    out a sampled one: prompt, the model's turns (each closed by <eos>), the template's tokens between them."""
    messages = [{"role": "user", "content": problem["prompt"]}]
    _, prompt = template.prompt_ids(messages)
    ids, model = list(prompt), [0] * len(prompt)
    turns = []
    if use_tool:
        expression = problem["prompt"].rstrip("=")
        turns.append(
            (tool_call_text(expression), [{"role": "tool", "name": "calculator", "content": calculator(expression)}])
        )
    turns.append((problem["answer"], None))
    for text, reply in turns:
        sampled = template.encode(text) + [eos]
        ids += sampled
        model += [1] * len(sampled)
        messages.append({"role": "assistant", "content": text})
        if reply is not None:
            inserted = template.between_turns(messages, reply, eos)
            ids += inserted
            model += [0] * len(inserted)
            messages += reply
    return ids, model


def warm_start(
    model,
    tokenizer,
    *,
    steps: int = SFT_STEPS,
    seed: int = SFT_SEED,
    tool_rate: float = TOOL_RATE,
    verbose: bool = False,
) -> dict:
    """Teacher-forced training on the teacher's episodes; loss on the model's tokens only."""
    from gspo.episodes.template import TurnTemplate
    from gspo.episodes.tools import ToolBox

    template = TurnTemplate(tokenizer, tools=ToolBox([calculator], timeout_s=1.0).schemas)
    rng = random.Random(f"teacher:{seed}")
    torch.manual_seed(seed)
    problems = make_problems(steps * SFT_BATCH, seed=seed, split="train")
    opt = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = [
            episode_ids(template, p, use_tool=rng.random() < tool_rate, eos=tokenizer.eos_token_id)
            for p in problems[step * SFT_BATCH : (step + 1) * SFT_BATCH]
        ]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i, _ in batch])
        attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i, _ in batch])
        labels = torch.tensor([[-100] * (width - len(i)) + [t if m else -100 for t, m in zip(i, k)] for i, k in batch])
        for group in opt.param_groups:
            group["lr"] = SFT_LR * min(1.0, (step + 1) / 20)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if verbose and (step + 1) % 100 == 0:
            print(f"[gspo.tool_use] warm start step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return {"steps": steps, "final_loss": loss.item(), "tool_rate": tool_rate, "seed": seed}


def model_dir(cache_dir=None, seed: int = SFT_SEED, steps: int = SFT_STEPS) -> Path:
    from gspo.tasks.tiny_model import default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    suffix = ("" if seed == SFT_SEED else f"-seed{seed}") + ("" if steps == SFT_STEPS else f"-sft{steps}")
    return root / f"{MODEL_NAME}-{RECIPE_VERSION}{suffix}"


def ensure_tool_model(cache_dir=None, *, seed: int = SFT_SEED, steps: int = SFT_STEPS, verbose: bool = True) -> Path:
    """The warm-started tool-use model's directory, built on first use (atomically, like the arithmetic one)."""
    from gspo.tasks.tiny_model import WARM_START_INFO, build_model

    final = model_dir(cache_dir, seed, steps)
    if (final / WARM_START_INFO).is_file() and (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"[gspo.tool_use] building {final} (warm start of {steps} steps)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            tokenizer = build_tokenizer()
            torch.manual_seed(seed)
            model = build_model(tokenizer, max_position_embeddings=MAX_POSITIONS)
            start = time.time()
            record = warm_start(model, tokenizer, steps=steps, seed=seed, verbose=verbose)
            record.update(wall_time_s=time.time() - start, recipe_version=RECIPE_VERSION)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / WARM_START_INFO).write_text(json.dumps(record, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tool_model(path: Optional[Path] = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path) if path is not None else ensure_tool_model()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
