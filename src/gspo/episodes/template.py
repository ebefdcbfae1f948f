"""Token ids between two model turns, from the chat template, without re-encoding what the model sampled.

An episode's completion is the model's sampled ids, turn after turn, with the tokens the environment inserts
between them. Those inserted tokens are the difference between the template rendered with and without the
new messages:

    render(conversation + new, add_generation_prompt=True) = render(conversation) + delta

conversation ending with the assistant turn just sampled. `delta` is tokenized on its own and appended after
the model's ids; nothing before it is ever decoded and encoded again, so the ids trained on are the ids sampled
(re-tokenising decoded text is not: verl #3720, #3960, TRL #5144).

One more piece: the template closes an assistant turn with its end-of-turn string ("<|im_end|>\\n" for
Qwen). The model sampled the end-of-turn token itself; what the template writes after it (the "\\n") is
inserted too, ahead of delta.

This needs a template that is prefix-preserving: rendering more messages only appends. Not every released one
is (Qwen3's drops earlier turns' <think> blocks once a new user message arrives; TRL ships fixed templates for
Qwen3, GPT-OSS and Llama 3). `check_prefix_preserving` tries it once at start-up, `between_turns` at every
turn, and either stops with an error naming the tokenizer and the first difference; GSPOConfig.chat_template
takes a fixed template (a Jinja file).
"""

from __future__ import annotations

from typing import Optional

PROBE_USER, PROBE_ANSWER, PROBE_OBSERVATION = "What is 2+3?", "GSPO_PROBE_ANSWER 5", "GSPO_PROBE_OBSERVATION 5"


class TemplateError(ValueError):
    """The chat template cannot build token-exact episodes; the message says what differed."""


class TurnTemplate:
    """The chat template of one tokenizer (or an override), bound to a run's tool schemas."""

    def __init__(self, tokenizer, *, tools: Optional[list] = None, chat_template: Optional[str] = None) -> None:
        self.tokenizer, self.tools = tokenizer, tools or None
        self.template = chat_template  # None: the tokenizer's own
        if self.template is None and not getattr(tokenizer, "chat_template", None):
            raise TemplateError(
                f"multi-turn episodes need a chat template, and the tokenizer {self.name} has none: set "
                "GSPOConfig.chat_template to a Jinja file"
            )
        self.closer = self._assistant_closer()

    @property
    def name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", None) or type(self.tokenizer).__name__

    def render(self, messages: list, *, generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages),
            tools=self.tools,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, messages: list) -> tuple[str, list]:
        """The first model turn's context: the messages rendered with the tools and the generation prompt."""
        text = self.render(messages, generation_prompt=True)
        return text, self.encode(text)

    def between_turns(self, conversation: list, new: list, sampled_eos: Optional[int]) -> list:
        """Token ids to insert after the model's last turn (the last message of `conversation`) so that the
        model's next turn follows `new`: the rest of the template's end-of-turn string (after the model's own
        end-of-turn token `sampled_eos`), then the rendered `new` messages and the generation prompt."""
        before = self.render(conversation)
        after = self.render(conversation + list(new), generation_prompt=True)
        if not after.startswith(before):
            raise TemplateError(self._not_a_prefix(before, after, "this episode's conversation"))
        closer = self.closer
        if sampled_eos is not None:
            eos_text = self.tokenizer.decode([sampled_eos], skip_special_tokens=False)
            if eos_text and closer.startswith(eos_text):
                closer = closer[len(eos_text) :]  # the model wrote that part itself
        return self.encode(closer + after[len(before) :])

    def check_prefix_preserving(self, observation_role: str) -> None:
        """Start-up check on a probe episode: a `observation_role` message ('tool' or 'user') and the next
        generation prompt only append to the rendered conversation."""
        conversation = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ANSWER}]
        new = [self.observation(observation_role, PROBE_OBSERVATION, name="probe")]
        before = self.render(conversation)
        after = self.render(conversation + new, generation_prompt=True)
        if not after.startswith(before):
            raise TemplateError(
                self._not_a_prefix(before, after, f"a probe episode with a {observation_role!r} message")
            )

    @staticmethod
    def observation(role: str, content: str, *, name: Optional[str] = None) -> dict:
        return {"role": role, "content": content, **({"name": name} if role == "tool" and name else {})}

    def _assistant_closer(self) -> str:
        """What the template writes after an assistant message's content (e.g. '<|im_end|>\\n')."""
        text = self.render([{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_ANSWER}])
        at = text.rfind(PROBE_ANSWER)
        if at < 0:
            raise TemplateError(
                f"the chat template of {self.name} does not render an assistant message's content; multi-turn "
                "episodes need one that does (GSPOConfig.chat_template)"
            )
        return text[at + len(PROBE_ANSWER) :]

    def _not_a_prefix(self, before: str, after: str, where: str) -> str:
        at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
        return (
            f"the chat template of {self.name} is not prefix-preserving on {where}: rendering the conversation "
            f"with the new messages changes what was already rendered, at character {at}: "
            f"{before[max(0, at - 40) : at + 40]!r} became {after[max(0, at - 40) : at + 40]!r}. The tokens between "
            "turns could not be inserted without re-encoding the model's turns. Set GSPOConfig.chat_template to a "
            "Jinja file whose rendering only appends (docs/multi_turn.md)"
        )
