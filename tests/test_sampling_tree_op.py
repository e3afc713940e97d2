"""sample_tree_verify_and_commit (sampling with candidate branches): the compiled op against its
plain-PyTorch reference (bit for bit), against the plain block op when no branch is usable, and the
multi-candidate rule against the distribution it must reproduce (one node, exact target, chi-square)."""

from __future__ import annotations

import random

import pytest
import torch
from sampling_stats import chi2_sf
from test_graph_safety import FORBIDDEN, OpRecorder

from jacobi_engine import ops, sampling_oracle, sampling_reference

ALPHA = 1e-4


def random_tree_case(rng: random.Random):
    batch, n = rng.randint(1, 4), rng.randint(1, 6)
    chunked = n > 1 and rng.random() < 0.4
    k = rng.randint(1, 4)
    g = rng.randint(1, n - 1) if chunked else rng.randint(1, 6)
    width = max(n, g + 1)
    nodes = n + k * g
    vocab = rng.choice([2, 3, 5, 17, 300])
    generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
    logits = torch.randn((batch, nodes, vocab), generator=generator) * rng.choice([0.5, 2.0, 6.0])
    if rng.random() < 0.5:
        logits = logits.masked_fill(logits < -1, -float("inf"))
        logits[..., 0] = logits[..., 0].clamp(min=0)
    probs = logits.softmax(-1)
    likely = probs.argmax(-1)  # [B, T]
    block = torch.randint(0, vocab, (batch, n), generator=generator)
    block = torch.where(torch.rand((batch, n), generator=generator) < 0.4, likely[:, :n].roll(1, dims=1), block)
    candidates = torch.randint(0, vocab, (batch, k, g), generator=generator)
    # Branch tokens that are likely under their parent (the first under node 0, later ones under the
    # token before them) or copy the block's drafts, so acceptance, rejection and ties all happen.
    parents = torch.cat([likely[:, :1, None].expand(-1, k, 1), likely[:, n:].reshape(batch, k, g)[..., :-1]], dim=2)
    candidates = torch.where(torch.rand((batch, k, g), generator=generator) < 0.4, parents, candidates)
    copies = block[:, 1 : g + 1]
    if copies.shape[1] == g:
        candidates = torch.where(torch.rand((batch, k, 1), generator=generator) < 0.3, copies[:, None], candidates)
    limits = torch.randint(1, 20, (batch,), dtype=torch.int32, generator=generator)
    return dict(
        probs=probs,
        proposal=(torch.randn((batch, n, vocab), generator=generator) * 2).softmax(-1),
        draft_sampled=torch.rand((batch, n), generator=generator) < 0.6,
        block=block,
        candidates=candidates,
        usable=torch.rand((batch, k), generator=generator) < 0.8,
        row=torch.full((batch, width), -5),
        fill=torch.randint(0, vocab, (batch, width), generator=generator),
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
    )


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


def call(t: dict, backend: str = "auto"):
    tree = (t["probs"], t["block"], t["candidates"], t["usable"], t["row"], t["fill"])
    return ops.sample_tree_verify_and_commit(*tree, *groups(t), backend=backend)


def op_args(t: dict) -> tuple:
    """torch.ops.jacobi_engine.sample_tree_verify_and_commit's arguments, in its schema order."""
    sampling, target = groups(t)
    tree = (t["probs"], t["block"], t["candidates"], t["usable"], t["row"], t["fill"])
    return (*tree, *sampling.op_args(), *target.op_args())


