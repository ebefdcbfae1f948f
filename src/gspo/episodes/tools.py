"""Tools for multi-turn episodes: schemas, the tool-call parsers, and calls that cannot stop a run.

A tool is a typed Python function with a Google-style docstring; its JSON schema comes from transformers'
`get_json_schema` and reaches the model through the chat template (`apply_chat_template(..., tools=...)`).

The model's calls are parsed from its text by a parser named in GSPOConfig.tool_call_parser: 'hermes' (the
Hermes / Qwen format `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, what Qwen2.5 / Qwen3 and
Hermes models emit) or a reference 'module:function' / 'path/file.py:function' to a function
`text -> list[ToolCall]`.

Every failure of a call becomes text the model reads in the tool message, and is counted: a malformed call
(bad JSON, no name, unknown tool, arguments that do not bind), a tool that raises, a tool that runs past
tool_timeout_s. None of them stops the run.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call parsed from the model's text; `error` says why it cannot be run (then name/arguments may be empty)."""

    name: str = ""
    arguments: dict = field(default_factory=dict)
    error: Optional[str] = None


@dataclass(frozen=True)
class ToolResult:
    name: str
    content: str  # what the model reads (the result, or the error)
    failed: bool


def parse_hermes(text: str) -> list:
    """Every `<tool_call>{...}</tool_call>` block in `text`, in order. A block that is not a JSON object with a
    string "name" and an object "arguments" (a JSON string holding an object is accepted, as some models
    write it) is returned as a ToolCall with an error; an unclosed `<tool_call>` is one too."""
    calls = [_hermes_block(body) for body in HERMES_CALL.findall(text)]
    tail = HERMES_CALL.sub("", text)
    if "<tool_call>" in tail:
        calls.append(ToolCall(error="a <tool_call> without its closing </tool_call>"))
    return calls


def _hermes_block(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall(error=f"the tool call is not valid JSON ({e.msg} at character {e.pos})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(error='a tool call must be a JSON object with a string "name"')
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    if not isinstance(args, dict):
        return ToolCall(name=obj["name"], error='"arguments" must be a JSON object')
    return ToolCall(name=obj["name"], arguments=args)


TOOL_CALL_PARSERS = {"hermes": parse_hermes}


def resolve_parser(spec) -> Callable:
    """A parser by name (TOOL_CALL_PARSERS), by reference ('module:fn', 'path/file.py:fn'), or a callable."""
    if callable(spec):
        return spec
    if spec in TOOL_CALL_PARSERS:
        return TOOL_CALL_PARSERS[spec]
    from gspo.config import ConfigError
    from gspo.references import resolve_reference

    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(
            f"GSPOConfig.tool_call_parser={spec!r} is not allowed: expected one of {sorted(TOOL_CALL_PARSERS)} or "
            "'module:function' / 'path/to/file.py:function'"
        )
    return resolve_reference(spec, what="tool_call_parser", error=ConfigError)


class ToolBox:
    """The tools of a run by name, their schemas, and calls bounded by a timeout."""

    def __init__(self, tools: list, *, timeout_s: float) -> None:
        from transformers.utils import get_json_schema

        self.timeout_s = timeout_s
        self.functions: dict = {}
        self.schemas: list = []
        for tool in tools:
            name = getattr(tool, "__name__", None)
            if not callable(tool) or not name:
                raise ValueError(f"a tool must be a named Python function, got {tool!r}")
            if name in self.functions:
                raise ValueError(f"two tools are named {name!r}; tool names must be unique")
            try:
                schema = get_json_schema(tool)
            except Exception as e:  # transformers' DocstringParsingException / TypeHintParsingException
                raise ValueError(
                    f"tool {name!r}: transformers.utils.get_json_schema could not build its schema ({e}); a tool needs "
                    "type hints on every argument and a docstring with an Args: section describing each"
                ) from e
            self.functions[name] = tool
            self.schemas.append(schema)

    def __bool__(self) -> bool:
        return bool(self.functions)

    def run(self, call: ToolCall) -> ToolResult:
        """The call's result as text, or an error message for the model; never raises."""
        if call.error is not None:
            return ToolResult(call.name, f"Error: {call.error}", failed=True)
        fn = self.functions.get(call.name)
        if fn is None:
            return ToolResult(call.name, f"Error: unknown tool {call.name!r}; tools: {sorted(self.functions)}", True)
        try:
            inspect.signature(fn).bind(**call.arguments)
        except TypeError as e:
            return ToolResult(call.name, f"Error: wrong arguments for {call.name}: {e}", failed=True)
        done, out = _call_with_timeout(fn, call.arguments, self.timeout_s)
        if not done:
            return ToolResult(call.name, f"Error: {call.name} did not return within {self.timeout_s:g} s", True)
        raised, out = out
        if raised:  # the tool's own failure (sys.exit too): the model reads it
            return ToolResult(call.name, f"Error: {call.name} raised {type(out).__name__}: {out}", failed=True)
        return ToolResult(call.name, out if isinstance(out, str) else json.dumps(out, default=str), failed=False)


def _call_with_timeout(fn, arguments: dict, timeout_s: float) -> tuple[bool, object]:
    """(returned in time, (raised, its value or exception)). A daemon thread per call: one that never
    returns is abandoned, and cannot keep the process from exiting."""
    box: list = []

    def target():
        try:
            box.append((False, fn(**arguments)))
        except BaseException as e:  # noqa: BLE001  SystemExit or math-verify's TimeoutException included
            box.append((True, e))

    thread = threading.Thread(target=target, name="gspo-tool", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return (bool(box), box[0] if box else None)
