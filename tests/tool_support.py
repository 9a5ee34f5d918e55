"""A copy of the server tests' tiny checkpoint whose chat template has Hermes-style tool support
(Qwen2.5's tool template, its words shortened: the tools in the system turn, calls in <tool_call> tags, tool
results in <tool_response> tags inside a user turn). Without tools it renders as the plain
ChatML template of server_support, so every other field behaves as there."""

from __future__ import annotations

import shutil
from pathlib import Path

from server_support import checkpoint_path

HERMES_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- "# Tools\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\nCall one as <tool_call>\n{\\"name\\": <name>, \\"arguments\\": <args>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first)
      or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + tool_call.arguments | tojson + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def tool_checkpoint(tmp_path_factory) -> Path:
    """The session's checkpoint with HERMES_TEMPLATE, built once."""
    folder = tmp_path_factory.getbasetemp() / "hermes_tools"
    if not folder.exists():
        shutil.copytree(checkpoint_path(tmp_path_factory), folder)
        (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return folder
