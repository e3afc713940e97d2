"""``jacobi-engine serve``: an OpenAI-compatible HTTP server on FastAPI + uvicorn, with continuous batching.

    jacobi-engine serve --model smollm2-135m-instruct-cllm --port 8000

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
both streaming (server-sent events, ``stream: true``) and not; ``GET /v1/models``; ``GET /health``.
Request fields: ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``seed``, ``stop`` (a string
or a list), and the extension ``jacobi`` (an object of engine settings, e.g. ``{"block_size": 8}``)
overriding the command line's. Responses carry ``usage`` and, as an extension field, ``jacobi``:
the engine settings used, the model forwards the request took part in and its tokens per forward.

Requests are served by :class:`~jacobi_engine.scheduler.Scheduler` s (one per engine setting and
sampling setting), stepped by one background thread; a request joins a running batch at a step
boundary and leaves it when done, cancelled, stopped by a ``stop`` string, or when its client
disconnects. Greedy requests (``temperature`` 0, the default) are token-identical to
``model.generate(do_sample=False)`` on their prompt. Sampling (OpenAI semantics: ``temperature`` and
``top_p`` only, no top-k) is exact in distribution; a request with a ``seed`` is decoded in a batch of
its own, so the same seed and prompt give the same text.

This module is the command and the :class:`Backend` (engines, schedulers and the thread that steps
them); the HTTP application on it, with request parsing and streaming, is :mod:`jacobi_engine.serve_app`.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass

import torch

from jacobi_engine.config import EngineConfig, int_or_auto


class RequestError(ValueError):
    """A bad request: answered with a 4xx and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass(frozen=True)
class Sampling:
    """How a request samples: greedy, or OpenAI's temperature/top_p (with a seed: a batch of its own)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def generation_kwargs(self) -> dict:
        if self.temperature == 0.0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


class Backend:
    """The model, its tokenizer, the engines and schedulers, and the thread that steps them."""

    def __init__(self, model, tokenizer, model_name: str, engine_settings: dict, max_batch: int, max_seq_len: int):
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.engine_settings = dict(engine_settings)
        EngineConfig(**self.engine_settings)  # checked once, at start-up
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self._engines: dict = {}
        self._schedulers: dict = {}
        self._ephemeral: list = []  # one-request schedulers of seeded requests
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="jacobi-engine-serve", daemon=True)
        self._thread.start()

    # -- requests ------------------------------------------------------------------------------
    def _engine(self, overrides: dict):
        from jacobi_engine.engine import JacobiEngine

        settings = {**self.engine_settings, **overrides}
        config = EngineConfig(**settings)
        engine = self._engines.get(config)
        if engine is None:
            engine = self._engines[config] = JacobiEngine(self.model, **settings)
        return engine

    def submit(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling, overrides: dict, on_tokens, on_finish):
        """Queues a request; returns (handle, scheduler). Raises RequestError for bad settings."""
        try:
            engine = self._engine(overrides)
        except (TypeError, ValueError) as error:
            raise RequestError(f"jacobi: {error}", param="jacobi") from error
        kwargs = sampling.generation_kwargs()
        with self._lock:
            try:
                if sampling.seed is not None:
                    scheduler = engine.scheduler(1, self.max_seq_len, seed=sampling.seed, **kwargs)
                    self._ephemeral.append(scheduler)
                else:
                    key = (EngineConfig(**{**self.engine_settings, **overrides}), sampling)
                    scheduler = self._schedulers.get(key)
                    if scheduler is None:
                        scheduler = self._schedulers[key] = engine.scheduler(self.max_batch, self.max_seq_len, **kwargs)
                handle = scheduler.add_request(prompt_ids, max_tokens, on_tokens=on_tokens, on_finish=on_finish)
            except (TypeError, ValueError) as error:
                raise RequestError(str(error)) from error
            self._wake.notify()
        return handle, scheduler

    def cancel(self, scheduler, handle) -> None:
        scheduler.cancel(handle)
        with self._lock:
            self._wake.notify()

    def counts(self) -> dict:
        with self._lock:
            schedulers = list(self._schedulers.values()) + self._ephemeral
        return {
            "running": sum(s.running for s in schedulers),
            "waiting": sum(len(s._waiting) for s in schedulers),
            "schedulers": len(schedulers),
        }

    # -- the stepping thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._busy():
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
                schedulers = [s for s in list(self._schedulers.values()) + self._ephemeral if s.has_work]
            for scheduler in schedulers:
                try:
                    scheduler.step()
                except BaseException as error:  # keep serving; the affected requests fail
                    self.error = error
                    self._fail_all(scheduler, error)
            with self._lock:
                self._ephemeral = [s for s in self._ephemeral if s.has_work]

    def _busy(self) -> bool:
        return any(s.has_work for s in list(self._schedulers.values()) + self._ephemeral)

    @staticmethod
    def _fail_all(scheduler, error) -> None:
        for handle in [h for h in scheduler._rows if h is not None] + list(scheduler._waiting):
            handle.error = f"{type(error).__name__}: {error}"
            scheduler.cancel(handle)
        scheduler._rows = [None] * scheduler.max_batch
        scheduler._waiting.clear()

    def close(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)


# -- the command -------------------------------------------------------------------------------------
def _serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("jacobi-engine serve needs fastapi and uvicorn: pip install 'jacobi-engine[serve]'")
        return 2
    from jacobi_engine import models

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = models.load(args.model, dtype=args.dtype, device=args.device)
    settings = {"block_size": args.block_size, "mode": args.mode, "init": args.init, "candidates": args.candidates}
    settings.update(candidate_len=args.candidate_len, compile=args.compile, seed=args.seed)
    if args.device.startswith("cuda"):
        settings["cuda_graph"] = args.cuda_graph
    max_seq_len = args.max_seq_len or min(4096, getattr(model.config, "max_position_embeddings", 4096) or 4096)
    from jacobi_engine.serve_app import build_app

    backend = Backend(model, tokenizer, args.served_name or args.model, settings, args.max_batch, max_seq_len)
    uvicorn.run(build_app(backend), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (continuous batching)",
        description="Serve a model with Jacobi decoding behind /v1/completions and /v1/chat/completions.",
    )
    serve.add_argument(
        "--model", required=True, help="a named model (jacobi_engine.models), a local folder or a hub id"
    )
    serve.add_argument("--served-name", help="the model name clients use (default: --model)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    serve.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    serve.add_argument(
        "--block-size",
        type=int_or_auto,
        default=None,
        help="n, or 'auto' (chosen per step; the default, 16 in chunked mode)",
    )
    serve.add_argument("--mode", default="sliding", choices=("sliding", "chunked"))
    serve.add_argument("--init", default="ngram", choices=("ngram", "random_prompt"))
    serve.add_argument(
        "--candidates", type=int_or_auto, default=None, help="k, or 'auto' (default: auto with an auto block, else 0)"
    )
    serve.add_argument("--candidate-len", type=int, default=4)
    serve.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    serve.add_argument("--cuda-graph", action="store_true", help="capture the decode step in a CUDA graph (GPU)")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-seq-len", type=int, default=None, help="prompt + new tokens per request")
    serve.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(handler=_serve_command)
