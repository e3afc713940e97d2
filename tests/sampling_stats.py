"""Statistics for the sampling tests: exact enumeration of a tiny model's continuations, a pooled
chi-square goodness-of-fit test, and a chi-square two-sample (homogeneity) test.

Every expected value here comes from the model itself (full forwards, HF's own logits processor
classes) or from HF's sampler, never from jacobi_engine.
"""

from __future__ import annotations

import itertools

import torch

MIN_EXPECTED = 5.0  # the usual validity condition of the chi-square approximation


def chi2_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X ~ chi-square(dof): the regularised upper incomplete gamma function."""
    half = torch.tensor(dof / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(half, torch.tensor(statistic / 2.0, dtype=torch.float64)))


def hf_processors(repetition_penalty=None, temperature=1.0, top_k=0, top_p=1.0, min_p=None) -> list:
    """HF's own processor and warper objects, in the order ``GenerationMixin._get_logits_processor``
    builds them (processors first, then temperature, top-k, top-p, min-p)."""
    from transformers.generation import logits_process as lp

    chain = []
    if repetition_penalty is not None:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        chain.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(lp.TopPLogitsWarper(top_p))
    if min_p is not None:
        chain.append(lp.MinPLogitsWarper(min_p))
    return chain


@torch.no_grad()
def exact_distribution(model, prompt: torch.Tensor, horizon: int, chain: list, eos_id: int | None = None):
    """Every continuation of ``horizon`` tokens and its exact probability under HF sampling.

    Returns (cells int64 [C, horizon], probabilities float64 [C]). With ``eos_id``, the tokens after
    the first EOS are replaced by -1 (what generation leaves there is padding) and the cells that
    become equal are merged: their probabilities sum to that of the prefix through the EOS.
    """
    vocab = model.config.vocab_size
    continuations = torch.tensor(list(itertools.product(range(vocab), repeat=horizon)))
    ids = torch.cat([prompt.expand(len(continuations), -1), continuations], dim=1)
    width = prompt.shape[1]
    logits = model(ids[:, :-1]).logits[:, width - 1 :].float()
    log_prob = torch.zeros(len(continuations), dtype=torch.float64)
    for t in range(horizon):
        scores = logits[:, t]
        for processor in chain:
            scores = processor(ids[:, : width + t], scores)
        probs = torch.softmax(scores.double(), dim=-1)
        log_prob += probs.gather(1, continuations[:, t : t + 1])[:, 0].log()
    probability = log_prob.exp()
    cells = canonical(continuations, eos_id)
    unique, inverse = torch.unique(cells, dim=0, return_inverse=True)
    return unique, torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, probability)


def canonical(generated: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """Tokens after the first ``eos_id`` of each row replaced by -1."""
    if eos_id is None:
        return generated
    is_eos = (generated == eos_id).to(torch.int32)
    after = (is_eos.cumsum(dim=1) - is_eos) > 0
    return torch.where(after, -1, generated)


def _pooled_bins(cells: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Bin index of every cell: cells with enough expected count are bins of their own, the others
    are pooled by ever shorter common prefixes until each pool is large enough (so sparse tails
    still test the joint structure), and what is left joins the smallest bin."""
    horizon = cells.shape[1]
    bins = torch.full((len(cells),), -1, dtype=torch.long)
    next_bin = 0
    for length in range(horizon, -1, -1):
        left = bins < 0
        if not left.any():
            break
        keys = cells[left, :length] if length > 0 else torch.zeros((int(left.sum()), 1), dtype=torch.long)
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        pooled = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, expected[left])
        big = pooled >= MIN_EXPECTED
        if length == 0 or big.any():
            numbering = torch.cumsum(big.long(), 0) - 1 + next_bin
            assigned = torch.where(big[inverse], numbering[inverse], -1)
            bins[left] = assigned
            next_bin += int(big.sum())
    left = bins < 0
    if left.any():  # a remainder below MIN_EXPECTED even as one pool
        totals = torch.zeros(max(next_bin, 1), dtype=torch.float64).index_add_(0, bins[~left], expected[~left])
        bins[left] = int(totals.argmin()) if next_bin > 0 else 0
    return bins


def goodness_of_fit(samples: torch.Tensor, cells: torch.Tensor, probabilities: torch.Tensor) -> tuple[float, int]:
    """Pearson chi-square test of ``samples`` [N, horizon] against the exact distribution; returns
    (p-value, number of bins). A sample outside the support fails the test outright (p = 0)."""
    total = samples.shape[0]
    expected = probabilities * total
    bins = _pooled_bins(cells, expected)
    n_bins = int(bins.max()) + 1
    # Locate each sample's cell by a mixed-radix code of its tokens (-1, padding, is a digit too).
    radix = int(max(cells.max(), samples.max())) + 2
    weights = radix ** torch.arange(cells.shape[1] - 1, -1, -1)
    cell_codes, order = torch.sort(((cells + 1) * weights).sum(dim=1))
    sample_codes = ((samples + 1) * weights).sum(dim=1)
    where = torch.searchsorted(cell_codes, sample_codes).clamp(max=len(cell_codes) - 1)
    if not bool((cell_codes[where] == sample_codes).all()):
        return 0.0, n_bins
    observed = torch.bincount(bins[order[where]], minlength=n_bins).double()
    expected_bins = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, expected)
    statistic = float(((observed - expected_bins) ** 2 / expected_bins).sum())
    return chi2_sf(statistic, n_bins - 1), n_bins


def two_sample(first: torch.Tensor, second: torch.Tensor) -> tuple[float, int]:
    """Chi-square homogeneity test of two samples of categories (int64 [N1], [N2]); categories
    with a small pooled count are merged. Returns (p-value, number of categories used)."""
    values = torch.cat([first, second])
    unique, inverse = torch.unique(values, return_inverse=True)
    counts = torch.stack(
        [
            torch.bincount(inverse[: len(first)], minlength=len(unique)),
            torch.bincount(inverse[len(first) :], minlength=len(unique)),
        ]
    ).double()  # [2, K]
    share = torch.tensor([len(first), len(second)], dtype=torch.float64)[:, None] / len(values)
    pooled = counts.sum(dim=0)
    big = pooled * share.min() >= MIN_EXPECTED
    table = torch.cat([counts[:, big], counts[:, ~big].sum(dim=1, keepdim=True)], dim=1)
    table = table[:, table.sum(dim=0) > 0]
    expected = share * table.sum(dim=0, keepdim=True)
    statistic = float(((table - expected) ** 2 / expected).sum())
    return chi2_sf(statistic, table.shape[1] - 1), table.shape[1]
