"""The import layering docs/ARCHITECTURE.md states, checked on the source: `app -> engines ->
kdas_core`, nothing imports upwards (not even inside a function), and kdas_core's library
subpackages never import the command modules at its top level."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kdas_core", "engines", "app"]  # each may import only those before it
VERBS = {"train", "distill", "evaluate", "ablate", "teacher_targets", "bench_train", "time_to_accuracy", "profile"}


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module name `path` imports, relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
    return names


def _sources(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_nothing_imports_a_higher_layer():
    bad = []
    for i, layer in enumerate(LAYERS):
        higher = LAYERS[i + 1:]
        for path in _sources(layer):
            for name in _imports(path):
                if name.split(".")[0] in higher:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_library_subpackages_never_import_a_command():
    bad = []
    for path in _sources("kdas_core"):
        if len(path.relative_to(ROOT / "kdas_core").parts) == 1:
            continue  # the top level holds the commands; they may use each other's parsers
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "kdas_core" and len(parts) > 1 and parts[1] in VERBS:
                bad.append(f"{path.relative_to(ROOT)} imports the command module {name}")
    assert not bad, "\n".join(bad)


def test_kdas_core_top_level_holds_only_the_commands():
    top = {p.stem for p in (ROOT / "kdas_core").glob("*.py")} - {"__init__", "__main__"}
    assert top == VERBS, f"library modules belong in a subpackage: {sorted(top - VERBS)}; missing: {sorted(VERBS - top)}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The rule covers deferred imports too: a function-level `from engines import x` counts, and
    relative imports are resolved."""
    pkg = tmp_path / "kdas_core" / "sub"
    pkg.mkdir(parents=True)
    f = pkg / "m.py"
    f.write_text("def g():\n    from engines import load_backend\n    from ..train import main\n")
    assert {"engines.load_backend", "kdas_core.train.main"} <= _imports(f, tmp_path)


def test_bundled_asset_paths_point_at_the_repository():
    from kdas_core.io.assets import ASSETS_DIR, DEFAULT_TEACHER, DEFAULT_WEIGHTS, DEMO_CLIP

    assert ASSETS_DIR == ROOT / "assets"
    for path in (DEFAULT_WEIGHTS, DEFAULT_TEACHER, DEMO_CLIP):
        assert path.is_file(), path


def test_console_scripts_start_without_torch():
    """`kdas-evaluate --help` must answer as fast as `python -m kdas_core.evaluate --help`: the
    console scripts' `from MODULE import main` loads nothing heavy."""
    import subprocess
    import sys
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    code = "; ".join(f"from {target.split(':')[0]} import {target.split(':')[1]}" for target in scripts.values())
    out = subprocess.run([sys.executable, "-c", code + "; import sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", f"a console script imports torch before parsing: {sorted(scripts)}"
