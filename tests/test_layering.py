"""The library stays independent of orchestration: nothing under seqmodels/ imports Prefect or
MLflow, not even lazily inside a function. Those belong in tasks/ and flows/."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {"prefect", "mlflow"}


def _imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def forbidden_imports(path: Path, root: Path) -> list[str]:
    """'file:line imports module' for every Prefect or MLflow import anywhere in `path`
    (module level, functions, classes, try blocks), the file named relative to `root`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        for module in _imported_modules(node):
            if module.split(".")[0] in FORBIDDEN:
                found.append(f"{path.relative_to(root)}:{node.lineno} imports {module}")
    return sorted(found)


def test_the_check_finds_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os\nimport mlflowish\n\n"
        "def f():\n    from mlflow import MlflowClient\n    import prefect.tasks as t\n",
        encoding="utf-8",
    )
    assert forbidden_imports(probe, tmp_path) == [
        "probe.py:5 imports mlflow",
        "probe.py:6 imports prefect.tasks",
    ]


def test_seqmodels_never_imports_prefect_or_mlflow():
    files = sorted((REPO / "seqmodels").rglob("*.py"))
    assert REPO / "seqmodels" / "evaluation" / "promotion.py" in files
    offending = [hit for path in files for hit in forbidden_imports(path, REPO)]
    assert not offending, "seqmodels must not import prefect or mlflow:\n" + "\n".join(offending)
