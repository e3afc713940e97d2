"""Exact sampling: the engine's output is distributed like HF ``generate(do_sample=True)``.

How the statistics are set up (tests/sampling_stats.py):

* **Goodness of fit.** A tiny Llama (vocabulary 6, logits spread by a wide init) continues one
  prompt by ``HORIZON`` = 4 tokens: 6**4 = 1296 continuations, each with its exact probability
  computed from full forwards and HF's own processor/warper classes. The engine draws
  ``SAMPLES`` = 20000 continuations (one batch, every row an independent sample) and a Pearson
  chi-square test compares the counts with the exact probabilities; cells expected fewer than 5
  times are pooled by common prefix. Cases: both modes, block sizes 1/2/3/4/7, temperature, top-k,
  top-p, min-p, a repetition penalty, EOS inside the horizon, random-prompt and n-gram guesses,
  the SJD rule and the one-hot rule.
* **Power.** The same test must fail for deliberately biased verifiers: one accepts any draft
  equal to its target's argmax, one takes every Jacobi draft as an exact draw (stale proposals
  ignored), and, with candidate branches, one takes a branch whose first token is its parent's
  argmax as certain (on two sliding cases with candidates). Measured: p < 1e-300 (it underflows
  to 0) for every one of them.
* **Candidates.** Four goodness-of-fit cases run with pooled branches (SpecInfer-style
  multi-candidate verification, both rules, both modes, a verified row wider than the block), and
  each asserts that branches won more than 50 steps, so the branch rule produced tokens.
* **Two-sample, long horizon.** 24 tokens from a vocabulary of 16: 3000 engine samples against 3000
  from ``model.generate(do_sample=True)``, chi-square homogeneity tests of the token at four
  positions, of the last bigram and of the number of distinct tokens (Bonferroni over the six).
  Its power check: the "every Jacobi draft is exact" bug gives p = 7e-97 on the token at position 7.

Every test uses fixed seeds, so it is deterministic. A correct sampler fails one of them with
probability ``ALPHA`` = 1e-4 per test (over the choice of seed); with the three rule-level tests
of test_sampling_verify_op.py and the four of test_sampling_tree_op.py there are 22 such tests, so a
change that merely redraws the random numbers trips them with probability below 0.22%.
The whole file runs in about 40 s on 2 cores.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from sampling_stats import canonical, exact_distribution, goodness_of_fit, hf_processors, two_sample

from jacobi_engine import JacobiEngine, ops

VOCAB = 6
HORIZON = 4
SAMPLES = 20000
ALPHA = 1e-4
PROMPT = torch.tensor([[3, 1, 4, 1]])
EOS = 2


def tiny_llama(vocab: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        initializer_range=0.5,  # peaked, prefix-dependent distributions: deviations show
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(VOCAB)


def engine_samples(model, prompt, samples, horizon, *, eos=None, seed=0, engine_args=None, **settings):
    engine = JacobiEngine(model, seed=seed, **(engine_args or {}))
    out = engine.generate(
        prompt.expand(samples, -1),
        max_new_tokens=horizon,
        eos_token_id=[] if eos is None else eos,
        pad_token_id=0,
        do_sample=True,
        **settings,
    )
    generated = out.sequences[:, prompt.shape[1] :]
    if generated.shape[1] < horizon:  # every row stopped early
        generated = torch.cat([generated, generated.new_zeros((samples, horizon - generated.shape[1]))], dim=1)
    return canonical(generated, eos), out.stats


GOF_CASES = {
    "n1-autoregressive": (dict(block_size=1), dict(temperature=0.9)),
    "sliding-n2": (dict(block_size=2), dict()),
    "sliding-n4-temperature": (dict(block_size=4), dict(temperature=0.7)),
    "sliding-n7-top_p": (dict(block_size=7), dict(top_p=0.9)),
    "chunked-n2-eos": (dict(block_size=2, mode="chunked"), dict(temperature=1.2, eos=EOS)),
    "chunked-n3-top_k": (dict(block_size=3, mode="chunked"), dict(top_k=3, temperature=0.8)),
    "sliding-n4-ngram-penalty-min_p": (dict(block_size=4, init="ngram"), dict(repetition_penalty=1.5, min_p=0.1)),
    "chunked-n4-ngram-top_k-top_p": (dict(block_size=4, mode="chunked", init="ngram"), dict(top_k=4, top_p=0.9)),
    "sliding-n4-one_hot-rule": (dict(block_size=4, sampling_rule="one_hot"), dict(temperature=0.7)),
    # With candidates (a small pool: 20000 rows of the default 4096 buckets would need 20 GB).
    "sliding-n4-candidates": (
        dict(block_size=4, candidates=2, candidate_len=3, pool_buckets=16),
        dict(temperature=0.7),
    ),
    "sliding-n2-long-candidates-top_p": (
        dict(block_size=2, candidates=3, candidate_len=2, pool_buckets=16),  # a row wider than the block
        dict(top_p=0.9),
    ),
    "chunked-n3-candidates-top_k": (
        dict(block_size=3, mode="chunked", candidates=2, candidate_len=2, pool_buckets=16),
        dict(top_k=4),
    ),
    "sliding-n4-ngram-candidates-one_hot": (
        dict(block_size=4, init="ngram", candidates=2, candidate_len=3, sampling_rule="one_hot", pool_buckets=16),
        dict(repetition_penalty=1.3),
    ),
}


def exact_for(model, settings: dict):
    chain = hf_processors(
        repetition_penalty=settings.get("repetition_penalty"),
        temperature=settings.get("temperature", 1.0),
        top_k=settings.get("top_k", 0),
        top_p=settings.get("top_p", 1.0),
        min_p=settings.get("min_p"),
    )
    return exact_distribution(model, PROMPT, HORIZON, chain, eos_id=settings.get("eos"))


@pytest.mark.parametrize("case", list(GOF_CASES), ids=list(GOF_CASES))
def test_distribution_is_exact(model, case):
    engine_args, settings = GOF_CASES[case]
    cells, probabilities = exact_for(model, settings)
    samples, stats = engine_samples(model, PROMPT, SAMPLES, HORIZON, seed=11, engine_args=engine_args, **settings)
    p_value, n_bins = goodness_of_fit(samples, cells, probabilities)
    assert n_bins >= 10  # enough resolution for the test to mean something
    print(
        f"{case}: p = {p_value:.3g}, {n_bins} bins, {stats.tokens_per_forward:.3f} tokens/forward, {stats.candidate_wins} branch wins"
    )
    assert p_value > ALPHA, f"{case}: chi-square p = {p_value:.3g} over {n_bins} bins"
    if engine_args["block_size"] > 2:
        # Drafts really were accepted, so the verify rule (not just slot 0) produced tokens.
        assert stats.tokens_per_forward > 1.05
    if engine_args.get("candidates"):
        # Pooled branches won steps, so the multi-candidate rule produced tokens.
        assert stats.candidate_wins > 50


def biased_verify(real):
    """A wrong verifier: any draft equal to its target's argmax is accepted outright (it poses as a
    Jacobi draft whose proposal is the target itself, so the ratio rule accepts it)."""

    def verify(probs, block, fill, sampling, *args, **kwargs):
        proposal, draft_sampled = sampling.proposal, sampling.draft_sampled
        hits = block[:, 1:] == probs[:, :-1].argmax(dim=-1)
        proposal[:, 1:] = torch.where(hits[..., None], probs[:, :-1], proposal[:, 1:])
        draft_sampled[:, 1:] |= hits
        return real(probs, block, fill, sampling, *args, **kwargs)

    return verify


def accept_every_jacobi_draft(real):
    """A wrong verifier with a classic bug: Jacobi drafts are taken as exact draws (their stale
    proposal replaced by the current target, so the ratio rule accepts them all)."""

    def verify(probs, block, fill, sampling, *args, **kwargs):
        proposal, draft_sampled = sampling.proposal, sampling.draft_sampled
        proposal[:, 1:] = torch.where(draft_sampled[:, 1:, None], probs[:, :-1], proposal[:, 1:])
        return real(probs, block, fill, sampling, *args, **kwargs)

    return verify


BIASED = {"accept-argmax-drafts": biased_verify, "accept-every-jacobi-draft": accept_every_jacobi_draft}


def accept_argmax_candidates(real):
    """A wrong multi-candidate verifier: a pooled branch whose first token is its parent's argmax is
    taken as certain (the node's distribution replaced by a point mass on it)."""

    def verify(probs, block, candidates, usable, *args, **kwargs):
        top = probs[:, 0].argmax(dim=-1)
        hit = (usable & (candidates[:, :, 0] == top[:, None])).any(dim=1)
        point = torch.nn.functional.one_hot(top, probs.shape[-1]).to(probs.dtype)
        probs = probs.clone()
        probs[:, 0] = torch.where(hit[:, None], point, probs[:, 0])
        return real(probs, block, candidates, usable, *args, **kwargs)

    return verify


BIASED_TREE = {"accept-argmax-candidates": accept_argmax_candidates}


@pytest.mark.parametrize(
    "case, bias",
    [(case, bias) for case in ("sliding-n4-temperature", "chunked-n3-top_k") for bias in BIASED]
    + [
        (case, bias)
        for case in ("sliding-n4-candidates", "sliding-n4-ngram-candidates-one_hot")
        for bias in BIASED_TREE
    ],
)
def test_power_biased_sampler_fails(model, case, bias, monkeypatch):
    engine_args, settings = GOF_CASES[case]
    if bias in BIASED_TREE:
        monkeypatch.setattr(ops, "sample_tree_verify_and_commit", BIASED_TREE[bias](ops.sample_tree_verify_and_commit))
    else:
        monkeypatch.setattr(ops, "sample_verify_and_commit", BIASED[bias](ops.sample_verify_and_commit))
    cells, probabilities = exact_for(model, settings)
    samples, _ = engine_samples(model, PROMPT, SAMPLES, HORIZON, seed=11, engine_args=engine_args, **settings)
    p_value, n_bins = goodness_of_fit(samples, cells, probabilities)
    print(f"{case} / {bias}: p = {p_value:.3g}")
    assert p_value < ALPHA, f"the biased sampler passed: p = {p_value:.3g} over {n_bins} bins"


# -- long horizon, against HF's own sampler ----------------------------------------------------
LONG_VOCAB, LONG_HORIZON, LONG_SAMPLES = 16, 24, 3000


def long_statistics(generated: torch.Tensor) -> dict[str, torch.Tensor]:
    """Categorical summaries of [N, 24] samples: single tokens, the last bigram, distinct tokens."""
    summaries = {f"token {t}": generated[:, t] for t in (0, 7, 15, 23)}
    summaries["last bigram"] = generated[:, -2] * LONG_VOCAB + generated[:, -1]
    present = torch.zeros((generated.shape[0], LONG_VOCAB), dtype=torch.bool).scatter_(1, generated, True)
    summaries["distinct tokens"] = present.sum(dim=1)
    return summaries


@pytest.fixture(scope="module")
def long_model():
    return tiny_llama(LONG_VOCAB, seed=1)


LONG_CASES = {
    "sliding-n8": (dict(block_size=8), dict(temperature=0.9, top_k=10)),
    "chunked-n6-ngram": (dict(block_size=6, mode="chunked", init="ngram"), dict(top_p=0.95)),
}


def hf_samples(model, settings: dict) -> torch.Tensor:
    prompt = torch.tensor([[5, 9, 3, 5, 9, 12]])
    torch.manual_seed(1234)
    full = dict(temperature=1.0, top_k=0, top_p=1.0)  # HF's top_k default would be 50: state every warper
    full.update(settings)
    out = model.generate(
        prompt.expand(LONG_SAMPLES, -1),
        do_sample=True,
        max_new_tokens=LONG_HORIZON,
        eos_token_id=[],
        pad_token_id=0,
        **full,
    )
    return out[:, prompt.shape[1] :]


def long_p_values(long_model, case: str, monkeypatch=None) -> dict[str, float]:
    engine_args, settings = LONG_CASES[case]
    prompt = torch.tensor([[5, 9, 3, 5, 9, 12]])
    theirs = hf_samples(long_model, settings)
    if monkeypatch is not None:
        monkeypatch.setattr(ops, "sample_verify_and_commit", accept_every_jacobi_draft(ops.sample_verify_and_commit))
    full = dict(top_k=0)
    full.update(settings)
    ours, stats = engine_samples(
        long_model, prompt, LONG_SAMPLES, LONG_HORIZON, seed=5, engine_args=engine_args, **full
    )
    assert stats.tokens_per_forward > 1.05
    mine, hf = long_statistics(ours), long_statistics(theirs)
    return {name: two_sample(mine[name], hf[name])[0] for name in mine}


@pytest.mark.parametrize("case", list(LONG_CASES), ids=list(LONG_CASES))
def test_long_horizon_matches_hf_sampler(long_model, case):
    p_values = long_p_values(long_model, case)
    threshold = ALPHA / len(p_values)  # Bonferroni: the test's false-failure probability stays <= ALPHA
    assert min(p_values.values()) > threshold, p_values


def test_long_horizon_power(long_model, monkeypatch):
    p_values = long_p_values(long_model, "sliding-n8", monkeypatch)
    assert min(p_values.values()) < ALPHA / len(p_values), p_values


# -- API: defaults, reproducibility, independence, bad input -----------------------------------
def test_same_seed_same_output_other_seed_other_output(model):
    prompt = PROMPT.expand(8, -1)
    runs = [
        JacobiEngine(model, block_size=4, seed=seed)
        .generate(prompt, max_new_tokens=12, eos_token_id=[], do_sample=True)
        .sequences
        for seed in (3, 3, 4)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert len({tuple(row) for row in runs[0][:, 4:].tolist()}) > 1  # rows of one batch differ


def test_rows_do_not_depend_on_their_batch(model):
    engine = JacobiEngine(model, block_size=4, seed=9)
    first = torch.tensor([[3, 1, 4, 1], [2, 2, 5, 3], [1, 1, 1, 1]])
    second = torch.tensor([[3, 1, 4, 1], [5, 4, 3, 2], [4, 5, 4, 5]])
    kwargs = dict(max_new_tokens=16, eos_token_id=[], do_sample=True, temperature=1.3)
    a = engine.generate(first, **kwargs).sequences
    b = engine.generate(second, **kwargs).sequences
    alone = engine.generate(first[:1], **kwargs).sequences
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[0], alone[0])


def test_generation_config_defaults(model):
    """do_sample comes from the model's generation_config; greedy stays HF's greedy."""
    prompt = PROMPT.expand(4, -1)
    sampled_model = tiny_llama(VOCAB)
    sampled_model.generation_config.do_sample = True
    sampled_model.generation_config.temperature = 0.5
    kwargs = dict(max_new_tokens=10, eos_token_id=[])
    default = JacobiEngine(sampled_model, block_size=4, seed=2).generate(prompt, **kwargs).sequences
    explicit = (
        JacobiEngine(model, block_size=4, seed=2).generate(prompt, do_sample=True, temperature=0.5, **kwargs).sequences
    )
    assert torch.equal(default, explicit)
    greedy = JacobiEngine(sampled_model, block_size=4).generate(prompt, do_sample=False, **kwargs).sequences
    expected = sampled_model.generate(prompt, do_sample=False, **kwargs)
    assert torch.equal(greedy, expected)
    assert not torch.equal(default, greedy)


@pytest.mark.parametrize(
    "settings, error, name",
    [
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(min_p=1.5), ValueError, "min_p"),
        (dict(typical_p=0.5), ValueError, "typical_p"),
        (dict(do_sample="yes"), TypeError, "do_sample"),
    ],
)
def test_bad_sampling_settings(model, settings, error, name):
    settings = {"do_sample": True, **settings}
    with pytest.raises(error, match=name):
        JacobiEngine(model, block_size=4).generate(PROMPT, max_new_tokens=4, **settings)


def test_bad_sampling_rule(model):
    with pytest.raises(ValueError, match="sampling_rule"):
        JacobiEngine(model, sampling_rule="greedy")
