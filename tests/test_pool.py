"""Multi-candidate verification (issue 11): the n-gram pool against a plain-Python statement of its
contract, the KV-row move against a loop, and the engine with candidates against HF greedy on every
test architecture, ragged batches, EOS inside branches, both modes."""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch
from greedy_check import assert_matches_greedy, hf_greedy
from models import ARCHITECTURES, tiny_model

from jacobi_engine import JacobiEngine, ops
from jacobi_engine.pool import CandidatePool

VOCAB = 96
PAD = 0


class PythonPool:
    """The contract, spelled out: per sequence and bucket (key % H) a FIFO of at most S distinct
    (key, n-gram) entries; a lookup returns the newest entries whose key matches, newest first."""

    def __init__(self, batch, buckets, slots):
        self.buckets, self.slots = buckets, slots
        self.table = [[deque() for _ in range(buckets)] for _ in range(batch)]

    def insert(self, keys, ngrams, valid):
        for b in range(len(keys)):
            for key, ngram, ok in zip(keys[b], ngrams[b], valid[b]):
                if not ok or key < 0:
                    continue
                bucket = self.table[b][key % self.buckets]
                if (key, tuple(ngram)) in bucket:
                    continue
                bucket.append((key, tuple(ngram)))
                if len(bucket) > self.slots:
                    bucket.popleft()

    def lookup(self, keys, count):
        result = []
        for b, key in enumerate(keys):
            entries = [ngram for k, ngram in reversed(self.table[b][key % self.buckets]) if k == key]
            result.append(entries[:count])
        return result


@pytest.mark.parametrize("seed", range(6))
def test_pool_matches_the_python_contract(seed):
    rng = random.Random(seed)
    batch, buckets, slots, length = 3, rng.choice([1, 3, 8]), rng.choice([2, 4]), rng.choice([1, 3])
    pool = CandidatePool(batch, length, buckets, slots, "cpu")
    reference = PythonPool(batch, buckets, slots)
    alphabet = rng.choice([4, 12])  # few distinct keys and n-grams: many duplicates and collisions
    for _ in range(25):
        count = rng.randint(1, 9)
        keys = [[rng.randrange(-1, alphabet) for _ in range(count)] for _ in range(batch)]
        ngrams = [[[rng.randrange(alphabet) for _ in range(length)] for _ in range(count)] for _ in range(batch)]
        valid = [[rng.random() < 0.8 for _ in range(count)] for _ in range(batch)]
        # Entries of one call that share a bucket beyond S cannot all go in: keep them within S.
        for b in range(batch):
            seen = {}
            for e in range(count):
                bucket = keys[b][e] % buckets if keys[b][e] >= 0 else None
                if valid[b][e] and bucket is not None:
                    seen[bucket] = seen.get(bucket, 0) + 1
                    if seen[bucket] > slots:
                        valid[b][e] = False
        pool.insert(torch.tensor(keys), torch.tensor(ngrams), torch.tensor(valid))
        reference.insert(keys, ngrams, valid)
        query = [rng.randrange(alphabet) for _ in range(batch)]
        want = min(slots, rng.randint(1, 4))
        found, usable = pool.lookup(torch.tensor(query), want)
        expected = reference.lookup(query, want)
        for b in range(batch):
            got = [tuple(found[b, i].tolist()) for i in range(want) if usable[b, i]]
            assert got == expected[b], (b, query[b])


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_move_cache_rows_matches_a_loop(backend, dtype, device):
    generator = torch.Generator().manual_seed(3)
    # K and V of different head sizes (MLA), one with an odd row size in bytes for 2-byte dtypes.
    shapes = [(3, 30, 2, 4), (3, 30, 2, 3), (3, 30, 1, 5)]
    buffers = [torch.randn(*shape, generator=generator).to(dtype).to(device) for shape in shapes]
    before = [b.clone() for b in buffers]
    src = torch.tensor([10, 4, 7], device=device)  # sequence 1 stays, sequence 2 overlaps
    dst = torch.tensor([3, 4, 5], device=device)
    ops.move_cache_rows(buffers, src, dst, 5, backend=backend)
    for buffer, old in zip(buffers, before):
        expected = old.clone()
        for b in range(3):
            for j in range(5):
                expected[b, dst[b] + j] = old[b, src[b] + j]
        assert torch.equal(buffer, expected)


