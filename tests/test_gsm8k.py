"""GSM8K helpers and the repo's data splits (jacobi_engine.gsm8k)."""

import gzip
import importlib.util
from pathlib import Path

import pytest

from jacobi_engine import gsm8k

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SOURCE = REPO_ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("####1000", "1000"),
        ("#### 5.", "5"),
        ("#### -3", "-3"),
        ("#### 3.50", "3.5"),
        ("#### 4.0", "4"),
        ("#### 0.25", "0.25"),
        ("#### .5", ".5"),
        ("#### $18", "18"),
        ("#### 1 000 000", "1000000"),
        ("#### 72 clips\nmore text", "72"),
        ("#### 72\n#### 5", "72"),  # the first marker is the model's commitment
        ("#### 0", "0"),
        ("#### 10\n", "10"),
    ],
)
def test_extract_final_answer(text, expected):
    assert gsm8k.extract_final_answer(text) == expected


@pytest.mark.parametrize("text", ["", "no marker 42", "####", "#### ", "#### abc", "#### -", "#### .", "#### \n42"])
def test_extract_final_answer_none(text):
    assert gsm8k.extract_final_answer(text) is None


def test_prompt_format():
    assert gsm8k.PROMPT_FORMAT == "Question:\n{q}\nAnswer:\n"
    assert gsm8k.format_prompt("What is 2+2?") == "Question:\nWhat is 2+2?\nAnswer:\n"
    # Braces in a question are text, not format fields.
    assert gsm8k.format_prompt("Is {x} a set?") == "Question:\nIs {x} a set?\nAnswer:\n"


def test_splits_sizes_and_disjoint():
    train = gsm8k.load_jsonl_gz(gsm8k.repo_data_path("train"))
    held_out = gsm8k.load_jsonl_gz(gsm8k.repo_data_path("eval"))
    assert (len(train), len(held_out)) == (6973, 500)
    for record in train[:50] + held_out:
        assert set(record) == {"question", "answer"}
        assert gsm8k.extract_final_answer(record["answer"]) is not None
    assert not {r["question"] for r in train} & {r["question"] for r in held_out}


def test_repo_data_path_errors(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="split"):
        gsm8k.repo_data_path("test")
    # An installed (non-checkout) package has no data/ two directories up.
    monkeypatch.setattr(gsm8k, "__file__", str(tmp_path / "site-packages" / "jacobi_engine" / "gsm8k.py"))
    with pytest.raises(FileNotFoundError, match="checkout"):
        gsm8k.repo_data_path("train")


@pytest.mark.skipif(not SHARED_SOURCE.is_file(), reason="needs ../shared/data/gsm8k/train.jsonl")
def test_prepare_script_reproduces_repo_files(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "prepare_gsm8k", REPO_ROOT / "python" / "examples" / "prepare_gsm8k.py"
    )
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    lines = prepare.read_lines(SHARED_SOURCE)
    for split, part in (("train", lines[: -prepare.EVAL_SIZE]), ("eval", lines[-prepare.EVAL_SIZE :])):
        path = tmp_path / f"{split}.jsonl.gz"
        prepare.write_gzip(path, part)
        assert path.read_bytes() == gsm8k.repo_data_path(split).read_bytes()
        with gzip.open(path) as stream:
            assert stream.read(1)  # a valid gzip stream