def run(case, device, backend):
    tensors = {k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    n_accepted, winner = call(tensors, backend)
    state = {k: v.cpu() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    return n_accepted.cpu(), winner.cpu(), state


@pytest.mark.parametrize("chunk", range(3))
def test_native_matches_reference_bit_for_bit(chunk, device):
    rng = random.Random(300 + chunk)
    branch_wins = 0
    for _ in range(50):
        case = random_tree_case(rng)
        expected_accepted, expected_winner, expected = run(case, "cpu", "torch")
        accepted, winner, state = run(case, device, "native")
        assert torch.equal(accepted, expected_accepted)
        assert torch.equal(winner, expected_winner)
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
        branch_wins += int((expected_winner >= 0).sum())
    assert branch_wins > 5  # the branch paths were exercised, not only the block's


def run_reference(case, reference):
    tensors = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    tree = (tensors["probs"], tensors["block"], tensors["candidates"], tensors["usable"], tensors["row"])
    n_accepted, winner = reference(*tree, tensors["fill"], *groups(tensors))
    return n_accepted, winner, {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("chunk", range(3))
def test_vectorized_reference_matches_the_rowwise_statement(chunk):
    """The graph-safe torch path (backend="torch") against the plain per-row statement of the rule,
    bit for bit, on random trees (the same cases as the native op's test)."""
    rng = random.Random(500 + chunk)
    branch_wins = 0
    for _ in range(50):
        case = random_tree_case(rng)
        expected_accepted, expected_winner, expected = run_reference(
            case, sampling_oracle.sample_tree_verify_and_commit_rowwise
        )
        accepted, winner, state = run_reference(case, sampling_reference.sample_tree_verify_and_commit)
        assert accepted.dtype == expected_accepted.dtype and winner.dtype == expected_winner.dtype
        assert torch.equal(accepted, expected_accepted)
        assert torch.equal(winner, expected_winner)
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
        branch_wins += int((expected_winner >= 0).sum())
    assert branch_wins > 5


def test_vectorized_reference_is_graph_safe():
    """No host read and no data-dependent shape (what a CUDA graph cannot hold), unlike the rowwise one."""
    case = random_tree_case(random.Random(11))
    for reference, safe in (
        (sampling_reference.sample_tree_verify_and_commit, True),
        (sampling_oracle.sample_tree_verify_and_commit_rowwise, False),
    ):
        recorder = OpRecorder()
        with recorder:
            run_reference(case, reference)
        bad = set(recorder.ops) & FORBIDDEN
        assert not bad if safe else bad, (reference.__name__, sorted(bad))


@pytest.mark.parametrize("seed", range(3))
def test_without_usable_branches_it_is_the_block_op(seed):
    """No usable branch: the tree op decides and commits exactly like sample_verify_and_commit."""
    rng = random.Random(400 + seed)
    for _ in range(40):
        case = random_tree_case(rng)
        n, g = case["block"].shape[1], case["candidates"].shape[2]
        if g >= n:  # the row would be wider than the block (the plain op has no such row)
            continue
        case["usable"] = torch.zeros_like(case["usable"])
        accepted, winner, state = run(case, "cpu", "native")
        plain = {key: case[key] for key in ("proposal", "draft_sampled", "block", "cache_seqlens", "out_tokens")}
        plain.update({key: case[key] for key in ("n_generated", "done", "eos_ids", "max_new_tokens", "n_fixed")})
        plain = {key: value.clone() for key, value in plain.items()}
        plain.update(seed=case["seed"], sequence_ids=case["sequence_ids"], step=case["step"], chunked=case["chunked"])
        expected = ops.sample_verify_and_commit(
            case["probs"][:, :n].contiguous(), plain["block"], case["fill"][:, :n].contiguous(), *groups(plain)
        )
        assert torch.equal(accepted, expected)
        assert bool((winner == -1).all())
        for name in ("proposal", "draft_sampled", "block", "cache_seqlens", "out_tokens", "n_generated", "done"):
            assert torch.equal(state[name], plain[name]), name


def first_tokens(target, proposal, block_draft, branch_tokens, samples, seed):
    """Verified first new token of ``samples`` rows: node 0 has the target, the block's one draft is
    drawn from ``proposal`` (block_draft="sampled") or is that token, and every branch is one token."""
    vocab = target.numel()
    k = len(branch_tokens)
    generator = torch.Generator().manual_seed(seed)
    nodes = 2 + k
    probs = torch.full((samples, nodes, vocab), 1.0 / vocab)
    probs[:, 0] = target
    if block_draft == "sampled":
        drafts = torch.multinomial(proposal, samples, replacement=True, generator=generator)
        sampled = torch.tensor([False, True]).expand(samples, -1).contiguous()
    else:
        drafts = torch.full((samples,), int(block_draft))
        sampled = torch.zeros((samples, 2), dtype=torch.bool)
    out = torch.full((samples, 4), -1)
    sampling = ops.SamplingState(
        proposal.expand(samples, 2, -1).contiguous(),
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
    accepted, winner = ops.sample_tree_verify_and_commit(
        probs,
        torch.stack([torch.zeros(samples, dtype=torch.long), drafts], dim=1),
        torch.tensor(branch_tokens).view(1, k, 1).expand(samples, -1, -1).contiguous(),
        torch.ones((samples, k), dtype=torch.bool),
        torch.zeros((samples, 2), dtype=torch.long),
        torch.zeros((samples, 2), dtype=torch.long),
        sampling,
        target,
    )
    return out[:, 0], accepted, winner


@pytest.mark.parametrize(
    "block_draft, branch_tokens",
    [("sampled", [1, 1, 3]), ("sampled", [0, 4]), ("2", [1, 2, 4]), ("0", [0, 0])],
    ids=["sjd-duplicates", "sjd-rare", "one_hot-overlap", "one_hot-all-same"],
)
def test_multi_candidate_rule_reproduces_the_target(block_draft, branch_tokens):
    """One node with a block draft and competing branch tokens (duplicates included): the verified
    token is distributed as the target (chi-square, 60000 rows); branches win when the block's
    draft is rejected and one of them is accepted, as often as the rule says."""
    samples = 60000
    target = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    proposal = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.3])
    tokens, accepted, winner = first_tokens(target, proposal, block_draft, branch_tokens, samples, seed=33)
    counts = torch.bincount(tokens, minlength=5).double()
    expected = target.double() * samples
    assert chi2_sf(float(((counts - expected) ** 2 / expected).sum()), 4) > ALPHA
    # P(a branch wins) = P(block rejected) * P(some distinct branch token accepted from the residual).
    if block_draft == "sampled":
        residual = (target - proposal).clamp(min=0)
        rejected = 1 - torch.minimum(target, proposal).sum()
    else:
        residual = target.clone()
        residual[int(block_draft)] = 0
        rejected = 1 - target[int(block_draft)]
    residual = residual / residual.sum()
    distinct = [t for i, t in enumerate(branch_tokens) if t not in branch_tokens[:i]]
    rate = float(rejected * residual[distinct].sum())
    observed = float((winner >= 0).double().mean())
    if rate > 0:
        assert abs(observed - rate) < 4 * (rate * (1 - rate) / samples) ** 0.5
    else:
        assert observed == 0.0


def test_opcheck():
    case = random_tree_case(random.Random(8))
    torch.library.opcheck(torch.ops.jacobi_engine.sample_tree_verify_and_commit.default, op_args(case))


@pytest.mark.parametrize(
    "change, error, name",
    [
        (lambda c: c.update(probs=c["probs"][:, :-1].contiguous()), ValueError, "probs"),
        (lambda c: c.update(candidates=c["candidates"].int()), TypeError, "candidates"),
        (lambda c: c.update(usable=c["usable"][:, :0].contiguous()), ValueError, "usable"),
        (lambda c: c.update(row=c["row"][:, :-1].contiguous()), ValueError, "row"),
        (lambda c: c.update(proposal=c["proposal"].double()), TypeError, "proposal"),
    ],
)
def test_bad_arguments(change, error, name):
    case = random_tree_case(random.Random(9))
    change(case)
    with pytest.raises(error, match=name):
        call(case)


def test_too_many_branches():
    case = random_tree_case(random.Random(10))
    batch, n = case["block"].shape
    g = 1
    case.update(
        candidates=torch.zeros((batch, 33, g), dtype=torch.long),
        usable=torch.ones((batch, 33), dtype=torch.bool),
        probs=torch.full((batch, n + 33 * g, case["probs"].shape[2]), 0.5),
        row=torch.zeros((batch, max(n, g + 1)), dtype=torch.long),
        fill=torch.zeros((batch, max(n, g + 1)), dtype=torch.long),
    )
    with pytest.raises(ValueError, match="candidates"):
        call(case)
