"""Trajectory collection: dataset layout, Jacobi-consistency of the recorded states, greedy
equality of the fixed points, degenerate filtering, resume after a kill, augmentation, CLI."""

import json
import random
import re

import pytest
import torch
from models import tiny_model

from jacobi_engine import cli
from jacobi_engine.training import collect as collect_module
from jacobi_engine.training import toy
from jacobi_engine.training.collect import augment_states, chunk_rows, collect_trajectories, longest_run
from jacobi_engine.trajectory import JacobiStep, SequenceTrajectory

BLOCK = 4
MAX_NEW = 14  # not a multiple of BLOCK: the last chunk of each sequence is cut short
COLUMNS = {"prompt_index", "chunk_index", "prompt_length", "prompt_ids", "states", "fixed_point", "label_ids"}


@pytest.fixture(scope="module")
def tokenizer():
    return toy.train_tokenizer(128)


@pytest.fixture(scope="module")
def prompts():
    return toy.stdlib_prompts(6, min_chars=20, max_chars=40)


def _model(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer))


def _rows_by_prompt(dataset):
    grouped = {}
    for row in dataset:
        grouped.setdefault(row["prompt_index"], []).append(row)
    return grouped


def _collect(model, tokenizer, prompts, out_dir, **kwargs):
    options = dict(block_size=BLOCK, max_new_tokens=MAX_NEW, batch_size=4, progress=False)
    options.update(kwargs)
    return collect_trajectories(model, tokenizer, prompts, out_dir, **options)


@pytest.mark.parametrize("max_new_tokens", [MAX_NEW, 13])  # 13: the last token is a chunk of its own
def test_dataset_layout_and_states(tmp_path, tokenizer, prompts, max_new_tokens):
    model = _model(tokenizer)
    dataset = _collect(model, tokenizer, prompts, tmp_path / "data", eos_token_id=[], max_new_tokens=max_new_tokens)
    assert set(dataset.column_names) == COLUMNS
    grouped = _rows_by_prompt(dataset)
    assert sorted(grouped) == list(range(len(prompts)))
    for index, rows in grouped.items():
        prompt_ids = tokenizer(prompts[index])["input_ids"]
        assert [row["chunk_index"] for row in rows] == list(range(len(rows)))
        generated = []
        for row in rows:
            assert row["prompt_length"] == len(prompt_ids)
            assert row["prompt_ids"] == prompt_ids + generated  # prompt + previously converged chunks
            assert row["label_ids"] == []
            fixed_point = row["fixed_point"]
            expected_size = min(BLOCK, max_new_tokens - len(generated))
            assert len(fixed_point) == expected_size
            assert row["states"][-1] == fixed_point
            for state in row["states"]:
                assert len(state) == expected_size
                assert state[0] == fixed_point[0]  # slot 0 is always the known-correct token
            generated += fixed_point
        assert len(generated) == max_new_tokens


def test_states_are_a_jacobi_trajectory(tmp_path, tokenizer, prompts):
    """Each state's slots 1.. are the model's argmax on the previous state (the Jacobi update),
    checked with a plain full forward, independent of the engine's cache and attention."""
    model = _model(tokenizer)
    dataset = _collect(model, tokenizer, prompts, tmp_path / "data", eos_token_id=[])
    transitions = 0
    for row in dataset:
        context = row["prompt_ids"]
        for state, next_state in zip(row["states"], row["states"][1:]):
            with torch.no_grad():
                logits = model(torch.tensor([context + state])).logits[0, len(context) :]
            predicted = logits.argmax(dim=-1).tolist()
            assert next_state[1:] == predicted[: len(state) - 1]
            transitions += 1
    assert transitions > len(dataset)  # most chunks took several iterations


def _greedy(model, tokenizer, prompt, eos_token_id):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    output = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos_token_id, pad_token_id=0)
    return output[0, ids.shape[1] :].tolist()


