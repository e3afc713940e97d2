"""The code domain's data: extraction of prompt/body pairs, and the committed split."""

import ast
import gzip
import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("prepare_code", REPO / "python" / "examples" / "prepare_code.py")
prepare_code = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(prepare_code)

SOURCE = '''
class Box:
    @property
    def size(self,
             scale=1):
        """How big.

        Scaled."""
        # a comment
        return 3 * scale

    def empty(self):
        """Nothing after me."""


def top():
    """Top."""
    x = 1
    return x
'''


def test_examples_of_file(tmp_path):
    path = tmp_path / "box.py"
    path.write_text(SOURCE)
    examples = prepare_code.examples_of_file(path, "pkg/box.py", 1200, 1000)
    assert [example["qualname"] for example in examples] == ["Box.size", "top"]
    size = examples[0]
    assert size["prompt"] == 'def size(self,\n         scale=1):\n    """How big.\n\n    Scaled."""\n'
    assert size["answer"] == "    # a comment\n    return 3 * scale\n"
    assert size["module"] == "pkg.box" and size["line"] == 4
    assert examples[1]["prompt"] == 'def top():\n    """Top."""\n'
    assert examples[1]["answer"] == "    x = 1\n    return x\n"
    assert [e["qualname"] for e in prepare_code.examples_of_file(path, "box.py", 1200, 25)] == ["top"]  # 23 <= 25 < 37


def test_held_out_names_take_whole_names_until_the_fraction():
    counts = {name: 10 for name in ("a", "b", "c", "d", "e")}
    held = prepare_code.held_out_names(counts, 0.25)
    assert len(held) == 2  # 10 < 12.5 (25% of 50), then 20 >= 12.5: stop
    assert held == prepare_code.held_out_names(dict(reversed(list(counts.items()))), 0.25)  # order-free


def _records(split):
    with gzip.open(REPO / "data" / "code" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_committed_split_holds_out_whole_top_level_modules():
    train, held = _records("train"), _records("eval")
    split = json.loads((REPO / "data" / "code" / "split.json").read_text())
    top = {record["file"].split("/")[0].removesuffix(".py") for record in held}
    assert top == set(split["eval_top_levels"])
    assert not top & {record["file"].split("/")[0].removesuffix(".py") for record in train}
    assert len(held) == split["examples"]["eval"] and len(train) == split["examples"]["train"]
    assert len(held) >= 0.08 * (len(held) + len(train))
    # Prompt + body is the function's source: it parses, and the body follows the docstring.
    for record in held[:200]:
        tree = ast.parse(record["prompt"] + record["answer"])
        function = tree.body[0]
        assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(function)
