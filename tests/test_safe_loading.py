"""Nothing in the repository unpickles arbitrary objects: a crafted checkpoint must not run code.

* no file anywhere in the tree (tests included) turns ``torch.load``'s ``weights_only`` off;
* no Python file calls ``pickle``/``dill``/``marshal`` loaders, ``numpy.load(allow_pickle=True)``
  or ``pandas.read_pickle``;
* the teacher script's resume state round-trips under ``weights_only=True``, and a ``state.pt``
  carrying a payload is refused without running it.
"""

import ast
import importlib.util
import os
import pickle
import re
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("train_teacher", REPO / "python" / "examples" / "train_teacher.py")
train_teacher = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(train_teacher)

# Assembled, so that this file does not match its own pattern.
UNSAFE_TORCH_LOAD = re.compile("weights_only" + r"\s*=\s*False")
UNSAFE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("dill", "load"),
    ("dill", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("pandas", "read_pickle"),
    ("pd", "read_pickle"),
}


def _repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (what a commit could hold)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [REPO / name for name in listed.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but build outputs
        skip = {".git", "build", "dist", "__pycache__", ".venv"}
        paths = [path for path in REPO.rglob("*") if not skip & set(path.relative_to(REPO).parts)]
    return [path for path in paths if path.is_file()]


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary
    return data.decode("utf-8", errors="replace")


def test_nothing_asks_torch_load_for_unsafe_unpickling():
    files = _repository_files()
    assert len(files) > 50 and REPO / "python" / "examples" / "train_teacher.py" in files
    offenders = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if UNSAFE_TORCH_LOAD.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def _unsafe_calls(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
            name = (function.value.id, function.attr)
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            if name in UNSAFE_CALLS:
                found.append((node.lineno, ".".join(name)))
            elif name[1] == "load" and name[0] == "torch" and "weights_only" in keywords:
                value = keywords["weights_only"]
                if not (isinstance(value, ast.Constant) and value.value is True):
                    found.append((node.lineno, "torch.load(weights_only=<not True>)"))
            elif name[1] == "load" and name[0] in ("np", "numpy") and "allow_pickle" in keywords:
                value = keywords["allow_pickle"]
                if not (isinstance(value, ast.Constant) and value.value is False):
                    found.append((node.lineno, "numpy.load(allow_pickle=<not False>)"))
    return found


def test_no_python_file_unpickles():
    offenders = []
    for path in _repository_files():
        if path.suffix != ".py":
            continue
        offenders += [f"{path.relative_to(REPO)}:{line}: {call}" for line, call in _unsafe_calls(path.read_text())]
    assert not offenders, "\n".join(offenders)


def test_the_checks_catch_what_they_look_for():
    assert UNSAFE_TORCH_LOAD.search("state = torch.load(path, weights_only =" + " False)")
    source = (
        "import pickle, torch, numpy as np\n"
        "pickle.loads(b'')\n"
        "torch.load('x', weights_only=flag)\n"
        "np.load('x', allow_pickle=True)\n"
        "torch.load('x', weights_only=True)\n"
        "np.load('x')\n"
    )
    assert [line for line, _ in _unsafe_calls(source)] == [2, 3, 4]


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for ``os.system``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_teacher_state_round_trips_and_a_payload_is_refused(tmp_path):
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    state = {  # what train_teacher.main saves
        "step": 7,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "curve": [{"step": 5, "loss": 2.5, "lr": 1e-3, "elapsed_s": 1.0}],
        "seconds": 12.5,
        "cpu_seconds": 20.0,
    }
    train_teacher.save_state(tmp_path, state)
    loaded = train_teacher.load_state(tmp_path)
    assert loaded["step"] == 7 and loaded["curve"] == state["curve"] and loaded["seconds"] == 12.5
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    assert all(torch.equal(loaded["model"][name], tensor) for name, tensor in state["model"].items())
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["betas"] == (0.9, 0.95)

    marker = tmp_path / "payload-ran"
    torch.save({**state, "curve": [_Payload(marker)]}, tmp_path / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        train_teacher.load_state(tmp_path)
    assert not marker.exists()
    assert os.listdir(tmp_path) == ["state.pt"]
