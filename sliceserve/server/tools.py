"""Chat completions' `tools` and `tool_choice`: checked, offered through the chat template, and,
where a call is required, forced by a grammar.

The tools go to the template as `tools=` (Transformers' convention, OpenAI's shape), so a model is
told about them in the words it was trained on. What the template can do is read from its source:
whether it reads `tools`, whether it writes past turns' `tool_calls`, and which call format it
teaches (server/tool_parsing.py), so a template without tool support is a 400 naming `tools`, not a
prompt that silently leaves them out.

tool_choice:
  - "none": the template is not given the tools, and the answer is plain content. (OpenAI still
    shows them to its models; a template here that sees tools asks for a call in its format, which
    "none" would then hand back as raw markup.)
  - "auto" (the default with tools): the tools are offered and the answer is parsed for calls;
    nothing is forced, so text stays text.
  - "required", or {"type": "function", "function": {"name": ...}}: a grammar (xgrammar) allows
    only one call in the template's format, to one of the offered functions (to the named one),
    its arguments following the function's `parameters` schema, so that even a random-weight
    model answers with a call that parses. Then the answer ends (eos), so ignore_eos and
    min_tokens are refused beside it, as beside response_format; and response_format itself is
    refused beside offered tools (its grammar would leave no room for a call).
An answer that made calls and ended by itself finishes as "tool_calls" (OpenAI's named-function
answers say "stop"; clients look for the calls either way). parallel_tool_calls false keeps the
first call of an "auto" answer; a forced answer always has one.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from sliceserve.server.errors import bad_request
from sliceserve.server.structured_output import grammar_compiler, one_line, stop_ids
from sliceserve.server.tool_parsing import (
    FORMATS,
    HERMES,
    HERMES_OPEN,
    LLAMA3_JSON,
    PYTHON_TAG,
    ToolCallFormat,
    ToolCallStream,
    parse_tool_calls,
)

FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
TOOL_KEYS = {"type", "function"}
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


@dataclass(frozen=True)
class TemplateTools:
    """What a chat template does with tools, read from its source."""

    takes_tools: bool  # it reads the `tools` variable
    writes_calls: bool  # it writes assistant turns' tool_calls
    format: ToolCallFormat | None  # the call format it teaches, where it is one parsed here


def template_tools(tokenizer: Any) -> TemplateTools:
    try:  # a tokenizer with several templates has one for tools ("tool_use")
        source = tokenizer.get_chat_template(tools=[{}])
    except (ValueError, AttributeError):
        return TemplateTools(False, False, None)
    return read_template(source) if isinstance(source, str) else TemplateTools(False, False, None)


@functools.lru_cache(maxsize=16)
def read_template(source: str) -> TemplateTools:
    if HERMES_OPEN in source:
        found = HERMES
    elif PYTHON_TAG in source or '"parameters": dictionary' in source:  # Llama 3.1's and 3.2's wording
        found = LLAMA3_JSON
    else:
        found = None
    return TemplateTools(reads_variable(source, "tools"), "tool_calls" in source, found)


def reads_variable(source: str, name: str) -> bool:
    """Whether the template reads the top-level variable `name`."""
    import jinja2
    import jinja2.ext
    from jinja2 import meta

    try:
        parsed = jinja2.Environment(extensions=[jinja2.ext.loopcontrols]).parse(source)
    except jinja2.TemplateSyntaxError:  # tags of Transformers' own ({% generation %}): read the words
        return re.search(rf"\b{re.escape(name)}\b", source) is not None
    return name in meta.find_undeclared_variables(parsed)


@dataclass(frozen=True)
class ToolUse:
    """A request's tools, checked, and what its tool_choice asks."""

    definitions: list[dict]  # as sent (OpenAI's shape): what the template is given
    parameters: dict[str, dict]  # function name -> its arguments' JSON schema
    choice: str  # "none", "auto", "required" or "function" (one named function)
    forced_name: str | None  # the named function
    parallel: bool  # parallel_tool_calls: more than one call per answer

    @property
    def offered(self) -> bool:
        return self.choice != "none" and bool(self.definitions)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.parameters)

    @property
    def max_calls(self) -> int | None:
        return None if self.parallel else 1