def test_fixed_points_equal_greedy_output(tmp_path, tokenizer, prompts):
    model = _model(tokenizer)
    # Make the 7th token of prompt 0's answer the EOS, so at least one sequence ends inside a chunk.
    eos = _greedy(model, tokenizer, prompts[0], eos_token_id=2)[6]
    dataset = _collect(model, tokenizer, prompts, tmp_path / "data", batch_size=3, eos_token_id=eos)
    grouped = _rows_by_prompt(dataset)
    ended_inside_a_chunk = 0
    for index, prompt in enumerate(prompts):
        expected = _greedy(model, tokenizer, prompt, eos_token_id=eos)
        collected = [token for row in grouped.get(index, []) for token in row["fixed_point"]]
        assert collected == expected, f"prompt {index}"
        if len(expected) < MAX_NEW and len(expected) % BLOCK > 1:
            ended_inside_a_chunk += 1
            last = grouped[index][-1]
            assert last["fixed_point"][-1] == eos and last["states"][-1] == last["fixed_point"]
    assert ended_inside_a_chunk >= 1


def test_longest_run():
    assert longest_run([]) == 0
    assert longest_run([1, 2, 3]) == 1
    assert longest_run([1, 1, 2, 2, 2, 1]) == 3


def _synthetic_trajectory(tokens, n):
    steps = [JacobiStep(start, [tokens[start]] + [0] * (n - 1), 1) for start in range(0, len(tokens) - 1, n)]
    return SequenceTrajectory(prompt_length=3, tokens=tokens, steps=steps)


@pytest.mark.parametrize("run, kept", [(9, 4), (10, 3)])
def test_degenerate_chunks_are_dropped(run, kept):
    # Chunks of 4 over 16 tokens; a run of `run` 7s starting at token 5 ends in chunk 3 (12..15).
    tokens = [10, 11, 12, 13, 14] + [7] * run + [20, 21, 22, 23][: 16 - 5 - run]
    tokens = tokens[:16]
    rows, dropped = chunk_rows(_synthetic_trajectory(tokens, 4), 0, [1, 2, 3], [])
    assert [row["chunk_index"] for row in rows] == list(range(kept))
    assert dropped == 4 - kept


def test_degenerate_model_output_is_filtered(tmp_path, tokenizer, prompts):
    model = _model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit equal: greedy repeats token 0 forever
    dataset = _collect(model, tokenizer, prompts, tmp_path / "data", eos_token_id=[], max_new_tokens=16)
    # Chunks end at tokens 4, 8, 12, 16: from the third on the output holds 10+ equal tokens.
    assert sorted(set(dataset["chunk_index"])) == [0, 1]
    assert len(dataset) == 2 * len(prompts)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert sum(batch["dropped"] for batch in manifest["batches"].values()) == 2 * len(prompts)


def test_collection_where_every_chunk_is_degenerate_says_so(tmp_path, tokenizer, prompts):
    model = _model(tokenizer)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # greedy repeats token 0: with max_repeat=2 every chunk is degenerate
    out_dir = tmp_path / "data"
    with pytest.raises(ValueError, match="no trajectories survived") as caught:
        _collect(model, tokenizer, prompts[:2], out_dir, eos_token_id=[], max_new_tokens=8, max_repeat=2)
    message = str(caught.value)
    assert "dropped as degenerate" in message and "max_repeat" in message
    manifest = json.loads((out_dir / "manifest.json").read_text())
    dropped = sum(batch["dropped"] for batch in manifest["batches"].values())
    assert dropped == 2 * 2  # 8 tokens in chunks of 4, two prompts
    assert f"all {dropped} chunks of the 2 prompts" in message
    assert not (out_dir / "dataset_info.json").exists()  # no empty dataset left for training to trip on


class _Killed(Exception):
    pass


def test_resume_after_kill_during_decoding(tmp_path, tokenizer, prompts, monkeypatch):
    model = _model(tokenizer)
    reference = _collect(model, tokenizer, prompts, tmp_path / "reference", eos_token_id=[], batch_size=2)

    calls = []
    original = collect_module.JacobiEngine.generate

    def dies_on_third_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise _Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(collect_module.JacobiEngine, "generate", dies_on_third_batch)
    out_dir = tmp_path / "resumed"
    with pytest.raises(_Killed):
        _collect(model, tokenizer, prompts, out_dir, eos_token_id=[], batch_size=2)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert sorted(manifest["batches"]) == ["0", "1"]

    calls.clear()
    calls.append(1)  # never die again
    resumed = _collect(model, tokenizer, prompts, out_dir, eos_token_id=[], batch_size=2)
    assert len(calls) == 2  # only the one remaining batch was decoded
    assert resumed.to_list() == reference.to_list()


