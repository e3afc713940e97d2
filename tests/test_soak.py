"""The soak (python/benchmarks/soak.py) at 100 calls: mixed engine calls against HF greedy, bad calls,
plain HF generate in between, flat memory and live tensors, attention implementation restored."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SOAK_PATH = Path(__file__).resolve().parents[1] / "python" / "benchmarks" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak_benchmark", SOAK_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report():
    soak = load_soak()
    # Memory samples every 5 calls after 20 warm-up calls: 17 samples to fit the slopes on.
    return soak.run_soak(calls=100, seed=0, sample_every=5, warmup=20, log=lambda *_: None)


def _describe(records) -> str:
    return json.dumps(
        [dict(index=r["index"], spec=r["spec"], result=r["result"]) for r in records[:3]], indent=1, default=str
    )[:6000]


def test_soak_covers_the_mix(report):
    counts = report["counts"]
    assert counts["engine"] + counts["bad"] + counts["hf"] == 100
    for key in ("engine", "bad", "hf", "mode/sliding", "mode/chunked", "init/random_prompt", "init/ngram"):
        assert counts.get(key, 0) > 0, key
    for key in ("init/custom", "eos/on", "eos/off", "mask/explicit", "mask/omitted_no_pad"):
        assert counts.get(key, 0) > 0, key
    assert report["engine_rows_that_hit_eos"] > 0


def test_soak_engine_matches_hf_greedy(report):
    """Every engine call except those that omit the mask with a pad id in the prompt (next test)."""
    failures = [r for r in report["failures"] if r["spec"].get("mask_kind") != "omitted_with_pad"]
    assert not failures, f"{len(failures)} failing calls:\n{_describe(failures)}"
    assert report["outcomes"].get("bad/raised", 0) == report["counts"]["bad"]
    assert report["outcomes"].get("hf/equal", 0) == report["counts"]["hf"]


def test_soak_missing_mask_is_inferred_like_hf(report):
    """No attention_mask and a pad id inside the prompt: HF masks the pad ids (issue 9)."""
    flagged = [r for r in report["failures"] if r["spec"].get("mask_kind") == "omitted_with_pad"]
    assert report["counts"].get("mask/omitted_with_pad", 0) > 0
    assert not flagged, f"{len(flagged)} failing calls:\n{_describe(flagged)}"


def test_soak_memory_flat(report):
    memory = report["memory"]
    assert memory["samples_after_warmup"] >= 10
    assert memory["flat"], json.dumps({k: v for k, v in memory.items()}, indent=1)
