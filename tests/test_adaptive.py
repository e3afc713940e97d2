"""block_size="auto" / candidates="auto": the per-step choice follows the cost model and the running
statistics, and the output stays exactly HF greedy whatever is chosen, with and without compile."""

from __future__ import annotations

import pytest
import torch
from greedy_check import assert_matches_greedy
from models import tiny_model
from torch._dynamo.utils import counters

from jacobi_engine import JacobiEngine
from jacobi_engine.adaptive import CostModel, Shape, ShapePolicy

VOCAB = 64


def repetitive(batch=2, width=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(3, 9, (batch, 4), generator=gen)
    input_ids = base.repeat(1, width // 4 + 1)[:, :width]
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    input_ids[0, :2] = 0
    return input_ids, mask


def observe_geometric(policy, shape, keep=0.9, pairs=200):
    """Feeds ``pairs`` forwards of ``shape`` whose accepted counts follow P(a >= j) = keep**(j-1)."""
    width = shape.block
    delta = [0] * (width + 2)
    for a in range(1, width + 1):
        p = keep ** (a - 1) * ((1 - keep) if a < width else 1.0)
        delta[a] = round(pairs * p)
    policy.observe(shape, delta)


def test_choice_follows_a_synthetic_cost_model():
    shapes = [Shape(n) for n in (1, 2, 4, 8, 16)]
    flat = {s: 1.0 for s in shapes}
    linear = {s: float(s.block) for s in shapes}  # a step costs as many tokens as it carries: AR wins
    sublinear = {s: 1.0 + 0.05 * s.block for s in shapes}  # memory-bound: width is nearly free
    for costs, expected in ((flat, Shape(16)), (linear, Shape(1)), (sublinear, Shape(16))):
        policy = ShapePolicy(shapes, costs, explore_every=0)
        for shape in shapes:
            observe_geometric(policy, shape, keep=0.9)
        assert policy.choose() == expected, costs
    # Low acceptance: wide blocks verify little more than one token, so AR wins even when width costs little.
    cheap = {s: 1.0 + 0.1 * s.block for s in shapes}
    policy = ShapePolicy(shapes, cheap, explore_every=0)
    for shape in shapes:
        observe_geometric(policy, shape, keep=0.05)
    assert policy.choose() == Shape(1)


def test_survival_extrapolates_to_unseen_widths():
    shapes = [Shape(n) for n in (1, 4, 32)]
    policy = ShapePolicy(shapes, {s: 1.0 for s in shapes}, explore_every=0)
    observe_geometric(policy, Shape(4), keep=0.8, pairs=2000)
    # Seen up to 4 slots: S(j) ~ 0.8**(j-1); beyond, the last hazard continues.
    assert policy.survival(3) == pytest.approx(0.64, abs=0.03)
    assert policy.block_estimate(32) == pytest.approx(sum(0.8**i for i in range(32)), rel=0.1)
    assert policy.choose() == Shape(32)


def test_choice_follows_the_rows_draft_contexts():
    """Rows without a draft verify one token whatever the width; rows with a long draft verify many. With
    width that costs, the choice is one slot for the first and a wide block for the second."""
    shapes = [Shape(n) for n in (1, 4, 16)]
    costs = {Shape(1): 1.0, Shape(4): 1.5, Shape(16): 2.0}
    policy = ShapePolicy(shapes, costs, explore_every=0)
    for shape in shapes:
        undrafted = [0] * (shape.block + 1)
        undrafted[1] = 300  # context 0: one token per forward
        drafted = [0] * (shape.block + 1)
        drafted[shape.block] = 300  # context 5: the whole block
        policy.observe(shape, [undrafted, [0] * (shape.block + 1), [], [], [], drafted])
    assert policy.choose({0: 1}) == Shape(1)
    assert policy.choose({5: 1}) == Shape(16)
    # A batch sums its rows' expectations: one drafted row among seven undrafted ones: 7 + 16 over 2.0
    # beats 8 over 1.0 (and 7 + 4 over 1.5).
    assert policy.choose({0: 7, 5: 1}) == Shape(16)
    assert policy.choose({0: 30, 5: 1}) == Shape(1)
    # A context with no statistics of its own leans on all contexts': between the two.
    assert 1.0 < policy.estimate(Shape(16), 3) < 16.0
    assert policy.estimate(Shape(16), 0) == pytest.approx(1.0, abs=0.05)


def test_step_times_correct_the_measured_costs():
    """The cost model measured width as nearly free; the steps the call runs say it is dear: the choice
    moves to the narrow block once enough of them outweigh the measurement."""
    shapes = [Shape(1), Shape(16)]
    policy = ShapePolicy(shapes, {Shape(1): 1.0, Shape(16): 1.1}, explore_every=0)
    for shape in shapes:
        observe_geometric(policy, shape, keep=0.5)  # about 2 tokens per forward at 16 slots
    assert policy.choose() == Shape(16)
    policy.observe_seconds(Shape(16), 4.0)
    assert policy.cost(Shape(16)) == pytest.approx(1.1)  # one step does not outweigh the measurement
    for _ in range(4):
        policy.observe_seconds(Shape(16), 4.0)
    assert policy.cost(Shape(16)) == pytest.approx(4.0) and policy.choose() == Shape(1)
    assert policy.summary()["16"]["measured_seconds_per_step"] == 1.1
    for _ in range(100):  # only the recent steps count
        policy.observe_seconds(Shape(16), 1.2)
    assert policy.cost(Shape(16)) == pytest.approx(1.2) and len(policy.timed[Shape(16)]) == 32


def held_environment(policy, decisions=600, first=1, held=5, narrow=(2, 3)):
    """Runs ``policy`` against a synthetic decoder in which a 16-slot block verifies ``first`` tokens on
    the step after a switch to it and ``held`` on the steps that continue it (its tail has converged),
    a 4-slot block ``narrow`` alternately and one slot 1; returns the blocks of the last 200 decisions."""
    previous, used = None, []
    for i in range(decisions):
        shape = policy.choose()
        delta = [0] * 18
        if shape.block == 16:
            delta[held if shape == previous else first] = 1
        elif shape.block == 4:
            delta[narrow[i % 2]] = 1
        else:
            delta[1] = 1
        policy.observe(shape, delta)
        previous = shape
        used.append(shape.block)
    return used[-200:]


@pytest.mark.parametrize("first,held,wide_cost", [(1, 5, 1.3), (2, 5, 1.3)])
def test_choice_scores_a_shape_by_what_it_verifies_while_held(first, held, wide_cost, monkeypatch):
    """Held, 16 slots verify 5 tokens per 1.3 cost, 4 slots 2.5 per 1.0: 16 is the better choice, but
    its first step after a switch verifies 1-2. The held calibration finds it; scored by the survival
    model alone (calibration fixed at 1) the choice stays at 4 slots, so this test fails without the
    calibration. (Not found, and not asserted: 4 held tokens per 1.2 cost after a first step of 1,
    which explorations of one decision never see continued; runs of 8 found it, and cost SmolLM2 in
    float32 its gain over greedy.)"""
    shapes = [Shape(1), Shape(4), Shape(16)]
    costs = {Shape(1): 0.9, Shape(4): 1.0, Shape(16): wide_cost}
    used = held_environment(ShapePolicy(shapes, costs), first=first, held=held)
    assert used.count(16) >= 180, used
    myopic = ShapePolicy(shapes, costs)
    monkeypatch.setattr(myopic, "calibration", lambda shape: 1.0)
    used = held_environment(myopic, first=first, held=held)
    assert used.count(4) >= 180, used


def test_a_dear_switch_keeps_the_current_shape():
    """Two shapes nearly tied per step: the current one is kept when changing shape costs more than the
    other would gain, and left once the switches measured are cheap again; a seeded sampling call's
    policy (no wall-time learning) ignores switch times."""
    shapes = [Shape(4), Shape(8)]
    costs = {Shape(4): 1.0, Shape(8): 1.0}
    policy = ShapePolicy(shapes, costs, explore_every=0)
    observe_geometric(policy, Shape(8), keep=0.5)  # 8 slots verify a little more than 4
    assert policy.choose() == Shape(8)
    policy.current = Shape(4)  # say the call runs 4 slots, and widening has been dear
    for _ in range(5):
        policy.observe_switch(Shape(4), Shape(8), 0.5)
    policy.observe_switch(Shape(8), Shape(4), 0.0)  # narrowing is free: kept apart
    assert policy.switch_cost(Shape(8)) == pytest.approx(0.5) and policy.switch_cost(Shape(4)) == 0.0
    assert policy.choose() == Shape(4)
    for _ in range(32):
        policy.observe_switch(Shape(4), Shape(8), 0.001)
    assert policy.choose() == Shape(8)
    seeded = ShapePolicy(shapes, costs, explore_every=0, learn_costs=False)
    seeded.observe_switch(Shape(4), Shape(8), 10.0)
    seeded.current = Shape(4)
    assert seeded.switch_cost(Shape(8)) == 0.0


@pytest.mark.parametrize("batch,slots,width", [(1, 2, 1), (3, 16, 4), (2, 32, 8), (4, 8, 7)])
def test_shifted_tail_against_a_plain_loop(batch, slots, width):
    from jacobi_engine.runner import shifted_tail

    gen = torch.Generator().manual_seed(batch * 100 + slots)
    stale = torch.randint(0, 1000, (batch, slots), generator=gen)
    fresh = torch.randint(1000, 2000, (batch, slots - width), generator=gen)
    shift = torch.randint(-2, slots + 2, (batch,), generator=gen, dtype=torch.int32)
    shift[0] = 0
    want = torch.empty_like(fresh)
    for b in range(batch):
        for i in range(width, slots):
            old = i + int(shift[b])
            want[b, i - width] = stale[b, old] if shift[b] >= 0 and old < slots else fresh[b, i - width]
    assert torch.equal(shifted_tail(stale, shift, width, fresh), want)


def test_widening_takes_the_left_blocks_tail_shifted(monkeypatch):
    """16 -> 4 -> 16 slots: the 16-slot block's new slots 4.. hold what it held when it was left, at the
    same sequence positions (slot i <- old slot i + tokens committed since), fresh guesses past it."""
    from jacobi_engine.runner import Runner

    sequence = [Shape(16), Shape(4), Shape(4), Shape(16)] * 20
    steps = iter(sequence)
    monkeypatch.setattr(ShapePolicy, "choose", lambda self, contexts=None: next(steps, Shape(16)))
    left: dict = {}  # shape -> (its block, the rows' lengths) when it was left, recorded here
    checked = []
    original = Runner.switch

    def switch(self, entry, shape, known=None):
        before = entry.active
        source, target = entry.variant.state, entry.variants[shape].state
        recorded = left.get(shape)
        if shape != before:
            left[before] = (source.block.clone(), source.lengths.clone())
        original(self, entry, shape, known)
        if shape.block == 16 and before.block == 4 and recorded is not None:
            old_block, old_lengths = recorded
            shift = (source.lengths - old_lengths).tolist()
            for b, k in enumerate(shift):
                if entry.state.done[b]:
                    continue
                for i in range(4, 16 - k):
                    assert target.block[b, i] == old_block[b, i + k], (b, i, k)
                checked.append(k)

    monkeypatch.setattr(Runner, "switch", switch)
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=5)
    flat = CostModel("cpu", "float32", {(2, Shape(n)): 1.0 for n in (1, 4, 16)})
    engine = JacobiEngine(
        model,
        block_size="auto",
        candidates=0,
        init="random_prompt",
        block_sizes=(1, 4, 16),
        cost_model=flat,
        sync_every=1,
    )
    kwargs = dict(attention_mask=mask, max_new_tokens=48, eos_token_id=[], pad_token_id=0)
    out = engine.generate(input_ids, **kwargs)
    assert torch.equal(out.sequences, model.generate(input_ids, do_sample=False, **kwargs))
    assert len(checked) >= 4 and any(0 < k < 12 for k in checked), checked


@pytest.mark.parametrize("sync_every", [1, 3])
def test_candidates_find_the_output_of_plain_steps_in_the_pool(sync_every, monkeypatch):
    """Plain steps leave the candidate pool alone; switching to a shape with candidates first adds the
    output they committed: then every output n-gram (key at column c, continuation c+1 .. c+g, c + g
    before the row's length) is in the table, as a scan of the token rows finds them here."""
    from jacobi_engine.runner import Runner

    g = 3
    with_candidates = Shape(4, 2, g)
    sequence = ([Shape(4)] * 5 + [Shape(16)] * 3 + [with_candidates] * 2) * 12
    steps = iter(sequence)
    monkeypatch.setattr(ShapePolicy, "choose", lambda self, contexts=None: next(steps, Shape(4)))
    checked = []
    original = Runner.switch

    def switch(self, entry, shape, known=None):
        before = entry.active
        original(self, entry, shape, known)
        if not shape.candidates or before.candidates:
            return
        state = entry.state
        pool = state.pool
        stored = [
            {(int(k), tuple(n)) for k, n in zip(pool.keys[b].tolist(), pool.ngrams[b].tolist()) if k >= 0}
            for b in range(state.key.batch)
        ]
        for b in range(state.key.batch):
            row, length, start = state.tokens[b].tolist(), int(state.lengths[b]), int(state.pad_lengths[b])
            for c in range(start, length - g):
                assert (row[c], tuple(row[c + 1 : c + g + 1])) in stored[b], (b, c, length)
            checked.append(length - int(state.prompt_widths[b]))

    monkeypatch.setattr(Runner, "switch", switch)
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=2)
    shapes = [Shape(4), Shape(16), with_candidates]
    flat = CostModel("cpu", "float32", {(2, s): 1.0 for s in shapes})
    engine = JacobiEngine(
        model,
        block_size="auto",
        block_sizes=(4, 16),
        candidates="auto",
        candidate_counts=(0, 2),
        candidate_len=g,
        init="ngram",
        cost_model=flat,
        pool_slots=64,  # no entry of this short output is evicted
        sync_every=sync_every,
    )
    kwargs = dict(attention_mask=mask, max_new_tokens=60, eos_token_id=[], pad_token_id=0)
    out = engine.generate(input_ids, **kwargs)
    assert torch.equal(out.sequences, model.generate(input_ids, do_sample=False, **kwargs))
    assert len(checked) >= 4 and max(checked) > 20, checked  # checked after long runs of plain steps