def test_resume_after_kill_between_shard_and_manifest(tmp_path, tokenizer, prompts, monkeypatch):
    model = _model(tokenizer)
    reference = _collect(model, tokenizer, prompts, tmp_path / "reference", eos_token_id=[], batch_size=2)

    writes = []
    original = collect_module.write_manifest

    def dies_before_recording_batch_1(out_dir, manifest, *args, **kwargs):
        writes.append(1)
        if "1" in manifest["batches"]:
            raise _Killed  # shard 1 is on disk, the manifest does not list it
        original(out_dir, manifest, *args, **kwargs)

    monkeypatch.setattr(collect_module, "write_manifest", dies_before_recording_batch_1)
    out_dir = tmp_path / "resumed"
    with pytest.raises(_Killed):
        _collect(model, tokenizer, prompts, out_dir, eos_token_id=[], batch_size=2)
    assert (out_dir / "shards" / "batch-000001.jsonl").exists()
    (out_dir / "shards" / "batch-000002.jsonl.tmp").write_text('{"half": ')  # a torn write
    monkeypatch.setattr(collect_module, "write_manifest", original)

    resumed = _collect(model, tokenizer, prompts, out_dir, eos_token_id=[], batch_size=2)
    keys = [(row["prompt_index"], row["chunk_index"]) for row in resumed]
    assert len(keys) == len(set(keys))
    assert resumed.to_list() == reference.to_list()


def test_resume_refuses_different_settings(tmp_path, tokenizer, prompts):
    model = _model(tokenizer)
    _collect(model, tokenizer, prompts[:2], tmp_path / "data", eos_token_id=[])
    with pytest.raises(ValueError, match="block_size"):
        _collect(model, tokenizer, prompts[:2], tmp_path / "data", eos_token_id=[], block_size=BLOCK + 1)


def test_augment_states_by_hand():
    fixed_point = [10, 11, 12, 13, 14, 15]
    states = [[10, 0, 0, 0, 0, 0], [10, 11, 0, 13, 0, 0], fixed_point]
    augmented = augment_states(states, fixed_point, 0.5, random.Random(0))
    assert augmented[-1] == fixed_point
    for original, new in zip(states[:-1], augmented[:-1]):
        wrong = [slot for slot in range(6) if original[slot] != fixed_point[slot]]
        changed = [slot for slot in range(6) if new[slot] != original[slot]]
        assert new[wrong[0]] == original[wrong[0]]  # the first wrong token stays wrong
        assert set(changed) <= set(wrong[1:])
        assert all(new[slot] == fixed_point[slot] for slot in changed)
        assert len(changed) == int(len(wrong[1:]) * 0.5)
    everything = augment_states(states, fixed_point, 1.0, random.Random(0))
    assert everything[0] == [10, 0, 12, 13, 14, 15]
    assert everything[1] == [10, 11, 0, 13, 14, 15]


def test_augmented_collection(tmp_path, tokenizer, prompts):
    model = _model(tokenizer)
    plain = _collect(model, tokenizer, prompts, tmp_path / "plain", eos_token_id=[])
    augmented = _collect(model, tokenizer, prompts, tmp_path / "augmented", eos_token_id=[], augment=True)
    again = _collect(model, tokenizer, prompts, tmp_path / "again", eos_token_id=[], augment=True)
    assert augmented.to_list() == again.to_list()  # deterministic
    fixed_tokens = 0
    for before, after in zip(plain, augmented):
        assert before["fixed_point"] == after["fixed_point"]
        assert before["prompt_ids"] == after["prompt_ids"]
        assert after["states"][-1] == after["fixed_point"]
        for old, new in zip(before["states"], after["states"]):
            for slot, (a, b) in enumerate(zip(old, new)):
                if a != b:
                    assert b == after["fixed_point"][slot]
                    fixed_tokens += 1
    assert fixed_tokens > 0


