"""The training modules import one way: recipe -> packing -> trainer -> losses (no cycle, not even a lazy one)."""

import ast
from pathlib import Path

import jacobi_engine.training

TRAINING = Path(jacobi_engine.training.__file__).parent
# Module -> the training modules it must never import, at the top or inside a function.
FORBIDDEN = {
    "losses": {"trainer", "packing", "recipe"},
    "trainer": {"packing", "recipe"},
    "packing": {"recipe"},
}


def _training_imports(module: str) -> set[str]:
    tree = ast.parse((TRAINING / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    prefix = "jacobi_engine.training."
    return {name[len(prefix) :].split(".")[0] for name in names if name.startswith(prefix)}


def test_imports_run_one_way():
    for module, forbidden in FORBIDDEN.items():
        assert not _training_imports(module) & forbidden, module
    assert {"packing", "trainer"} <= _training_imports("recipe")
    assert "trainer" in _training_imports("packing")


def test_public_names_stay_importable():
    from jacobi_engine.training import recipe, train_consistency

    assert train_consistency is recipe.train_consistency
    for name in ("default_learning_rate", "LR_ANCHORS", "load_ar_corpus", "save_final_model"):
        assert hasattr(recipe, name), name