def test_costs_are_monotone_in_tokens():
    from jacobi_engine.adaptive import monotone_costs

    noisy = {Shape(1): 1.0, Shape(2): 1.4, Shape(4): 1.2, Shape(8): 1.6, Shape(2, 2, 4): 1.5, Shape(16): 2.0}
    fitted = monotone_costs(noisy)
    order = sorted(noisy, key=lambda s: (s.tokens, s.candidates))
    assert all(fitted[a] <= fitted[b] for a, b in zip(order, order[1:]))
    assert fitted[Shape(2)] == fitted[Shape(4)] == pytest.approx(1.3)  # the violating pair, averaged
    assert fitted[Shape(1)] == 1.0 and fitted[Shape(16)] == 2.0  # what was in order stays
    assert monotone_costs({Shape(1): 3.0}) == {Shape(1): 3.0}


def test_statistics_carry_across_greedy_calls_only():
    shapes = [Shape(n) for n in (1, 4)]
    policy = ShapePolicy(shapes, {s: 1.0 for s in shapes}, explore_every=0)
    observe_geometric(policy, Shape(4), keep=0.9, pairs=100)
    carried = policy.carried(decay=0.5)
    assert carried.forwards(Shape(4)) == pytest.approx(policy.forwards(Shape(4)) / 2)
    assert carried.estimate(Shape(4)) == pytest.approx(policy.estimate(Shape(4)), rel=0.05)
    assert carried.summary()["4"]["forwards"] == 0  # a call reports its own forwards
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=5)
    cost_model = CostModel("cpu", "float32", {(2, Shape(n)): 1.0 + n / 8 for n in (1, 4, 16)})
    engine = JacobiEngine(
        model, block_size="auto", block_sizes=(1, 4, 16), init="ngram", cost_model=cost_model, seed=11
    )
    kwargs = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0)
    engine.generate(input_ids, **kwargs)
    (first,) = engine.runner.policies.values()
    engine.generate(input_ids, **kwargs)
    (second,) = engine.runner.policies.values()
    assert second is not first and sum(second.steps[None].values()) > sum(first.call_steps.values())
    # Sampling calls start from nothing: a seeded call repeats itself whatever ran before it.
    sampled = dict(kwargs, do_sample=True)
    a = engine.generate(input_ids, **sampled).sequences
    engine.generate(input_ids, **dict(sampled, temperature=0.5))
    engine.generate(input_ids, **kwargs)
    assert torch.equal(engine.generate(input_ids, **sampled).sequences, a)


