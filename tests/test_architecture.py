"""Imports run one way: core <- convert <- api <- train <- commands (ARCHITECTURE.md).

The layer of every module is the package map table in ARCHITECTURE.md (one place; this test reads it).
Every module's imports are parsed with `ast`, at the top and inside functions alike, so a deferred
import cannot hide an arrow that runs the wrong way. Every module also keeps its project imports at
the top, and imports the optional dependencies (torch, transformers, TensorFlow, flashlight, ...) only
inside functions, so that `import flax_d2v` and `d2v` work without them (ARCHITECTURE.md, "Deferred imports").
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "convert", "api", "train", "commands")
# The installed package name of each source directory (convert/ and train/ install inside flax_d2v).
PACKAGES = {
    "flax_d2v": "flax_d2v",
    "flax_d2v/api": "flax_d2v.api",
    "flax_d2v/commands": "flax_d2v.commands",
    "convert": "flax_d2v.convert",
    "train": "flax_d2v.train",
}
# One folder per layer (ARCHITECTURE.md, "One folder per layer"); the two entry files Python needs at
# the package's top are the named exceptions.
FOLDER_LAYER = {
    "flax_d2v": "core",
    "convert": "convert",
    "flax_d2v/api": "api",
    "train": "train",
    "flax_d2v/commands": "commands",
}
ENTRY_FILES = {"flax_d2v/__init__.py": "api", "flax_d2v/cli.py": "commands"}
# Optional third-party dependencies (the extras in pyproject.toml): never imported at the top of a
# module, so the package imports without them.
OPTIONAL = {
    "torch",
    "transformers",
    "tensorflow",
    "tensorflow_datasets",
    "flashlight",
    "huggingface_hub",
    "fairseq",
    "datasets",  # the [hf] extra, with pyarrow
    "pyarrow",
}
# Project modules that need an optional dependency at their top: imported only inside functions.
OPTIONAL_ONLY = {"flax_d2v.convert.fairseq2_reference"}  # imports torch
# The deliberate function-level project imports: (importer, imported). Nothing else is deferred.
DEFERRED = {("flax_d2v.api.verify2", "flax_d2v.convert.fairseq2_reference")}


def _modules() -> dict[str, Path]:
    """Dotted name -> source file, for every module of the package (symlinked sub-packages once)."""
    out = {}
    for directory, package in PACKAGES.items():
        for path in sorted((ROOT / directory).glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


MODULES = _modules()


def _table() -> list[tuple[str, str]]:
    """(layer, path or glob) rows of the package map in ARCHITECTURE.md, in order."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## Package map", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*(\w+)\s*\|\s*`([^`]+)`\s*\|", section, flags=re.M)
    assert rows, "ARCHITECTURE.md: no package map table"
    for layer, where in rows:
        assert layer in LAYERS, f"ARCHITECTURE.md: {where}: unknown layer {layer!r} (one of {LAYERS})"
    return rows


def _layer_of(rows: list[tuple[str, str]], path: Path) -> str | None:
    rel = path.relative_to(ROOT).as_posix()
    exact = [layer for layer, where in rows if where == rel]
    if exact:
        return exact[0]
    globbed = [layer for layer, where in rows if "*" in where and fnmatch.fnmatch(rel, where)]
    return globbed[0] if globbed else None


def _layers() -> dict[str, str]:
    rows = _table()
    return {name: _layer_of(rows, path) for name, path in MODULES.items()}


def _resolve(name: str) -> str | None:
    """The project module an imported dotted name refers to (its longest prefix that is a module)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return None


def _walk(node: ast.AST, in_function: bool):
    """Every node below `node`, with whether it sits inside a function (runs at call time, not import)."""
    for child in ast.iter_child_nodes(node):
        yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported project module or top-level third-party package, line, at module level) of `module`."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].stem == "__init__" else module.rsplit(".", 1)[0]
    out = []
    for node, in_function in _walk(tree, False):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package p is `from p import x`
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from flax_d2v.convert import fairseq` imports the submodule; `from flax_d2v import x` the facade
            names = [
                f"{base}.{a.name}" if _resolve(f"{base}.{a.name}") == f"{base}.{a.name}" else base for a in node.names
            ]
        for name in names:
            target = _resolve(name) if name.split(".")[0] == "flax_d2v" else name.split(".")[0]
            if target is not None and (target, node.lineno, not in_function) not in out:
                out.append((target, node.lineno, not in_function))
    return out


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT).as_posix()}:{line}"


def test_every_module_has_a_layer_and_every_row_a_module():
    rows = _table()
    missing = [MODULES[m].relative_to(ROOT).as_posix() for m, layer in _layers().items() if layer is None]
    assert not missing, f"modules missing from ARCHITECTURE.md's package map: {missing}"
    files = [p.relative_to(ROOT).as_posix() for p in MODULES.values()]
    stale = [where for _, where in rows if not any(fnmatch.fnmatch(f, where) for f in files)]
    assert not stale, f"ARCHITECTURE.md's package map names modules that do not exist: {stale}"


