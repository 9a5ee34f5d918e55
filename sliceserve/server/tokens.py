"""POST /tokenize and POST /detokenize, in vLLM's shapes.

/tokenize takes a `prompt` (tokenized as /v1/completions would) or chat `messages` (rendered
by the chat template as /v1/chat/completions would, with `tools` as tool_choice "auto" offers
them) and answers {count, max_model_len, tokens,
token_strs}; /detokenize takes {tokens} and answers {prompt}.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from sliceserve.server.chat import conversation_ids
from sliceserve.server.completions import vocabulary_size
from sliceserve.server.errors import bad_request
from sliceserve.server.generation import check_model, parse_body
from sliceserve.server.protocol import ChatMessage, StrictModel
from sliceserve.server.tools import ToolUse, check_tools


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (as vLLM)
    return_token_strs: bool | None = False
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    tools: list[dict] | None = None  # rendered by the template as chat completions offers them

    UNSUPPORTED: ClassVar[frozenset[str]] = frozenset({"chat_template", "chat_template_kwargs", "mm_processor_kwargs"})
    NEUTRAL: ClassVar[dict[str, tuple]] = {
        "add_generation_prompt": (True,),
        "continue_final_message": (False,),
    }

    def check(self) -> None:
        self.check_neutral()
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give either prompt or messages", "prompt")
        if self.messages is not None and self.add_special_tokens:
            raise bad_request("add_special_tokens is not supported with messages (only false)", "add_special_tokens")
        if self.tools and self.messages is None:
            raise bad_request("tools go with messages, not a prompt", "tools")
        for i, message in enumerate(self.messages or []):
            message.check(f"messages.{i}")


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]

    def check(self) -> None:
        pass


def tokenized(body: TokenizeRequest, tokenizer) -> list[int]:
    if body.messages is not None:
        parameters = check_tools(body.tools)
        tools = ToolUse(list(body.tools or []), parameters, "auto" if parameters else "none", None, True)
        return conversation_ids(tokenizer, body.messages, tools)[0]
    return list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens is not False)["input_ids"])


async def create_tokenize(request: Request) -> dict:
    body = await parse_body(request, TokenizeRequest)
    check_model(request, body)
    engine = request.app.state.engine
    ids = await run_in_threadpool(tokenized, body, engine.tokenizer)
    strings = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strings}


async def create_detokenize(request: Request) -> dict:
    body = await parse_body(request, DetokenizeRequest)
    check_model(request, body)
    engine = request.app.state.engine
    vocab = vocabulary_size(engine)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"tokens: token id {bad} is outside the vocabulary (0 to {vocab - 1})", "tokens")
    return {"prompt": await run_in_threadpool(engine.tokenizer.decode, body.tokens)}