def test_engine_follows_an_injected_cost_model():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive()
    shapes = [Shape(n) for n in (1, 4, 16)]
    for favoured in (Shape(1), Shape(4)):
        cost_model = CostModel("cpu", "float32")
        for shape in shapes:  # everything but the favoured shape is absurdly slow
            cost_model.seconds[(2, shape)] = 1.0 if shape == favoured else 1000.0
        engine = JacobiEngine(
            model, block_size="auto", candidates=0, block_sizes=(1, 4, 16), cost_model=cost_model, init="ngram"
        )
        out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[], pad_token_id=0)
        chosen = max(out.stats.shapes, key=lambda s: out.stats.shapes[s]["decisions"])
        assert chosen == str(favoured), out.stats.shapes
        assert out.stats.cost_model_seconds == 0  # nothing left to measure


def test_cost_model_is_measured_once_saved_and_loaded(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive()
    engine = JacobiEngine(model, block_size="auto", candidates=0, block_sizes=(1, 4, 8))
    first = engine.generate(input_ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    assert 0 < first.stats.cost_model_seconds < 10
    again = engine.generate(input_ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    assert again.stats.cost_model_seconds == 0
    path = tmp_path / "costs.json"
    engine.save_cost_model(path)
    loaded = CostModel.load(path)
    assert loaded.seconds == engine.cost_model.seconds and set(s for _, s in loaded.seconds) == {
        Shape(1),
        Shape(4),
        Shape(8),
    }
    reused = JacobiEngine(model, block_size="auto", candidates=0, block_sizes=(1, 4, 8), cost_model=str(path))
    out = reused.generate(input_ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    assert out.stats.cost_model_seconds == 0 and torch.equal(out.sequences, first.sequences)
    with pytest.raises(ValueError, match="measured on cpu in bfloat16"):
        JacobiEngine(model, block_size="auto", cost_model=CostModel("cpu", "bfloat16"))
    with pytest.raises(ValueError, match="not a jacobi_engine cost model"):
        (tmp_path / "bad.json").write_text('{"device": "cpu"}')
        CostModel.load(tmp_path / "bad.json")


def cycle_shapes(monkeypatch):
    """Makes every adaptive call switch shape at each decision (a fixed pseudo-random walk over the
    shapes), whatever the statistics say: the output must stay exact whatever is chosen."""
    original = ShapePolicy.choose

    def choose(self, contexts=None):
        picked = original(self, contexts)  # keeps its bookkeeping
        shape = self.shapes[(self.decisions * 7 + self.decisions // 3) % len(self.shapes)]
        self.chosen[picked] -= 1
        self.chosen[shape] += 1
        return shape

    monkeypatch.setattr(ShapePolicy, "choose", choose)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2", "opt", "mistral_sliding", "gpt_neox"])
@pytest.mark.parametrize(
    "settings",
    [dict(block_size="auto"), dict(block_size="auto", candidates="auto", init="ngram", candidate_len=3)],
    ids=["block", "block+candidates"],
)
def test_auto_is_token_identical_to_hf_greedy(arch, settings, monkeypatch):
    model = tiny_model(arch, vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=len(arch))
    want = model.generate(
        input_ids, attention_mask=mask, do_sample=False, max_new_tokens=32, eos_token_id=2, pad_token_id=0
    )
    # Every decision switches shape (the statistics and costs still run as they would).
    cycle_shapes(monkeypatch)
    shapes = JacobiEngine(model, **settings).config.shapes()
    flat = CostModel("cpu", "float32", {(2, shape): 1.0 for shape in shapes})
    engine = JacobiEngine(model, cost_model=flat, **settings)
    out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=32, eos_token_id=2, pad_token_id=0)
    assert assert_matches_greedy(model, out.sequences, want, input_ids, mask, 0) == 0
    used = [s for s, v in out.stats.shapes.items() if v["forwards"]]
    assert len(used) >= 2, out.stats.shapes  # the call really switched between shapes


def test_compiled_auto_switches_graphs_without_recompiling(monkeypatch):
    cycle_shapes(monkeypatch)
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=[], pad_token_id=0)
    want = model.generate(input_ids, do_sample=False, **kwargs)
    flat = CostModel("cpu", "float32", {(2, Shape(n)): 1.0 for n in (1, 4, 16)})
    engine = JacobiEngine(model, block_size="auto", candidates=0, init="ngram", compile=True, cost_model=flat)
    assert [s.block for s in engine.config.shapes()] == [1, 4, 16]  # the small compiled set
    graphs = counters["stats"]["unique_graphs"]
    first = engine.generate(input_ids, **kwargs)
    assert counters["stats"]["unique_graphs"] - graphs == 3  # one graph per shape
    assert all(v.compiled is not None for v in engine.cached_states()[0].variants.values())
    assert assert_matches_greedy(model, first.sequences, want, input_ids, mask, 0) == 0
    with torch.compiler.set_stance("fail_on_recompile"):
        again = engine.generate(input_ids, **kwargs)
    assert torch.equal(again.sequences, first.sequences)
    assert sum(1 for v in again.stats.shapes.values() if v["forwards"]) >= 2


def test_auto_sampling_and_scheduler_run():
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=4)
    engine = JacobiEngine(model, block_size="auto", seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=[], pad_token_id=0, do_sample=True)
    assert torch.equal(engine.generate(input_ids, **kwargs).sequences, engine.generate(input_ids, **kwargs).sequences)
    # Greedy calls one after another on one engine, and requests joining a running adaptive batch.
    engine = JacobiEngine(model, block_size="auto", init="ngram")
    greedy = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=[], pad_token_id=0)
    want = model.generate(input_ids, do_sample=False, **greedy)
    for _ in range(3):
        assert (
            assert_matches_greedy(model, engine.generate(input_ids, **greedy).sequences, want, input_ids, mask, 0) == 0
        )
    scheduler = engine.scheduler(max_batch=2, max_seq_len=64, eos_token_id=[])
    prompts = [input_ids[1].tolist(), input_ids[1, 3:].tolist(), input_ids[1, 1:7].tolist()]
    handles = [scheduler.add_request(prompts[0], max_new_tokens=25)]
    scheduler.step()
    scheduler.step()
    handles += [scheduler.add_request(p, max_new_tokens=20) for p in prompts[1:]]
    scheduler.run()
    for handle, prompt in zip(handles, prompts):
        alone = model.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=handle.max_new_tokens,
            eos_token_id=[],
            pad_token_id=0,
        )
        assert handle.tokens == alone[0, len(prompt) :].tolist()


def test_refusals():
    model = tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="chunked mode"):
        JacobiEngine(model, block_size="auto", mode="chunked")
    with pytest.raises(ValueError, match="block_sizes must be <= 1024"):
        JacobiEngine(model, block_size="auto", block_sizes=(4, 5000))
    with pytest.raises(TypeError, match="block_size must be an int"):
        JacobiEngine(model, block_size="fast")
    with pytest.raises(ValueError, match="record_trajectory"):
        JacobiEngine(model, block_size="auto").generate(torch.tensor([[3, 4, 5]]), record_trajectory=True)
    with pytest.raises(ValueError, match="no cost model"):
        JacobiEngine(model, block_size=4).save_cost_model("x.json")