def test_each_folder_holds_one_layer():
    """The folder a module lives in names its layer: no api module in flax_d2v/ or convert/, ..."""
    wrong = []
    for name, layer in _layers().items():
        rel = MODULES[name].relative_to(ROOT)
        expected = ENTRY_FILES.get(rel.as_posix(), FOLDER_LAYER[rel.parent.as_posix()])
        if layer != expected:
            wrong.append(f"{rel.as_posix()}: layer {layer} in ARCHITECTURE.md, but its folder holds {expected}")
    assert not wrong, "modules whose folder is not their layer's:\n" + "\n".join(wrong)


def test_folders_import_one_way():
    """Counted by folder (the entry files aside), imports run one way: no two folders import each other."""
    rank = {folder: LAYERS.index(layer) for folder, layer in FOLDER_LAYER.items()}
    wrong = []
    for m, path in MODULES.items():
        rel = path.relative_to(ROOT)
        if rel.as_posix() in ENTRY_FILES:
            continue
        for target, line, _ in _imports(m):
            if not target.startswith("flax_d2v") or target not in MODULES:
                continue
            trel = MODULES[target].relative_to(ROOT)
            if trel.as_posix() in ENTRY_FILES and trel.as_posix() != "flax_d2v/__init__.py":
                continue
            # the facade counts as the api folder
            tfolder = "flax_d2v/api" if trel.as_posix() == "flax_d2v/__init__.py" else trel.parent.as_posix()
            if rank[tfolder] > rank[rel.parent.as_posix()]:
                wrong.append(f"{_where(m, line)}: {rel.parent.as_posix()}/ imports {tfolder}/ ({target})")
    assert not wrong, "folders that import a folder of a later layer:\n" + "\n".join(wrong)


def test_imports_run_one_way():
    layers = _layers()
    rank = {name: LAYERS.index(layer) for name, layer in layers.items() if layer is not None}
    wrong = [
        f"{_where(m, line)}: {layers[m]} module {m} imports {target} ({layers[target]})"
        for m in MODULES
        if m in rank
        for target, line, _ in _imports(m)
        if target in rank and rank[target] > rank[m]
    ]
    assert not wrong, "imports that run against the layers (ARCHITECTURE.md):\n" + "\n".join(wrong)


@pytest.mark.parametrize("layer", LAYERS)
def test_project_imports_at_the_top_and_optional_dependencies_deferred(layer):
    wrong = []
    for m, module_layer in _layers().items():
        if module_layer != layer:
            continue
        for target, line, at_top in _imports(m):
            if target.startswith("flax_d2v"):
                if at_top and target in OPTIONAL_ONLY:
                    wrong.append(f"{_where(m, line)}: {target} needs an optional dependency; import it in a function")
                elif not at_top and target not in OPTIONAL_ONLY and (m, target) not in DEFERRED:
                    wrong.append(f"{_where(m, line)}: {target} imported inside a function; move it to the top")
            elif at_top and target in OPTIONAL and m not in OPTIONAL_ONLY:
                wrong.append(f"{_where(m, line)}: optional dependency {target} imported at module level")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_wrong_way_import(tmp_path, monkeypatch):
    """The parser finds function-level imports and `from package import submodule` forms."""
    src = tmp_path / "core_mod.py"
    src.write_text(
        "import numpy as np\n"
        "from flax_d2v.convert import keys\n"
        "def f():\n"
        "    from flax_d2v.train.vocab import build_vocab\n"
        "    import torch\n"
    )
    monkeypatch.setitem(MODULES, "flax_d2v.core_mod", src)
    found = {(t, at_top) for t, _, at_top in _imports("flax_d2v.core_mod")}
    assert found == {
        ("numpy", True),
        ("flax_d2v.convert.keys", True),
        ("flax_d2v.train.vocab", False),
        ("torch", False),
    }


def test_old_api_module_paths_still_import():
    """Users' imports from before the api layer had its folder keep working, and name the moved modules."""
    import importlib

    import flax_d2v

    for old, module in flax_d2v.MOVED_MODULES.items():
        assert importlib.import_module(old) is module, old
        assert module.__name__.startswith("flax_d2v.api."), module.__name__
    assert callable(flax_d2v.transcribe) and callable(flax_d2v.classify)  # the functions, not the modules
    from flax_d2v.transcribe import Transcriber  # noqa: F401  (the module through its old path)

    assert callable(flax_d2v.transcribe)


def test_no_module_imports_an_old_api_path():
    """Inside the project the moved modules are imported by their new paths, so the layer check sees them."""
    import flax_d2v

    wrong = [
        f"{_where(m, node.lineno)}: {name}"
        for m, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
        + ([f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else [])
        if name in flax_d2v.MOVED_MODULES
    ]
    assert not wrong, "imports of an api module by its old path:\n" + "\n".join(wrong)