def check_tools(tools: list[dict] | None) -> dict[str, dict]:
    """Each tool's function name -> its parameters' schema, or a 400 naming the field."""
    parameters: dict[str, dict] = {}
    for i, tool in enumerate(tools or []):
        where = f"tools.{i}"
        unknown = sorted(set(tool) - TOOL_KEYS)
        if unknown:
            raise bad_request(f"{where}.{unknown[0]} is not a field of a tool", f"{where}.{unknown[0]}")
        if tool.get("type") != "function":
            raise bad_request(
                f'{where}.type must be "function" (the only kind of tool this server calls), got {tool.get("type")!r}',
                f"{where}.type",
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"{where}.function must be an object", f"{where}.function")
        where += ".function"
        unknown = sorted(set(function) - FUNCTION_KEYS)
        if unknown:
            raise bad_request(f"{where}.{unknown[0]} is not a field of a function", f"{where}.{unknown[0]}")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise bad_request(
                f"{where}.name must be 1 to 64 letters, digits, underscores or dashes, got {name!r}", f"{where}.name"
            )
        if name in parameters:
            raise bad_request(f"{where}.name: two tools are named {name!r}", f"{where}.name")
        if not isinstance(function.get("description", ""), (str, type(None))):
            raise bad_request(f"{where}.description must be a string", f"{where}.description")
        if not isinstance(function.get("strict", False), (bool, type(None))):
            raise bad_request(f"{where}.strict must be a boolean", f"{where}.strict")
        parameters[name] = check_parameters(function.get("parameters"), f"{where}.parameters")
    return parameters


def check_parameters(schema: Any, where: str) -> dict:
    """A function's parameters: a JSON schema of an object (absent: no parameters)."""
    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise bad_request(f"{where} must be a JSON schema (an object)", where)
    if schema.get("type", "object") != "object":
        raise bad_request(f'{where} must describe an object ("type": "object"), got {schema["type"]!r}', where)
    if not isinstance(schema.get("properties", {}), dict):
        raise bad_request(f"{where}.properties must be an object", where)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad_request(f"{where}.required must be a list of property names", where)
    return {"type": "object", **schema}


def tool_use(body: Any) -> ToolUse:
    """The request's tools and tool_choice, checked (400s name the field)."""
    parameters = check_tools(body.tools)
    choice, named = read_tool_choice(body.tool_choice, parameters)
    use = ToolUse(list(body.tools or []), parameters, choice, named, body.parallel_tool_calls is not False)
    if use.offered and body.response_format is not None and body.response_format.type != "text":
        raise bad_request(
            'response_format cannot be combined with tools unless tool_choice is "none": its grammar '
            "leaves no room for a tool call",
            "response_format",
        )
    if use.forced:
        body.check_grammar_can_end(f"tool_choice {json.dumps(body.tool_choice)}")
    return use