def test_defaults_are_the_measured_auto_setting():
    """Left out, the block, the candidates and the guesses are the benchmarked ``engine_auto`` setting;
    a setting given keeps its value, a fixed block keeps the fixed-step defaults, and chunked mode (a
    chunk iterated to its fixed point) a chunk of 16."""
    import inspect

    from jacobi_engine import hf
    from jacobi_engine.config import EngineConfig

    fields = ("block_size", "candidates", "init")
    resolved = lambda config: tuple(getattr(config, name) for name in fields)  # noqa: E731
    assert resolved(EngineConfig()) == ("auto", "auto", "ngram")
    assert resolved(EngineConfig(block_size="auto")) == ("auto", "auto", "ngram")
    assert resolved(EngineConfig(candidates="auto")) == ("auto", "auto", "ngram")
    assert resolved(EngineConfig(block_size=8)) == (8, 0, "random_prompt")
    assert resolved(EngineConfig(block_size=8, candidates="auto")) == (8, "auto", "ngram")
    assert resolved(EngineConfig(mode="chunked")) == (16, 0, "random_prompt")
    assert resolved(EngineConfig(block_size="auto", candidates=0, init="random_prompt")) == (
        "auto",
        0,
        "random_prompt",
    )
    assert EngineConfig() == EngineConfig(block_size="auto", candidates="auto", init="ngram")  # one cached engine
    assert EngineConfig(compile=True).shapes() == sorted(
        Shape(n, k, 4 if k else 0) for n in (1, 4, 16) for k in (0, 2)
    )  # compiled: six graphs
    # HF passes custom_generate the keywords it names: left out, they must stay unset, not "auto" (which
    # chunked mode refuses).
    assert inspect.signature(hf.generate).parameters["block_size"].default is None

    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=6)
    kwargs = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=[], pad_token_id=0)
    want = model.generate(input_ids, do_sample=False, **kwargs)
    out = JacobiEngine(model).generate(input_ids, **kwargs)
    assert assert_matches_greedy(model, out.sequences, want, input_ids, mask, 0) == 0
    assert out.stats.shapes and out.stats.cost_model_seconds > 0  # the step was chosen from measured costs
    chunked = JacobiEngine(model, mode="chunked").generate(input_ids, **kwargs)
    assert assert_matches_greedy(model, chunked.sequences, want, input_ids, mask, 0) == 0


