"""NgramGuess.refine against a plain-Python statement of prompt lookup."""

from __future__ import annotations

import pytest
import torch

from jacobi_engine.guesses import NgramGuess


def lookup_by_hand(row: list[int], begin: int, end: int, max_ngram: int, min_ngram: int, n: int) -> list[int] | None:
    """The n-1 tokens after the latest earlier occurrence of the longest known suffix, or None.

    Known tokens are ``row[begin:end]``; an occurrence must start at or after ``begin`` and end
    before the suffix's own last token; continuations stop at the known tokens (None past them).
    """
    for k in range(max_ngram, min_ngram - 1, -1):
        if end - k < begin:
            continue
        suffix = row[end - k : end]
        starts = [s for s in range(begin, end - k) if row[s : s + k] == suffix]
        if starts:
            first = max(starts) + k
            return [row[c] if c < end else None for c in range(first, first + n - 1)]
    return None


@pytest.mark.parametrize("bounded", [False, True], ids=["whole-buffer", "search-bound"])
@pytest.mark.parametrize(("max_ngram", "min_ngram"), [(3, 1), (4, 2), (1, 1)])
def test_refine_matches_prompt_lookup_by_hand(max_ngram, min_ngram, bounded):
    n, batch, width = 5, 6, 40
    gen = torch.Generator().manual_seed(max_ngram * 10 + min_ngram)
    # A small alphabet so that n-grams recur; rows of several known lengths and prompt starts.
    tokens = torch.randint(0, 4, (batch, width), generator=gen)
    prompt_starts = torch.tensor([0, 0, 3, 1, 0, 7])
    lengths = torch.tensor([30, 2, 17, 25, 1, 9], dtype=torch.int32)
    rows = torch.tensor([True, True, True, False, True, True])
    block = torch.full((batch, n), -7, dtype=torch.long)
    block[:, 0] = 99
    strategy = NgramGuess(max_ngram=max_ngram, min_ngram=min_ngram)
    strategy.start(tokens, prompt_starts, prompt_starts + 1, n, torch.Generator().manual_seed(0))
    refined = block.clone()
    strategy.refine(refined, lengths, rows, known_columns=int(lengths.max()) if bounded else None)
    for b in range(batch):
        expected = [99] + [-7] * (n - 1)
        found = lookup_by_hand(tokens[b].tolist(), int(prompt_starts[b]), int(lengths[b]), max_ngram, min_ngram, n)
        if found is not None and rows[b]:
            expected = [99] + [t if t is not None else -7 for t in found]
        assert refined[b].tolist() == expected, f"row {b}"
        # The draft length sizes an adaptive engine's steps: the known continuation tokens, up to n - 1.
        drafted = 0 if found is None or not rows[b] else sum(t is not None for t in found)
        assert int(strategy.draft_lengths()[b]) == drafted, f"row {b}"
    # A one-slot block (an adaptive engine's autoregressive step) still looks up, at the full width.
    narrow = block[:, :1].clone()
    strategy.draft_lengths().fill_(-1)
    strategy.refine(narrow, lengths, rows)
    assert narrow.tolist() == block[:, :1].tolist()
    for b in range(batch):
        found = lookup_by_hand(tokens[b].tolist(), int(prompt_starts[b]), int(lengths[b]), max_ngram, min_ngram, n)
        drafted = 0 if found is None or not rows[b] else sum(t is not None for t in found)
        assert int(strategy.draft_lengths()[b]) == drafted, f"row {b}"


def test_draft_context_buckets():
    from jacobi_engine.guesses import DRAFT_CONTEXTS, draft_context

    lengths = torch.tensor([0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 1000])
    assert draft_context(lengths).tolist() == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]
    assert DRAFT_CONTEXTS == 6