def repetitive_prompts(batch=3, width=14, seed=1):
    """Prompts over a small alphabet, ragged: repeated n-grams give the pool something to find."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 15, (batch, width), generator=generator)
    mask = torch.ones_like(input_ids)
    for row in range(1, batch):
        mask[row, : 3 * row] = 0
        input_ids[row, : 3 * row] = PAD
    return input_ids, mask


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def model(request):
    return tiny_model(request.param, vocab_size=VOCAB)


@pytest.mark.parametrize("mode", ["sliding", "chunked"])
def test_candidates_match_hf_greedy(model, mode):
    input_ids, mask = repetitive_prompts()
    eos = [7]  # frequent: EOS lands inside blocks and branches
    expected = hf_greedy(model, input_ids, mask, 36, eos_token_id=eos, pad_token_id=PAD)
    wins = 0
    for n, k, g in ((4, 3, 3), (1, 4, 5), (8, 4, 4), (16, 2, 6)):
        if mode == "chunked" and g > n - 1:
            continue
        engine = JacobiEngine(model, block_size=n, mode=mode, candidates=k, candidate_len=g, init="ngram")
        out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=36, eos_token_id=eos)
        assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)
        stats = out.stats
        generated = (out.sequences[:, input_ids.shape[1] :] != PAD).sum()  # no pad id is generated here
        assert sum(i * c for i, c in enumerate(stats.accepted_histogram)) == stats.tokens_generated - 3
        assert stats.candidate_wins <= sum(stats.accepted_histogram)
        assert stats.tokens_generated <= int(generated) + 3 * 36
        wins += stats.candidate_wins
    if mode == "sliding" or model.config.model_type in ("gemma2", "gpt2"):
        assert wins > 0  # the branches really won, so their commit path (KV move included) ran


def test_candidates_are_validated():
    model = tiny_model("llama", vocab_size=VOCAB)
    for kwargs, error in (
        (dict(candidates=-1), ValueError),
        (dict(candidates=2.0), TypeError),
        (dict(candidates=2, candidate_len=0), ValueError),
        (dict(candidates=9, pool_slots=8), ValueError),
        (dict(candidates=2, candidate_len=4, block_size=4, mode="chunked"), ValueError),
    ):
        with pytest.raises(error, match="candidate|pool_slots"):
            JacobiEngine(model, **kwargs)


def test_move_cache_rows_rejects_bad_arguments():
    buffer = torch.zeros(2, 10, 1, 4)
    with pytest.raises(ValueError, match="must lie in the cache"):
        ops.move_cache_rows([buffer], torch.tensor([8, 0]), torch.tensor([1, 0]), 5)
    with pytest.raises(TypeError, match="int64"):
        ops.move_cache_rows([buffer], torch.tensor([1, 0], dtype=torch.int32), torch.tensor([0, 0]), 1)
    with pytest.raises(ValueError, match="contiguous"):
        ops.move_cache_rows([buffer[..., ::2]], torch.tensor([1, 0]), torch.tensor([0, 0]), 1)


def test_move_cache_rows_opcheck():
    buffers = [torch.randn(2, 12, 2, 4), torch.randn(2, 12, 2, 2)]
    args = (buffers, torch.tensor([6, 1]), torch.tensor([1, 1]), 3, ops.new_error_word("cpu"))
    torch.library.opcheck(torch.ops.jacobi_engine.move_cache_rows.default, args)


def test_graph_warm_up_leaves_no_trace():
    """CUDA-graph capture warms up on a snapshot of the step state and restores it (engine._capture).
    On CPU: two real steps, then the restore, then decoding must give exactly what a plain run gives
    (tokens and statistics), so the snapshot covers every piece of state a step mutates."""
    warmed_up = []

    def warm_up_first(entry, run_step):
        if not warmed_up:  # before the first real step: two steps on a snapshot, then the restore
            snapshot = entry.state.snapshot()
            for _ in range(2):
                run_step()
            entry.state.restore(snapshot)
            warmed_up.append(True)
        run_step()

    model = tiny_model("gpt2", vocab_size=VOCAB)
    input_ids, mask = repetitive_prompts(seed=4)
    kwargs = dict(block_size=6, candidates=3, candidate_len=4, init="ngram")
    plain = JacobiEngine(model, **kwargs).generate(input_ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    engine = JacobiEngine(model, **kwargs)
    with engine.watch_steps(warm_up_first):
        warmed = engine.generate(input_ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    assert warmed_up
    assert torch.equal(plain.sequences, warmed.sequences)
    assert plain.stats.accepted_histogram == warmed.stats.accepted_histogram
    assert plain.stats.candidate_wins == warmed.stats.candidate_wins > 0


def test_sampling_with_candidates_is_seeded_and_batch_independent():
    """do_sample=True with candidates: the same seed gives the same tokens, a row's tokens do not
    depend on its batch, and branches win steps (their distribution: tests/test_sampling.py)."""
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive_prompts(seed=5)
    kwargs = dict(block_size=4, candidates=3, candidate_len=3, init="ngram", seed=123)
    settings = dict(max_new_tokens=24, eos_token_id=[], do_sample=True, temperature=0.7)
    first = JacobiEngine(model, **kwargs).generate(input_ids, attention_mask=mask, **settings)
    again = JacobiEngine(model, **kwargs).generate(input_ids, attention_mask=mask, **settings)
    assert torch.equal(first.sequences, again.sequences)
    assert first.stats.candidate_wins > 0
    alone = JacobiEngine(model, **kwargs).generate(input_ids[:1], attention_mask=mask[:1], **settings)
    assert torch.equal(first.sequences[0], alone.sequences[0])
    other = JacobiEngine(model, **dict(kwargs, seed=124)).generate(input_ids, attention_mask=mask, **settings)
    assert not torch.equal(first.sequences, other.sequences)


def test_sampling_with_too_many_candidates_is_refused():
    model = tiny_model("llama", vocab_size=VOCAB)
    engine = JacobiEngine(model, block_size=4, candidates=33, candidate_len=2, pool_slots=40)
    with pytest.raises(ValueError, match="candidates"):
        engine.generate(torch.randint(3, 20, (1, 6)), max_new_tokens=4, do_sample=True)


def test_compiled_pool_step_matches_eager_and_hf_without_recompiles():
    """compile=True with candidates: the token-tree forward, the pool and the KV-row move in one graph."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive_prompts(seed=2)
    kwargs = dict(block_size=6, candidates=2, candidate_len=4, init="ngram")
    eager = JacobiEngine(model, **kwargs).generate(input_ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    engine = JacobiEngine(model, compile=True, **kwargs)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    for call in range(2):
        expected = hf_greedy(model, input_ids, mask, 30, eos_token_id=[], pad_token_id=PAD)
        if call == 0:
            out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
            assert out.stats.compile_seconds > 0
        else:
            with torch.compiler.set_stance("fail_on_recompile"):
                out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
        assert_matches_greedy(model, out.sequences, expected, input_ids, mask, PAD)
        assert torch.equal(out.sequences, eager.sequences)
        assert out.stats.candidate_wins == eager.stats.candidate_wins > 0
    (entry,) = engine.cached_states()
    assert entry.compiled is not None, entry.compile_failed
    assert counters["stats"]["unique_graphs"] - graphs == 1
    assert sum(counters["graph_break"].values()) == breaks


def test_compile_with_sampling_and_candidates_decodes_eagerly_with_a_warning():
    """compile=True does not cover the tree sampling step yet: it runs eagerly, says so, and draws
    the eager engine's tokens."""
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive_prompts(seed=6)
    kwargs = dict(block_size=4, candidates=2, candidate_len=3, init="ngram", seed=9)
    settings = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=[], do_sample=True, top_k=20)
    with pytest.warns(RuntimeWarning, match="sampling with candidates is decoded eagerly"):
        compiled = JacobiEngine(model, compile=True, **kwargs).generate(input_ids, **settings)
    eager = JacobiEngine(model, **kwargs).generate(input_ids, **settings)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert compiled.stats.compile_seconds == 0
