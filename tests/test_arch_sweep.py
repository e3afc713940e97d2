"""Every causal LM of the installed transformers is token-exact against HF greedy, or refused up front.

For each entry of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny random model is built
(tests/tiny_configs.py: windows, chunks and sliding patterns shrunk to 8 tokens so that they
take effect) and sorted into one outcome:

- ``exact``: ``JacobiEngine(model)`` accepts it and ``generate`` equals HF's own greedy
  ``generate(do_sample=False)`` in fp32 on four cases (B=1 with n=4, a ragged B=2 with n=7, B=1
  with n=16, and a ragged B=2 with n=6 plus 3 pooled candidates of 4 tokens: the token-tree
  attention and the KV-row move), up to proven near-ties (tests/greedy_check.py);
- ``refused``: ``JacobiEngine(model)`` raises a ValueError saying why;
- ``skipped``: no tiny model could be built here (an optional dependency, a config that cannot
  be shrunk), or HF's own greedy generate fails on it, so there is nothing to compare with;
- ``wrong``: accepted, but different tokens; ``crashed``: accepted, then ``generate`` raised.

The test fails on any ``wrong`` or ``crashed``. ``python tests/test_arch_sweep.py`` prints the
tables docs/models.md carries.
"""

from __future__ import annotations

import collections
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from greedy_check import assert_matches_greedy  # noqa: E402
from tiny_configs import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, VOCAB, build_model  # noqa: E402

from jacobi_engine import JacobiEngine  # noqa: E402

PAD = 0
WIDTH = 10
MAX_NEW_TOKENS = 20
# (batch, block size, engine options): B=1 small block, ragged B=2 with a block that straddles window
# edges, B=1 wide block, ragged B=2 with multi-candidate verification.
CASES = ((1, 4, {}), (2, 7, {}), (1, 16, {}), (2, 6, dict(candidates=3, candidate_len=4, init="ngram")))


def _prompts(batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, WIDTH), generator=generator)
    mask = torch.ones_like(input_ids)
    if batch > 1:
        mask[1, :3] = 0
        input_ids[1, :3] = PAD
    return input_ids, mask


def _hf_greedy(model, input_ids, mask):
    return model.generate(
        input_ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=[],
        pad_token_id=PAD,
        num_beams=1,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
    )


def _hf_cache_disagrees(model, ours, cached, input_ids, mask) -> bool:
    """Whether HF's greedy without a KV cache differs from its cached one and equals ours (Moshi)."""
    with torch.no_grad():
        uncached = model.generate(
            input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            min_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=[],
            pad_token_id=PAD,
            use_cache=False,
        )
    return not torch.equal(uncached, cached) and torch.equal(uncached, ours)


def classify(model_type: str) -> tuple[str, str]:
    """(outcome, detail) of one architecture; see the module docstring."""
    try:
        model = build_model(model_type)
    except Exception as error:  # the tiny model itself cannot exist here
        return "skipped", f"no tiny model: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    try:
        JacobiEngine(model)
    except (ValueError, TypeError) as error:
        return "refused", str(error)
    expected = []
    with torch.no_grad():
        for case, (batch, _, _) in enumerate(CASES):
            input_ids, mask = _prompts(batch, seed=case)
            try:
                expected.append(_hf_greedy(model, input_ids, mask))
            except Exception as error:
                return "skipped", f"HF greedy generate fails: {type(error).__name__}: {str(error)[:120]}"
    for case, (batch, block_size, options) in enumerate(CASES):
        input_ids, mask = _prompts(batch, seed=case)
        try:
            out = JacobiEngine(model, block_size=block_size, **options).generate(
                input_ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=[], pad_token_id=PAD
            )
        except Exception as error:
            return "crashed", f"B={batch} n={block_size}: {type(error).__name__}: {str(error)[:200]}"
        try:
            assert_matches_greedy(model, out.sequences, expected[case], input_ids, mask, PAD)
        except AssertionError as error:
            if _hf_cache_disagrees(model, out.sequences, expected[case], input_ids, mask):
                return "skipped", "HF's cached greedy generate disagrees with its own uncached one (we match uncached)"
            return "wrong", f"B={batch} n={block_size}: {str(error).splitlines()[0][:200]}"
    return "exact", ""


def sweep(model_types=None) -> dict[str, tuple[str, str]]:
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            for model_type in model_types or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
                results[model_type] = classify(model_type)
        finally:
            transformers.logging.set_verbosity(verbosity)
    return results


def summary(results) -> str:
    counts = collections.Counter(outcome for outcome, _ in results.values())
    return ", ".join(f"{name} {counts.get(name, 0)}" for name in ("exact", "refused", "skipped", "wrong", "crashed"))


@pytest.mark.slow
def test_every_causal_lm_is_exact_or_refused():
    start = time.perf_counter()
    results = sweep()
    print(f"\narchitecture sweep over {len(results)} entries: {summary(results)} ({time.perf_counter() - start:.0f} s)")
    bad = {name: result for name, result in results.items() if result[0] in ("wrong", "crashed")}
    assert not bad, "\n".join(f"{name}: {outcome}: {detail}" for name, (outcome, detail) in sorted(bad.items()))
    # The sweep must keep testing something: a refusal of everything would pass the line above.
    assert sum(outcome == "exact" for outcome, _ in results.values()) >= 90


def _reason(outcome: str, detail: str) -> str:
    """A refusal or skip message without the model's name, so that equal reasons group."""
    detail = detail.split(": ", 1)[1] if detail.startswith("model ") and ": " in detail else detail
    if "does not route attention" in detail:
        return "attention bypasses transformers' AttentionInterface"
    if "a forward through the engine" in detail:
        return "probe forward fails: " + detail.split("fails (", 1)[-1].split(":")[0].rstrip(")")
    if "no tiny model" in detail:
        return "no tiny model could be built here (" + detail.split(": ")[1] + ")"
    return detail.split(", which")[0].split(" (")[0]


def markdown(results) -> str:
    """The docs/models.md table: one row per outcome and reason, with the model types."""
    groups: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
    for name, (outcome, detail) in sorted(results.items()):
        groups[(outcome, "" if outcome == "exact" else _reason(outcome, detail))].append(name)
    order = {"exact": 0, "refused": 1, "skipped": 2, "wrong": 3, "crashed": 4}
    lines = ["| outcome | reason | count | model types |", "|---|---|---|---|"]
    for (outcome, reason), names in sorted(groups.items(), key=lambda item: (order[item[0][0]], -len(item[1]))):
        names_text = ", ".join(f"`{name}`" for name in names)
        lines.append(f"| {outcome} | {reason.replace('|', '/')} | {len(names)} | {names_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    as_markdown = "--markdown" in sys.argv
    only = [arg for arg in sys.argv[1:] if not arg.startswith("--")] or None
    start = time.perf_counter()
    results = sweep(only)
    if as_markdown:
        print(markdown(results))
    else:
        for name, (outcome, detail) in results.items():
            print(f"{name:28s} {outcome:8s} {detail}", flush=True)
    print(f"{summary(results)} in {time.perf_counter() - start:.0f} s")
