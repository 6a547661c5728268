"""The `--kd` methods by name with their one-line summaries, read without importing torch (the
training CLIs' --help lists them at once). Each method's name and summary live on its class in
`kdas_core/losses/methods/<module>.py`, next to its hyperparameters; this module reads them from
the source (the class attributes `name` and `summary` of every `@register`ed class), so there is
no second list to keep in step."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

NONE_SUMMARY = "no distillation: the student learns from the masks alone"
METHODS_DIR = Path(__file__).resolve().parent / "methods"


def _registered(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "register" for d in node.decorator_list):
            attrs = {}
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                    try:
                        attrs[stmt.targets[0].id] = ast.literal_eval(stmt.value)
                    except ValueError:
                        pass
            yield attrs.get("name"), attrs.get("summary")


@lru_cache(maxsize=None)
def kd_methods() -> dict[str, str]:
    """name -> summary for `none` and every registered method, sorted by name after `none`."""
    found = {}
    for path in sorted(METHODS_DIR.glob("*.py")):
        for name, summary in _registered(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if name:
                found[name] = summary or ""
    return {"none": NONE_SUMMARY, **dict(sorted(found.items()))}
