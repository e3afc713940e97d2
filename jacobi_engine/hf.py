"""Jacobi decoding from ``model.generate``: transformers' ``custom_generate`` hook.

    import jacobi_engine.hf
    out = model.generate(input_ids, custom_generate=jacobi_engine.hf.generate, block_size=16, max_new_tokens=128)

:func:`generate` runs after HF's usual preparation (generation_config, attention mask, streamer,
special tokens, lengths) and decodes with a :class:`~jacobi_engine.JacobiEngine` cached on the model
per engine setting, so repeated calls reuse its states, compiled steps and captured graphs. Engine
settings (``block_size``, ``mode``, ``init``, ``candidates``, ``compile``, ...) are keyword arguments of
``model.generate``. Greedy output is token-identical to ``do_sample=False``; ``do_sample=True``
samples exactly (:mod:`jacobi_engine.sampling`).

``return_dict_in_generate=True`` returns a :class:`JacobiGenerateOutput`, a transformers
``GenerateDecoderOnlyOutput`` with the :class:`~jacobi_engine.JacobiStats` beside the sequences.
What the engine cannot honour is refused by name: ``output_scores``, ``output_logits``,
``output_attentions``, ``output_hidden_states``, a custom ``logits_processor`` or
``stopping_criteria``, ``prefix_allowed_tokens_fn``, a filled cache passed in, ``synced_gpus``.

:func:`custom_generate_path` is a folder in the ``custom_generate/`` layout, for
``model.generate(..., custom_generate=jacobi_engine.hf.custom_generate_path(), trust_remote_code=True)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from jacobi_engine.config import ENGINE_FIELDS, EngineConfig
from jacobi_engine.output import JacobiStats

_CACHE_ATTRIBUTE = "_jacobi_engine_engines"
_NOT_RETURNED = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
_ALLOWED_CRITERIA = ("MaxLengthCriteria", "EosTokenCriteria")


@dataclass
class JacobiGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` (only ``sequences`` set) with the engine's statistics."""

    jacobi_stats: JacobiStats | None = None


def custom_generate_path() -> str:
    """A folder holding ``custom_generate/generate.py`` that runs :func:`generate` (needs ``trust_remote_code=True``)."""
    return str(Path(__file__).resolve().parent / "hub")


def engine_for(model, **settings):
    """The engine cached on ``model`` for these engine settings (made at first use)."""
    from jacobi_engine.engine import JacobiEngine

    config = EngineConfig(**settings)
    engines = model.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
    engine = engines.get(config)
    if engine is None:
        engine = engines[config] = JacobiEngine(model, **settings)
    return engine


class _AfterPrompt:
    """HF's generate already streamed the prompt; the engine streams it again, which this drops."""

    def __init__(self, streamer):
        self.streamer, self.first = streamer, True

    def put(self, value):
        if self.first:
            self.first = False
            return
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


def _refuse_unsupported(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs):
    for name in _NOT_RETURNED:
        if getattr(generation_config, name, False):
            raise ValueError(
                f"{name}=True: jacobi_engine.hf.generate returns sequences only (a Jacobi step scores a whole "
                "block of guesses, not one position per forward); unset it"
            )
    for name in ("cache", "past_key_values"):
        cache = model_kwargs.get(name)  # HF prepares an empty one; a filled one would continue a generation
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            raise ValueError(f"{name}: jacobi_engine keeps its own KV cache and cannot continue from a filled one")
    if model_kwargs.get("prefix_allowed_tokens_fn") is not None:
        raise ValueError("prefix_allowed_tokens_fn is not supported by jacobi_engine.hf.generate")
    for criterion in stopping_criteria or []:
        if type(criterion).__name__ not in _ALLOWED_CRITERIA:
            raise ValueError(
                f"stopping_criteria: {type(criterion).__name__} is not supported by jacobi_engine.hf.generate "
                "(only max_new_tokens/max_length and EOS stop it)"
            )
    if logits_processor:
        # HF merged the processors of the generation_config with the user's; the config's are applied by
        # the engine, anything beyond them is the user's and cannot be applied per Jacobi slot.
        from transformers import LogitsProcessorList

        expected = model._get_logits_processor(
            generation_config=generation_config,
            input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=None,
            logits_processor=LogitsProcessorList(),
            device=input_ids.device,
            model_kwargs={},
        )
        if [type(p) for p in logits_processor] != [type(p) for p in expected]:
            extra = sorted({type(p).__name__ for p in logits_processor} - {type(p).__name__ for p in expected})
            raise ValueError(
                f"logits_processor: custom processors ({', '.join(extra) or 'a different list'}) are not supported by "
                "jacobi_engine.hf.generate; express them as generation_config settings"
            )


def _streamer_of_calling_generate():
    """The ``streamer`` argument of the ``GenerationMixin.generate`` call that called us.

    transformers (5.25) replaces the mode arguments of a ``custom_generate`` callable by the callable's
    own extra arguments, so the streamer it already fed the prompt to never reaches us; it is read
    from that call's frame instead (None when there is none)."""
    from transformers.generation.utils import GenerationMixin

    code = inspect.unwrap(GenerationMixin.generate).__code__
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is code:
                return frame.f_locals.get("streamer")
            frame = frame.f_back
    finally:
        del frame
    return None


def generate(
    model,
    input_ids: torch.Tensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    **kwargs,
):
    """``custom_generate`` entry: Jacobi decoding with HF's prepared inputs (see the module docstring)."""
    settings = {key: kwargs.pop(key) for key in ENGINE_FIELDS if key in kwargs}
    if synced_gpus:
        raise ValueError("synced_gpus=True is not supported by jacobi_engine.hf.generate")
    _refuse_unsupported(model, input_ids, logits_processor, stopping_criteria, generation_config, kwargs)
    if streamer is None:
        streamer = _streamer_of_calling_generate()
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is None:  # HF drops an all-ones mask before calling us
        attention_mask = torch.ones_like(input_ids)
    engine = engine_for(model, **settings)
    out = engine.generate(
        input_ids,
        attention_mask=attention_mask,
        generation_config=generation_config,
        streamer=None if streamer is None else _AfterPrompt(streamer),
        return_stats=True,
    )
    if generation_config is not None and generation_config.return_dict_in_generate:
        return JacobiGenerateOutput(sequences=out.sequences, jacobi_stats=out.stats)
    return out.sequences


def _signature_with_engine_settings(function):
    """HF passes a ``custom_generate`` callable the keyword arguments its signature names beyond
    ``_sample``'s: the engine settings are added to the signature from :class:`EngineConfig`."""
    signature = inspect.signature(function)
    parameters = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    # The fields' own defaults (None where the config resolves a setting from the others).
    defaults = {f.name: f.default for f in fields(EngineConfig)}
    for name in ENGINE_FIELDS:
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name]))
    parameters += [p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    function.__signature__ = signature.replace(parameters=parameters)
    return function


_signature_with_engine_settings(generate)