def test_collect_command(tmp_path, tokenizer, prompts):
    model_dir = tmp_path / "model"
    _model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts_file = tmp_path / "prompts.jsonl"
    lines = [{"prompt": prompts[0], "answer": "return x"}, {"prompt": prompts[1]}, {"prompt": prompts[2], "label": "y"}]
    prompts_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out_dir = tmp_path / "data"
    argv = ["collect", "--model", str(model_dir), "--prompts", str(prompts_file), "--out", str(out_dir)]
    argv += ["--block-size", "4", "--max-new-tokens", "8", "--no-eos", "--batch-size", "2", "--no-progress"]
    assert cli.main(argv) == 0

    from datasets import load_from_disk

    dataset = load_from_disk(str(out_dir))
    labels = {row["prompt_index"]: row["label_ids"] for row in dataset}
    assert labels[0] == tokenizer("return x", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels[1] == []
    assert labels[2] == tokenizer("y", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(dataset) == 3 * 2  # two chunks of 4 per prompt


# -- what a resume must match: shards against the manifest, the model's weights -----------------------
def _edit_line(path, number: int, edit) -> None:
    """Apply ``edit`` to the decoded row on line ``number`` of a JSONL shard (it may also return new text)."""
    lines = path.read_text().splitlines()
    row = json.loads(lines[number - 1])
    replaced = edit(row)
    lines[number - 1] = replaced if isinstance(replaced, str) else json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


def _set(field, value):
    return lambda row, vocab: row.__setitem__(field, value)


def _set_token(field, index, value):
    def edit(row, vocab):
        tokens = row[field] if isinstance(field, str) else row[field[0]][field[1]]
        tokens[index] = value(vocab)

    return edit


def _empty_chunk(row, vocab):
    row["fixed_point"], row["states"] = [], [[]]


def _id_equal_to_vocab(row, vocab):  # in the fixed point and its last state, so nothing else is off
    row["fixed_point"][0] = row["states"][-1][0] = vocab


# Edits of line 2 of shard 0 (prompt 0, chunk 1: 4 tokens generated before it), and the field named.
EDITS = {
    "id 1e12": (_set_token("prompt_ids", 3, lambda vocab: 10**12), "prompt_ids[3]"),
    "float id": (_set_token(("states", 0), 1, lambda vocab: 1e12), "states[0][1]"),
    "id = vocab": (_id_equal_to_vocab, "fixed_point[0]"),
    "negative label": (_set("label_ids", [-1]), "label_ids[0]"),
    "no states": (_set("states", []), "states"),
    "short state": (lambda row, vocab: row["states"][0].pop(), "states[0]"),
    "negative prompt length": (_set("prompt_length", -3), "prompt_length"),
    "prompt length past prompt": (
        lambda row, vocab: row.update(prompt_length=len(row["prompt_ids"]) + 1),
        "prompt_length",
    ),
    "bool prompt length": (_set("prompt_length", True), "prompt_length"),
    "fixed point not last state": (
        lambda row, vocab: row["fixed_point"].append(row["fixed_point"].pop() ^ 1),
        "fixed_point",
    ),
    "empty chunk": (_empty_chunk, "fixed_point"),
    "prompt of another batch": (_set("prompt_index", 5), "prompt_index"),
    "negative chunk": (_set("chunk_index", -1), "chunk_index"),
    "chunk past its context": (_set("chunk_index", 9), "chunk_index"),
    "past max_new_tokens": (lambda row, vocab: row["prompt_ids"].extend([5] * MAX_NEW), "prompt_ids"),
    "missing field": (lambda row, vocab: row.pop("label_ids"), "label_ids"),
    "not JSON": (lambda row, vocab: '{"prompt_index": 0,', None),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edited_shard_is_refused_naming_file_line_and_field(tmp_path, tokenizer, prompts, name):
    out_dir = tmp_path / "data"
    dataset = _collect(_model(tokenizer), tokenizer, prompts, out_dir, eos_token_id=[])  # batches of 4 prompts
    vocab = len(tokenizer)  # the model's embedding rows
    shard = out_dir / "shards" / "batch-000000.jsonl"
    assert json.loads(shard.read_text().splitlines()[1]) == dataset[1]  # the row edited below is valid
    edit, field = EDITS[name]
    _edit_line(shard, 2, lambda row: edit(row, vocab))
    expected = r"batch-000000\.jsonl:2: " + (f"field '{re.escape(field)}'" if field else "not valid JSON")
    with pytest.raises(ValueError, match=expected):
        collect_module.assemble_dataset(out_dir)


def test_shard_with_other_sample_count_is_refused(tmp_path, tokenizer, prompts):
    out_dir = tmp_path / "data"
    _collect(_model(tokenizer), tokenizer, prompts, out_dir, eos_token_id=[])
    shard = out_dir / "shards" / "batch-000001.jsonl"
    recorded = len(shard.read_text().splitlines())
    shard.write_text("".join(shard.read_text().splitlines(keepends=True)[1:]))  # a row lost
    with pytest.raises(
        ValueError, match=rf"batch-000001\.jsonl: holds {recorded - 1} samples, the manifest records {recorded}"
    ):
        collect_module.assemble_dataset(out_dir)
    shard.unlink()
    with pytest.raises(ValueError, match=r"batch-000001\.jsonl: the manifest lists batch 1 but its shard is missing"):
        collect_module.assemble_dataset(out_dir)


def test_resume_validates_recorded_shards_before_decoding(tmp_path, tokenizer, prompts, monkeypatch):
    model, out_dir = _model(tokenizer), tmp_path / "data"
    calls = []
    original = collect_module.JacobiEngine.generate

    def dies_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(collect_module.JacobiEngine, "generate", dies_on_second_batch)
    with pytest.raises(_Killed):
        _collect(model, tokenizer, prompts, out_dir, eos_token_id=[], batch_size=2)
    _edit_line(out_dir / "shards" / "batch-000000.jsonl", 1, lambda row: row.update(prompt_length=-3))
    calls.clear()
    with pytest.raises(ValueError, match=r"batch-000000\.jsonl:1: field 'prompt_length'"):
        _collect(model, tokenizer, prompts, out_dir, eos_token_id=[], batch_size=2)
    assert calls == []  # nothing decoded


def test_weights_sha256():
    model = tiny_model("llama", vocab_size=64)
    digest = collect_module.weights_sha256(model)
    assert len(digest) == 64 and digest == collect_module.weights_sha256(model)
    same = tiny_model("llama", vocab_size=64)
    same.load_state_dict(model.state_dict())
    assert collect_module.weights_sha256(same) == digest  # the weights, not the object
    with torch.no_grad():
        weight = same.model.layers[1].mlp.down_proj.weight
        weight[3, 5] = torch.nextafter(weight[3, 5], torch.tensor(float("inf")))  # one ulp of one weight
    assert collect_module.weights_sha256(same) != digest
    assert collect_module.weights_sha256(model.to(torch.bfloat16)) not in (digest, collect_module.weights_sha256(same))


def test_resume_refuses_a_model_with_other_weights(tmp_path, tokenizer, prompts):
    model, out_dir = _model(tokenizer), tmp_path / "data"
    _collect(model, tokenizer, prompts[:2], out_dir, eos_token_id=[])
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0  # retrained in place
    with pytest.raises(ValueError) as refused:
        _collect(model, tokenizer, prompts[:2], out_dir, eos_token_id=[])
    config = json.loads((out_dir / "manifest.json").read_text())["config"]
    assert config["vocab_size"] == len(tokenizer)
    recorded, changed = config["model_sha256"], collect_module.weights_sha256(model)
    assert re.search(rf"sha256 {recorded}.*sha256 {changed}.*new --out", str(refused.value))
    with torch.no_grad():
        model.lm_head.weight[0, 0] -= 1.0
    assert collect_module.weights_sha256(model) == recorded
    _collect(model, tokenizer, prompts[:2], out_dir, eos_token_id=[])  # the original weights resume


def test_version_1_manifest_resumes_with_a_warning(tmp_path, tokenizer, prompts, monkeypatch):
    model = _model(tokenizer)
    reference = _collect(model, tokenizer, prompts, tmp_path / "reference", eos_token_id=[], batch_size=2)
    calls = []
    original = collect_module.JacobiEngine.generate

    def dies_on_second_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Killed
        return original(self, *args, **kwargs)

    monkeypatch.setattr(collect_module.JacobiEngine, "generate", dies_on_second_batch)
    out_dir = tmp_path / "data"
    with pytest.raises(_Killed):
        _collect(model, tokenizer, prompts, out_dir, eos_token_id=[], batch_size=2)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    for key in ("vocab_size", "model_sha256"):  # as the code before weights were recorded wrote it
        manifest["config"].pop(key, None)
    manifest["config"]["version"] = 1
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    calls.append(1)  # never die again
    with pytest.warns(UserWarning, match="predate"):
        resumed = _collect(model, tokenizer, prompts, out_dir, eos_token_id=[], batch_size=2)
    assert resumed.to_list() == reference.to_list()
    config = json.loads((out_dir / "manifest.json").read_text())["config"]
    assert config["version"] == 2 and config["model_sha256"] == collect_module.weights_sha256(model)