def read_tool_choice(tool_choice: str | dict | None, parameters: dict[str, dict]) -> tuple[str, str | None]:
    if tool_choice is None:
        return ("auto" if parameters else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise bad_request(
                f'tool_choice must be "none", "auto", "required" or a function, got {tool_choice!r}', "tool_choice"
            )
        if tool_choice == "required" and not parameters:
            raise bad_request('tool_choice "required" needs tools to choose from', "tool_choice")
        return tool_choice, None
    function = tool_choice.get("function")
    if (
        set(tool_choice) != {"type", "function"}
        or tool_choice.get("type") != "function"
        or not isinstance(function, dict)
        or set(function) != {"name"}
        or not isinstance(function["name"], str)
    ):
        raise bad_request(
            'tool_choice as an object must be {"type": "function", "function": {"name": ...}}', "tool_choice"
        )
    if function["name"] not in parameters:
        offered = ", ".join(sorted(parameters)) or "none"
        raise bad_request(
            f"tool_choice names the function {function['name']!r}, which is not among the tools (offered: {offered})",
            "tool_choice",
        )
    return "function", function["name"]


def check_template(use: ToolUse, tokenizer: Any, calls_in_messages: list[str]) -> ToolCallFormat | None:
    """The template's call format where the tools are offered; a 400 where the template cannot take
    them, or cannot write the tool calls of earlier turns (`calls_in_messages`: where they are)."""
    found = template_tools(tokenizer)
    if calls_in_messages and not found.writes_calls:
        raise bad_request(
            f"{calls_in_messages[0]}: this model's chat template does not write tool calls, so earlier "
            "turns' calls cannot be shown to it",
            calls_in_messages[0],
        )
    if not use.offered:
        return None
    if not found.takes_tools:
        raise bad_request(
            "tools: this model's chat template has no tool support (it never reads `tools`); "
            'send tool_choice "none" or no tools',
            "tools",
        )
    if found.format is None:
        known = " or ".join(f"`{name}`" for name in FORMATS)
        raise bad_request(
            f"tools: this model's chat template takes tools, but not in a tool-call format this server reads ({known})",
            "tools",
        )
    return found.format


def forced_call_grammar(use: ToolUse, format: ToolCallFormat, engine: Any):
    """The compiled grammar of one call, in `format`, to the named function or to any offered one."""
    import xgrammar

    names = [use.forced_name] if use.choice == "function" else list(use.parameters)
    calls = []
    for name in names:
        try:
            arguments = xgrammar.Grammar.from_json_schema(json.dumps(use.parameters[name]), any_whitespace=False)
        except Exception as error:  # xgrammar's RuntimeError, or its own, for a schema it cannot use
            where = f"tools.{list(use.parameters).index(name)}.function.parameters"
            raise bad_request(f"{where} is not a usable JSON schema: {one_line(error)}", where) from None
        begin = literal(format.call_begin + name + format.arguments_key)
        calls.append(xgrammar.Grammar.concat(begin, arguments, literal(format.call_end)))
    grammar = calls[0] if len(calls) == 1 else xgrammar.Grammar.union(*calls)
    compiler = grammar_compiler(engine.tokenizer, engine.model.spec.vocab_size, stop_ids(engine))
    return compiler.compile_grammar(grammar)


def literal(text: str):
    """A grammar of exactly `text` (JSON's string escapes are EBNF's)."""
    import xgrammar

    return xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")


def template_message_calls(calls: list[Any]) -> list[dict]:
    """An assistant turn's tool_calls (protocol.MessageToolCall) as templates read them: arguments
    as an object (Transformers' convention; OpenAI sends JSON text, checked to be an object)."""
    return [
        {
            "id": call.id,
            "type": "function",
            "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
        }
        for call in calls
    ]


def markers_are_special(tokenizer: Any, format: ToolCallFormat) -> bool:
    """Whether the format's tags are special tokens of this tokenizer (their text would be
    skipped when decoding)."""
    from sliceserve.server.chat_template import special_token_texts

    return format is HERMES and HERMES_OPEN in special_token_texts(tokenizer)


class ToolAnswers:
    """Each choice's answer as a message or deltas: read for calls where the tools are offered
    (`format` is the template's), plain content otherwise. An answer that made calls and ended
    by itself finishes as "tool_calls"."""

    def __init__(self, use: ToolUse, format: ToolCallFormat | None) -> None:
        self.use, self.format = use, format
        self.streams: dict[int, ToolCallStream] = {}

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        if self.format is None:
            return {"role": "assistant", "content": text}, finish_reason
        content, calls = parse_tool_calls(text, self.format.name, self.use.names, self.use.max_calls)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.as_message() for call in calls]
        return message, called(finish_reason, bool(calls))

    def delta(self, index: int, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """Choice `index`'s delta for `text` (finish_reason: its last)."""
        finished = finish_reason is not None
        if self.format is None:
            return ({"content": text} if text or not finished else {}), finish_reason
        if index not in self.streams:
            self.streams[index] = ToolCallStream(self.format.name, self.use.names, self.use.max_calls)
        stream = self.streams[index]
        content, calls = stream.feed(text)
        if finished:
            more_content, more_calls = stream.finish()
            content, calls = content + more_content, calls + more_calls
        delta: dict = {"content": content} if content else {}
        if calls:
            first = len(stream.calls) - len(calls)
            delta["tool_calls"] = [call.as_delta(first + k) for k, call in enumerate(calls)]
        return delta, called(finish_reason, bool(stream.calls))


def called(finish_reason: str | None, made_calls: bool) -> str | None:
    return "tool_calls" if made_calls and finish_reason == "stop" else finish_reason
