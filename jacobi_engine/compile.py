"""``JacobiEngine(model, compile=True)``: the decode step compiled with ``torch.compile``.

What is compiled is :func:`jacobi_engine.step.decode_step` as a whole (the model forward with our
attention, the processors, ``verify_and_commit``, the guess update, the statistics and step logs),
with ``fullgraph=True`` and static shapes: inductor's C++ backend on CPU, Triton on CUDA (where the
engine then captures the compiled step in its own CUDA graph when ``cuda_graph=True``).

One compiled function per step-cache entry, kept on the entry, so its guards only ever see one
:class:`~jacobi_engine.step.StepState` and every later step and every later call with the same key
reuses the same graph. Each entry's function gets its own code object: dynamo caches compiled
graphs per code object and stops compiling after ``recompile_limit`` entries on one, which several
step-cache entries and engines sharing one function would otherwise reach (and then run eagerly).

A model that cannot be compiled (a graph break, an op inductor cannot lower, a compiler crash) is
decoded eagerly instead, with a warning that says why: ``compile=True`` never fails a call.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable

import torch

from jacobi_engine.state import StepState
from jacobi_engine.step import StepConfig, decode_step


def _step_function(model_forward, config: StepConfig, tag: str) -> Callable[[StepState], None]:
    def jacobi_decode_step(state: StepState) -> None:
        decode_step(model_forward, config, state)

    # A code object of its own (see the module docstring); the name shows up in profiles and logs.
    jacobi_decode_step.__code__ = jacobi_decode_step.__code__.replace(co_name=f"jacobi_decode_step_{tag}")
    return jacobi_decode_step


def compile_step(model_forward, config: StepConfig, tag: str) -> Callable[[StepState], None]:
    """The compiled decode step (compiled lazily, at its first call)."""
    return torch.compile(_step_function(model_forward, config, tag), fullgraph=True, dynamic=False)


def first_compiled_call(compiled: Callable[[StepState], None], state: StepState, model) -> tuple:
    """Runs ``compiled`` once on ``state`` (which compiles it), then puts the state back.

    Returns ``(compiled or None, seconds, reason)``: None and the reason when the model could not be
    compiled (a warning says so and the caller decodes eagerly). The state is restored either way,
    so compiling never advances decoding; the K/V the step wrote lie past the committed lengths
    and are overwritten like any rejected guess.
    """
    saved = state.snapshot()
    started = time.perf_counter()
    try:
        compiled(state)
        if state.block.device.type == "cuda":
            torch.cuda.synchronize(state.block.device)
    except Exception as error:  # any failure to compile means: decode eagerly
        reason = _describe(error)
        warnings.warn(
            f"JacobiEngine(compile=True): {type(model).__name__} could not be compiled with "
            f"torch.compile(fullgraph=True), decoding eagerly instead. Reason: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )
        return None, time.perf_counter() - started, reason
    finally:
        state.restore(saved)
    return compiled, time.perf_counter() - started, None


def is_step_compile_error(error: Exception) -> bool:
    """Whether a compiled step raised because it would have to compile again (``set_stance(
    "fail_on_recompile")`` raises a plain RuntimeError naming the stance) or could not: nothing of
    the step has run then, so the eager step can take over."""
    if isinstance(error, (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit)):
        return True
    return isinstance(error, RuntimeError) and "fail_on_recompile" in str(error)


def compiled_steps(active: bool):
    """Context for running compiled steps after their first call: a step whose guards fail raises
    (see :func:`is_step_compile_error`) instead of compiling again, so a step-cache entry never holds more
    than its one graph; the engine then decodes that entry eagerly."""
    return torch.compiler.set_stance("fail_on_recompile") if active else contextlib.nullcontext()


def abandon_compiled(error: Exception, model) -> str:
    """Warns that a compiled step is given up for eager decoding; returns the reason."""
    reason = _describe(error)
    warnings.warn(
        f"JacobiEngine(compile=True): the compiled step of {type(model).__name__} would recompile, decoding "
        f"eagerly instead (something the graph depends on changes between steps or calls). Reason: {reason}",
        RuntimeWarning,
        stacklevel=4,
    )
    return reason


def _describe(error: Exception) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    head = lines[0] if lines else ""
    return f"{type(error).__name__}: {head[:500]}"
