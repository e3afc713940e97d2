"""The HTTP application of ``jacobi-engine serve`` (:mod:`jacobi_engine.serve`): OpenAI's completions
and chat completions on a :class:`~jacobi_engine.serve.Backend`, streamed or not.

:func:`build_app` makes the FastAPI application; each request's fields are checked here (a bad one is
a :class:`~jacobi_engine.serve.RequestError`, answered with an OpenAI-style error body) and its tokens
are turned into text by a :class:`TextStream`, which holds back what may be the start of a ``stop``
string.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from jacobi_engine.config import ENGINE_FIELDS
from jacobi_engine.serve import Backend, RequestError, Sampling

try:  # the serve extra; at module level because FastAPI resolves handler annotations in these globals
    from fastapi import Request
except ImportError:  # pragma: no cover - `jacobi-engine serve` then prints the install hint
    Request = None

DEFAULT_MAX_TOKENS = 256


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class TextStream:
    """Incremental detokenization with ``stop`` strings: ``feed(tokens)`` returns the new text that is
    safe to emit (held back while it might be the start of a stop string or of a multi-byte char)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False

    def feed(self, new_tokens: list[int], final: bool = False) -> str:
        if self.stopped:
            return ""
        self.tokens.extend(new_tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text = text[:cut]
            final = True
        safe = len(text)
        if not final:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for stop in self.stop:  # a stop string may be starting at the end
                for k in range(min(len(stop) - 1, safe), 0, -1):
                    if text[:safe].endswith(stop[:k]):
                        safe -= k
                        break
        delta = text[len(self.emitted) : max(safe, len(self.emitted))]
        self.emitted += delta
        return delta


def _parse_common(body: dict, backend: Backend) -> tuple[int, Sampling, list[str], dict, bool]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != backend.model_name:
        raise RequestError(
            f"model {model!r} is not served here (this server serves {backend.model_name!r})",
            param="model",
            status=404,
            code="model_not_found",
        )
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", DEFAULT_MAX_TOKENS))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError(f"max_tokens must be a positive integer, got {max_tokens!r}", param="max_tokens")
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError(f"temperature must be a number in [0, 2], got {temperature!r}", param="temperature")
    top_p = body.get("top_p", 1.0)
    if top_p is None:
        top_p = 1.0
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError(f"top_p must be a number in (0, 1], got {top_p!r}", param="top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"seed must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise RequestError("stop must be a non-empty string or a list of at most 4 of them", param="stop")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError("n must be 1 (one completion per request)", param="n")
    overrides = body.get("jacobi") or {}
    if not isinstance(overrides, dict) or any(key not in ENGINE_FIELDS for key in overrides):
        raise RequestError(f"jacobi must be an object of engine settings among {list(ENGINE_FIELDS)}", param="jacobi")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean", param="stream")
    sampling = Sampling(float(temperature), float(top_p), seed if temperature else None)
    return max_tokens, sampling, stop, overrides, stream


def build_app(backend: Backend):
    """The FastAPI application serving ``backend``."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        backend.close()

    app = FastAPI(title="jacobi-engine", version="0.1", lifespan=lifespan)
    tokenizer = backend.tokenizer

    @app.exception_handler(RequestError)
    async def _request_error(request, error: RequestError):
        return JSONResponse(error_body(str(error), error.param, code=error.code), status_code=error.status)

    @app.get("/health")
    async def health():
        return {"status": "ok" if backend.error is None else "degraded", **backend.counts()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": backend.model_name, "object": "model", "owned_by": "jacobi-engine"}]}

    async def _body(request: Request) -> dict:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON: {error}") from error

    def _prompt_ids(text: str, param: str, special: bool) -> list[int]:
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise RequestError(f"{param} tokenizes to no tokens", param=param)
        return list(ids)

    async def _serve(body: dict, prompt_ids: list[int], chat: bool):
        max_tokens, sampling, stop, overrides, stream = _parse_common(body, backend)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        text = TextStream(tokenizer, stop)

        def on_tokens(handle, new):
            loop.call_soon_threadsafe(queue.put_nowait, ("tokens", list(new)))

        def on_finish(handle):
            loop.call_soon_threadsafe(queue.put_nowait, ("finish", handle.finish_reason))

        handle, scheduler = backend.submit(prompt_ids, max_tokens, sampling, overrides, on_tokens, on_finish)
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        settings = {**backend.engine_settings, **overrides}

        def extension() -> dict:
            completion = len(handle.tokens)
            return {
                "settings": {
                    key: settings[key] for key in ("block_size", "mode", "init", "candidates") if key in settings
                },
                "forwards": handle.forwards,
                "tokens_per_forward": completion / max(1, handle.forwards),
            }

        def usage() -> dict:
            completion = len(text.tokens)
            return {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": completion,
                "total_tokens": len(prompt_ids) + completion,
            }

        async def events():
            """(delta text, finish reason or None) as the request runs; cancels it when abandoned."""
            finished = False
            try:
                while True:
                    what, value = await queue.get()
                    if what == "tokens":
                        delta = text.feed(value)
                        if text.stopped:
                            backend.cancel(scheduler, handle)
                            finished = True
                            yield delta, "stop"
                            return
                        if delta:
                            yield delta, None
                    else:
                        finished = True
                        reason = "stop" if value in ("stop", "cancelled") else "length"
                        if handle.error:
                            raise RuntimeError(handle.error)
                        yield text.feed([], final=True), reason
                        return
            finally:
                if not finished:  # the client went away: free its row
                    backend.cancel(scheduler, handle)

        def choice(delta: str, reason, streaming: bool) -> dict:
            if chat:
                content = {"role": "assistant", "content": delta} if not streaming else {"content": delta}
                key = "delta" if streaming else "message"
                return {"index": 0, key: content, "finish_reason": reason}
            return {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}

        if stream:

            async def sse():
                first = True
                async for delta, reason in events():
                    piece = choice(delta, reason, True)
                    if chat and first:
                        piece["delta"]["role"] = "assistant"
                    first = False
                    chunk = {"id": request_id, "object": kind + (".chunk" if chat else ""), "created": created}
                    chunk.update(model=backend.model_name, choices=[piece])
                    if reason is not None:
                        chunk["usage"], chunk["jacobi"] = usage(), extension()
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")

        pieces, reason = [], None
        async for delta, finish in events():
            pieces.append(delta)
            reason = finish
        response = {"id": request_id, "object": kind, "created": created, "model": backend.model_name}
        response.update(choices=[choice("".join(pieces), reason, False)], usage=usage(), jacobi=extension())
        return JSONResponse(response)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string", param="prompt")
        return await _serve(body, _prompt_ids(prompt, "prompt", special=True), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        messages = body.get("messages") if isinstance(body, dict) else None
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise RequestError("messages must be a non-empty list of {role, content} strings", param="messages")
        if getattr(tokenizer, "chat_template", None) is None:
            raise RequestError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        text = tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages], tokenize=False, add_generation_prompt=True
        )
        return await _serve(body, _prompt_ids(text, "messages", special=False), chat=True)

    return app
