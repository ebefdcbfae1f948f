"""Local, offline fixtures for the data and reward tests: a character-level tokenizer
and a tiny one-label reward model, built from scratch (no hub downloads)."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# A simple chat template: "<bos>" then "<role>content\n" per message, then "<assistant>".
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer(chat_template: bool = False) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character; adds <bos> in front by default."""
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tiny_reward_model(path, num_labels: int = 1, seed: int = 0) -> str:
    """A 2-layer, 32-wide LlamaForSequenceClassification plus the char tokenizer, saved to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_labels=num_labels,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