def test_seeded_sampling_repeats_across_engines_that_share_a_cost_model(tmp_path):
    """With the default ``"auto"``, a seeded sampling call's draws follow the shapes it runs, chosen from
    the cost model: an engine loading another's saved cost model repeats its draws."""
    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=7)
    kwargs = dict(attention_mask=mask, max_new_tokens=24, eos_token_id=[], pad_token_id=0, do_sample=True)
    first = JacobiEngine(model, seed=11)
    drawn = first.generate(input_ids, **kwargs)
    assert drawn.stats.cost_model_seconds > 0
    path = tmp_path / "costs.json"
    first.save_cost_model(path)
    again = JacobiEngine(model, seed=11, cost_model=str(path)).generate(input_ids, **kwargs)
    assert again.stats.cost_model_seconds == 0
    assert torch.equal(again.sequences, drawn.sequences)
    assert torch.equal(first.generate(input_ids, **kwargs).sequences, drawn.sequences)


def test_the_one_call_shortcut_measures_the_costs_once_per_model():
    import jacobi_engine

    model = tiny_model("llama", vocab_size=VOCAB)
    input_ids, mask = repetitive(seed=8)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    want = model.generate(input_ids, do_sample=False, **kwargs)
    first = jacobi_engine.generate(model, input_ids, **kwargs)
    second = jacobi_engine.generate(model, input_ids, **kwargs)
    assert first.stats.cost_model_seconds > 0 and second.stats.cost_model_seconds == 0
    for out in (first, second):
        assert assert_matches_greedy(model, out.sequences, want, input_ids, mask, 0) == 0
    other = tiny_model("llama", vocab_size=VOCAB)  # another model measures its own
    assert jacobi_engine.generate(other, input_ids, **kwargs).stats.cost_model_seconds > 0
