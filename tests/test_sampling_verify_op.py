"""sample_verify_and_commit: the compiled op against its plain-PyTorch reference (bit for bit),
the counter-based random numbers against published test vectors, and the verify rule itself
against the distribution it must reproduce (one slot, exact target, chi-square)."""

from __future__ import annotations

import random

import pytest
import torch
from sampling_stats import chi2_sf

from jacobi_engine import ops, sampling

ALPHA = 1e-4  # per statistical test, as in test_sampling.py
MASK = 0xFFFFFFFF


def test_philox_known_answers():
    """Random123's kat_vectors for philox4x32-10 (counter words, key words -> output words)."""
    vectors = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((MASK,) * 4, (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for counter, key, expected in vectors:
        words = sampling.philox4x32_10(tuple(map(torch.tensor, counter)), tuple(map(torch.tensor, key)))
        assert tuple(int(w) for w in words) == expected


def test_lane_order_sampler():
    """Inverse CDF in lane order: token v sits in lane v % 256, lanes in order, zero weights skipped."""
    weights = torch.tensor([[1.0, 0.0, 3.0]])
    for u, token in ((0.0, 0), (0.2, 0), (0.26, 2), (0.999, 2)):
        assert int(sampling.sample_lane_order(weights, torch.tensor([u]))[0]) == token
    wide = torch.zeros((1, 300))
    wide[0, [0, 1, 256]] = 1.0  # order: 0, 256 (lane 0), then 1 (lane 1)
    for u, token in ((0.1, 0), (0.5, 256), (0.9, 1)):
        assert int(sampling.sample_lane_order(wide, torch.tensor([u]))[0]) == token
    assert int(sampling.sample_lane_order(torch.zeros((1, 4)), torch.tensor([0.5]))[0]) == -1


def random_case(rng: random.Random, device):
    batch, n = rng.randint(1, 4), rng.randint(1, 7)
    vocab = rng.choice([2, 3, 5, 17, 300, 700])
    generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
    logits = torch.randn((batch, n, vocab), generator=generator) * rng.choice([0.5, 2.0, 6.0])
    if rng.random() < 0.5:
        logits = logits.masked_fill(logits < -1, -float("inf"))  # top-k-like zeros
        logits[..., 0] = logits[..., 0].clamp(min=0)  # keep every row non-empty
    probs = logits.softmax(-1)
    proposal = (torch.randn((batch, n, vocab), generator=generator) * 2).softmax(-1)
    block = torch.randint(0, vocab, (batch, n), generator=generator)
    # Some drafts are the likeliest token, so acceptance and rejection both happen often.
    likely = probs.argmax(-1).roll(1, dims=1)
    block = torch.where(torch.rand((batch, n), generator=generator) < 0.4, likely, block)
    limits = torch.randint(1, 20, (batch,), dtype=torch.int32, generator=generator)
    chunked = rng.random() < 0.5
    return dict(
        probs=probs,
        proposal=proposal,
        draft_sampled=torch.rand((batch, n), generator=generator) < 0.6,
        block=block,
        fill=torch.randint(0, vocab, (batch, n), generator=generator),
        cache_seqlens=torch.randint(0, 20, (batch,), dtype=torch.int32, generator=generator),
        out_tokens=torch.full((batch, 32), -7),
        n_generated=(torch.rand((batch,), generator=generator) * limits).to(torch.int32),
        done=torch.rand((batch,), generator=generator) < 0.2,
        eos_ids=torch.tensor([0] if rng.random() < 0.5 else [], dtype=torch.long),
        max_new_tokens=limits,
        n_fixed=torch.randint(0, n, (batch,), dtype=torch.int32, generator=generator)
        if chunked
        else torch.zeros(batch, dtype=torch.int32),
        seed=torch.tensor([rng.randint(-(2**63), 2**63 - 1)]),
        sequence_ids=torch.randint(0, 10**6, (batch,), generator=generator),
        step=torch.tensor([rng.randint(0, 10**4)]),
        chunked=chunked,
    ), device


def groups(t: dict) -> tuple[ops.SamplingState, ops.CommitTarget]:
    """The op's argument groups over a case's tensors (named as the tests name them)."""
    sampling = ops.SamplingState(
        t["proposal"], t["draft_sampled"], t["n_fixed"], t["seed"], t["sequence_ids"], t["step"]
    )
    target = ops.CommitTarget(
        t["out_tokens"],
        t["n_generated"],
        t["done"],
        t["eos_ids"],
        t["max_new_tokens"],
        t["cache_seqlens"],
        t["chunked"],
    )
    return sampling, target


def call(t: dict, backend: str = "auto") -> torch.Tensor:
    return ops.sample_verify_and_commit(t["probs"], t["block"], t["fill"], *groups(t), backend=backend)


def op_args(t: dict) -> tuple:
    """torch.ops.jacobi_engine.sample_verify_and_commit's arguments, in its schema order."""
    sampling, target = groups(t)
    return (t["probs"], t["block"], t["fill"], *sampling.op_args(), *target.op_args())


def run(case, device, backend):
    tensors = {k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    n_accepted = call(tensors, backend)
    return n_accepted.cpu(), {k: v.cpu() for k, v in tensors.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("chunk", range(4))
def test_native_matches_reference_bit_for_bit(chunk, device):
    rng = random.Random(100 + chunk)
    for _ in range(60):
        case, _ = random_case(rng, device)
        expected_accepted, expected = run(case, "cpu", "torch")
        accepted, state = run(case, device, "native")
        assert torch.equal(accepted, expected_accepted)
        for name, value in expected.items():
            assert torch.equal(state[name], value), name


def test_accepted_count_and_commit_agree_with_greedy_bookkeeping():
    """Deterministic cases: a draft with all the target's mass is accepted (one-hot rule), a draft
    without any is rejected and replaced; fixed chunk slots stand whatever their probability."""
    vocab, n = 4, 4
    probs = torch.zeros((1, n, vocab))
    probs[0, 0, 2] = 1.0  # slot 0 is sure of token 2: the draft 2 must be accepted
    probs[0, 1, :] = torch.tensor([0.0, 0.5, 0.0, 0.5])  # the draft 3... then draft 0 has p = 0
    probs[0, 2, :] = torch.tensor([0.0, 0.0, 1.0, 0.0])
    probs[0, 3, :] = 0.25
    case = dict(
        probs=probs,
        proposal=torch.full((1, n, vocab), 0.25),
        draft_sampled=torch.zeros((1, n), dtype=torch.bool),
        block=torch.tensor([[1, 2, 0, 3]]),
        fill=torch.tensor([[9, 9, 9, 9]]),
        cache_seqlens=torch.tensor([10], dtype=torch.int32),
        out_tokens=torch.full((1, 16), -7),
        n_generated=torch.tensor([0], dtype=torch.int32),
        done=torch.tensor([False]),
        eos_ids=torch.tensor([], dtype=torch.long),
        max_new_tokens=torch.tensor([16], dtype=torch.int32),
        n_fixed=torch.tensor([0], dtype=torch.int32),
        seed=torch.tensor([7]),
        sequence_ids=torch.tensor([0]),
        step=torch.tensor([0]),
        chunked=False,
    )
    for backend in ("native", "torch"):
        accepted, state = run(case, "cpu", backend)
        assert int(accepted[0]) == 2  # draft 2 accepted, draft 0 (p = 0) rejected
        assert state["out_tokens"][0, 0] == 2 and state["out_tokens"][0, 1] in (1, 3)
        assert int(state["cache_seqlens"][0]) == 12
        # Next block: the replacement, then slot 2's and 3's fresh samples (Jacobi drafts), no fill.
        assert state["block"][0, 0] == state["out_tokens"][0, 1] and state["block"][0, 1] == 2
        assert state["draft_sampled"][0].tolist() == [False, True, True, False]
        assert torch.equal(state["proposal"][0, 1], probs[0, 2]) and torch.equal(state["proposal"][0, 2], probs[0, 3])
    chunk = dict(case, chunked=True, n_fixed=torch.tensor([2], dtype=torch.int32))
    accepted, state = run(chunk, "cpu", "native")
    assert int(accepted[0]) >= 3  # slots 1 and 2 were verified earlier: they stand even at p = 0


def first_token_distribution(target, proposal, draft_kind, samples, seed):
    """Verified first new token of ``samples`` rows of a 2-slot block whose draft is drawn from
    ``proposal`` (ratio rule) or is the fixed token ``draft_kind`` (one-hot rule)."""
    vocab = target.numel()
    generator = torch.Generator().manual_seed(seed)
    probs = torch.stack([target, torch.full((vocab,), 1.0 / vocab)])[None].expand(samples, -1, -1).contiguous()
    if draft_kind == "sampled":
        drafts = torch.multinomial(proposal, samples, replacement=True, generator=generator)
        sampled = torch.tensor([False, True]).expand(samples, -1).contiguous()
    else:
        drafts = torch.full((samples,), int(draft_kind))
        sampled = torch.zeros((samples, 2), dtype=torch.bool)
    prop = torch.stack([proposal, proposal])[None].expand(samples, -1, -1).contiguous()
    out = torch.full((samples, 4), -1)
    sampling = ops.SamplingState(
        prop,
        sampled,
        torch.zeros(samples, dtype=torch.int32),
        torch.tensor([seed]),
        torch.arange(samples),
        torch.tensor([0]),
    )
    target = ops.CommitTarget(
        out,
        torch.zeros(samples, dtype=torch.int32),
        torch.zeros(samples, dtype=torch.bool),
        torch.tensor([], dtype=torch.long),
        torch.full((samples,), 4, dtype=torch.int32),
        torch.zeros(samples, dtype=torch.int32),
        False,
    )
    accepted = ops.sample_verify_and_commit(
        probs,
        torch.stack([torch.zeros(samples, dtype=torch.long), drafts], dim=1),
        torch.zeros((samples, 2), dtype=torch.long),
        sampling,
        target,
    )
    return out[:, 0], accepted == 2, drafts


@pytest.mark.parametrize("draft_kind", ["sampled", "1", "3"])
def test_verify_rule_reproduces_the_target(draft_kind):
    """One slot: whatever the draft, the verified token is distributed as the target p (chi-square,
    60000 rows), and the acceptance rate is the rule's: sum(min(p, q)) for SJD, p(d) for one-hot."""
    samples = 60000
    target = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    proposal = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.3])  # far from the target: rejections are common
    tokens, accepted, _ = first_token_distribution(target, proposal, draft_kind, samples, seed=21)
    counts = torch.bincount(tokens, minlength=5).double()
    expected = target.double() * samples
    assert chi2_sf(float(((counts - expected) ** 2 / expected).sum()), 4) > ALPHA
    rate = torch.minimum(target, proposal).sum() if draft_kind == "sampled" else target[int(draft_kind)]
    z = (accepted.double().mean() - rate) / (rate * (1 - rate) / samples) ** 0.5
    assert abs(float(z)) < 4.0  # two-sided normal tail 6e-5


def test_opcheck():
    case, _ = random_case(random.Random(5), "cpu")
    torch.library.opcheck(torch.ops.jacobi_engine.sample_verify_and_commit.default, op_args(case))


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda c: c.update(probs=c["probs"].double()), TypeError, "probs"),
        (lambda c: c.update(proposal=c["proposal"][:, :, :-1].contiguous()), ValueError, "proposal"),
        (lambda c: c.update(draft_sampled=c["draft_sampled"].int()), TypeError, "draft_sampled"),
        (lambda c: c.update(n_fixed=c["n_fixed"].long()), TypeError, "n_fixed"),
        (lambda c: c.update(seed=torch.tensor([1, 2])), ValueError, "seed"),
        (lambda c: c.update(sequence_ids=c["sequence_ids"][:0]), ValueError, "sequence_ids"),
    ],
)
def test_bad_arguments(change, error, name):
    case, _ = random_case(random.Random(6), "cpu")
    change(case)
    with pytest.raises(error, match=name):
        call(case)
