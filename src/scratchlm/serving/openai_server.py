"""An OpenAI-compatible HTTP server over one ``LM``: point an existing OpenAI client at it.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` answers with server-sent events ending in ``data: [DONE]``), and FastAPI's
``/openapi.json`` and ``/docs``.  Every request goes to one ``Engine``, which decodes the running
requests as one batch and lets new ones join between steps (continuous batching).

Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``: 400 for a request
that cannot be run (malformed JSON, wrong types, out-of-range values, a prompt that does not fit
the context, ``n`` > 1), 404 for an unknown model, 429 when every slot is busy and the queue is
full.  A client that disconnects (streaming or not) has its request cancelled, which frees its
slot before the next decode step.

Beyond OpenAI's fields, ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted, as vLLM
and llama.cpp's server do.  ``max_tokens`` defaults to the rest of the context window, capped by
the server's ``max_tokens_limit``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from scratchlm.errors import UserError
from scratchlm.generation import Completion, SamplingParams
from scratchlm.generation.generate import encode_prompt
from scratchlm.serving.engine import PREFILL_TOKENS, Engine, QueueFull, StreamEvent

# How often a non-streaming request checks whether its client is still there.
_DISCONNECT_POLL_S = 0.25


# ----- request bodies (they are the OpenAPI schema, too) ----------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Sampling(BaseModel):
    """The sampling fields both endpoints share; unknown fields are ignored, as OpenAI's SDKs add some."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(description="the served model's id, as GET /v1/models lists it")
    max_tokens: int | None = Field(None, ge=1, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, ge=0, le=1, description="nucleus sampling; 0 = greedy")
    top_k: int | None = Field(None, ge=1, description="extension: sample among the k most likely tokens")
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="extension: 1 = off")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end the text")
    seed: int | None = Field(None, description="reproducible sampling")
    n: int = Field(1, ge=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep going past the end of text (benchmarks)")
    logprobs: Any = Field(None, description="not supported: must be null or false")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(description="text, a list of one text, or token ids")
    echo: bool = Field(False, description="not supported: must be false")



# ----- errors ---------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


def _validation_error(err: RequestValidationError) -> APIError:
    """Pydantic's first complaint, in words: which field, what is wrong."""
    first = err.errors()[0] if err.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    where = f"'{param}': " if param else "the request body: "
    return APIError(400, f"{where}{first.get('msg', 'invalid request')}", param=param,
                    code="invalid_value")


# ----- the app --------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    """What the server allows: model id, batch size, queue length and per-request limits, and the
    engine's prefill size (see ``Engine``)."""

    model_name: str
    max_batch: int = 16
    max_queue: int = 64
    max_tokens_limit: int | None = None  # None: the context window
    prefill_tokens: int = PREFILL_TOKENS


def create_app(lm: Any, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``lm``; its engine starts and stops with the app's lifespan."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=config.max_batch, max_queue=config.max_queue,
                    prefill_tokens=config.prefill_tokens)
    context = engine.context_length
    max_tokens_limit = min(config.max_tokens_limit or context, context)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="scratchlm", version="1", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions over one scratchlm model.")
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err).response()

    @app.exception_handler(UserError)
    async def _user_error(_: Request, err: UserError) -> JSONResponse:
        return APIError(400, str(err)).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "running": engine.busy_slots, "waiting": engine.waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "scratchlm", "max_model_len": context}]}

    def check_model(body: _Sampling) -> None:
        if body.model != config.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves "
                           f"{config.model_name!r}", param="model", code="model_not_found")

    def sampling(body: _Sampling, prompt_tokens: int, max_tokens: int | None) -> SamplingParams:
        """The request's ``SamplingParams`` after the checks OpenAI's API makes."""
        if body.n != 1:
            raise APIError(400, "n > 1 is not supported: this server returns one choice per request",
                           param="n", code="unsupported_value")
        if body.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs", code="unsupported_value")
        if prompt_tokens >= context:
            raise APIError(400, f"this model's maximum context length is {context} tokens, and the prompt "
                           f"has {prompt_tokens}", param="messages", code="context_length_exceeded")
        if max_tokens is not None:
            if max_tokens > max_tokens_limit:
                raise APIError(400, f"max_tokens {max_tokens} is above this server's limit of "
                               f"{max_tokens_limit}", param="max_tokens", code="invalid_value")
            if prompt_tokens + max_tokens > context:
                raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt "
                               f"has {prompt_tokens} and max_tokens asks for {max_tokens} more",
                               param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or not all(stop):
            raise APIError(400, "stop takes up to 4 non-empty strings", param="stop", code="invalid_value")
        greedy = body.temperature == 0 or body.top_p == 0  # top_p 0 keeps only the most likely token
        try:
            return SamplingParams(
                temperature=0.0 if greedy else body.temperature, top_p=body.top_p if not greedy else 1.0,
                top_k=body.top_k, frequency_penalty=body.frequency_penalty,
                presence_penalty=body.presence_penalty, repetition_penalty=body.repetition_penalty,
                max_new_tokens=min(max_tokens or max_tokens_limit, context - prompt_tokens),
                stop=tuple(stop), ignore_eos=body.ignore_eos,
                seed=None if body.seed is None else body.seed % 2**63)
        except UserError as err:
            raise APIError(400, str(err), code="invalid_value") from err

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue a prompt (OpenAI's legacy completions endpoint)."""
        check_model(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "a batch of prompts is not supported: send one prompt per request",
                               param="prompt", code="unsupported_value")
            prompt = prompt[0]
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo", code="unsupported_value")
        ids = encode_prompt(lm.tokenizer, prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        params = sampling(body, len(ids), body.max_tokens)
        return await _respond(request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Answer a conversation, rendered through the model's chat template."""
        check_model(body)
        messages = [_plain_message(m) for m in body.messages]
        try:
            text = lm.chat_prompt(messages)
        except UserError as err:
            raise APIError(400, str(err), param="messages", code="invalid_value") from err
        except Exception as err:  # a Jinja template that raises on these messages
            raise APIError(400, f"the chat template cannot render these messages: {err}",
                           param="messages", code="invalid_value") from err
        ids = lm.tokenizer.encode(text, allowed_special="all")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = lm.chat_params(sampling(body, len(ids), max_tokens), {})
        return await _respond(request, body, ids, params, chat=True)

    async def _respond(request: Request, body: _Sampling, ids: list[int], params: SamplingParams,
                       chat: bool) -> Any:
        """Submit to the engine; answer as one JSON body or as server-sent events."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def deliver(event: StreamEvent) -> None:  # on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            handle = engine.submit(ids, params, deliver)
        except QueueFull as err:
            raise APIError(429, f"the server is busy: {err}", "rate_limit_error",
                           code="rate_limit_exceeded") from err
        reply = _Reply(chat, config.model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def sse() -> AsyncIterator[str]:
                try:
                    if chat:
                        yield reply.chunk({"role": "assistant", "content": ""}, None)
                    while True:
                        event = await events.get()
                        if event.error is not None:
                            yield _sse({"error": {"message": event.error, "type": "server_error",
                                                  "param": None, "code": None}})
                            break
                        if event.text:
                            yield reply.chunk(event.text, None)
                        if event.completion is not None:
                            yield reply.chunk("" if not chat else {}, event.completion.finish_reason)
                            if include_usage:
                                yield _sse({**reply.header(chunk=True), "choices": [],
                                            "usage": _usage(event.completion)})
                            break
                    yield "data: [DONE]\n\n"
                finally:  # the client went away, or the answer is done: either way free the slot
                    engine.cancel(handle)

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(handle)
                        return JSONResponse(status_code=499, content={})
                    continue
                if event.error is not None:
                    raise APIError(500, event.error, "server_error")
                if event.completion is not None:
                    return reply.whole(event.completion)
        finally:
            engine.cancel(handle)

    return app


def _plain_message(message: ChatMessage) -> dict[str, Any]:
    """A message as the chat template takes it: content parts joined into one string."""
    out = message.model_dump(exclude_none=True)
    if isinstance(message.content, list):
        out["content"] = "".join(part.text or "" for part in message.content if part.type == "text")
    return out


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens}


class _Reply:
    """The response bodies of one request, in OpenAI's shapes for chat or text completions."""

    def __init__(self, chat: bool, model: str):
        self.chat = chat
        self.model = model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def header(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, delta: str | dict[str, Any], finish_reason: str | None) -> str:
        if self.chat:
            content = {"content": delta} if isinstance(delta, str) else delta
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**self.header(chunk=True), "choices": [choice]})

    def whole(self, completion: Completion) -> dict[str, Any]:
        text = completion.text
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": completion.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": completion.finish_reason}
        return {**self.header(chunk=False), "choices": [choice], "usage": _usage(completion)}


class ServerThread:
    """Run the server in a background thread of this process (tests, benchmarks, notebooks).

    ``with ServerThread(lm, config) as server:`` listens on ``server.url`` (127.0.0.1 on a free
    port by default) until the block ends.
    """

    def __init__(self, lm: Any, config: ServerConfig, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.app = create_app(lm, config)
        # Bind here, so that port 0 resolves to a free port before the thread starts.
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        import threading

        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="scratchlm-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()
