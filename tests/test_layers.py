"""The package's layering: arrows point down, private names stay home, and startup needs no torch.

A layer may import only from layers strictly below it, so peers (prune/ and quant/, say)
know nothing of each other and bundle/ knows nothing of pruning, training or the Hub.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import loramkit

PACKAGE = Path(loramkit.__file__).parent

# Lowest first. A new top-level module or package gets a place here.
LAYERS: list[set[str]] = [
    {"errors"},
    {"progress", "memory", "precision"},
    {"families"},
    {"bundle"},
    {"prune", "quant", "hub", "planner"},
    {"model", "recover"},
    {"train"},
    {"pipeline", "demo"},
    {"cli"},
    {"__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(path: Path) -> str:
    """The layer a file belongs to: its package, or its module name for a top-level module."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0]


def _imports(path: Path) -> list[tuple[int, list[str], list[str]]]:
    """(line, absolute module path under loramkit as parts, imported names) of each relative import."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            here = parts[:-1]  # the file's package, relative to loramkit
            base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
            module = base + (node.module.split(".") if node.module else [])
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def test_every_module_has_a_layer():
    unknown = sorted({_top(p) for p in _sources()} - set(LEVEL))
    assert not unknown, f"add {unknown} to LAYERS in tests/test_layers.py"


def test_imports_point_down():
    wrong = []
    for path in _sources():
        me = _top(path)
        for line, module, names in _imports(path):
            targets = [module[0]] if module else [n for n in names if n != "__version__"]
            for target in targets:
                if target != me and LEVEL.get(target, -1) >= LEVEL[me]:
                    wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {target} (layer {LEVEL[target]} >= {LEVEL[me]})")
    assert not wrong, "\n".join(wrong)


def test_no_private_name_crosses_a_package():
    """`from ..x import _y` and imports of private modules from another package tie packages to internals."""
    wrong = []
    for path in _sources():
        me = _top(path)
        for line, module, names in _imports(path):
            if (module[0] if module else me) == me:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in module if p.startswith("_") and not p.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {', '.join(private)} from {'.'.join(module)}")
    assert not wrong, "\n".join(wrong)


def _heavy_modules_after(code: str) -> list[str]:
    """Heavy libraries in sys.modules after running ``code`` in a fresh interpreter."""
    heavy = ("torch", "transformers", "peft", "numpy", "safetensors", "huggingface_hub")
    probe = code + f"\nimport sys\nprint('loaded:' + ','.join(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("loaded:"), done.stdout
    return [m for m in line.removeprefix("loaded:").split(",") if m]


def test_import_loramkit_loads_no_torch():
    assert _heavy_modules_after("import loramkit; loramkit.LoramError; loramkit.__version__") == []


def test_the_format_tables_load_no_torch():
    """The CLI reads the format's names and tables at startup (choices, file names)."""
    code = "import loramkit.bundle, loramkit.bundle.manifest, loramkit.bundle.quantization, loramkit.bundle.fsutil, loramkit.cli"
    assert _heavy_modules_after(code) == []


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["train", "--help"], ["publish", "--help"]])
def test_cli_help_loads_no_torch(argv):
    code = f"import contextlib, io\nfrom loramkit.cli import run\nwith contextlib.redirect_stdout(io.StringIO()):\n    assert run({argv!r}) == 0"
    assert _heavy_modules_after(code) == []


def test_lazy_names_resolve():
    """Every lazily exported name imports (so the laziness hides no broken path)."""
    for name in loramkit.__all__:
        assert getattr(loramkit, name) is not None, name


def test_the_schema_has_one_copy_and_the_spec_links_to_it():
    from loramkit.bundle.manifest import SCHEMA_PATH

    repo = PACKAGE.parent
    tops = [d for d in repo.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in ("build", "dist")]
    copies = sorted(p.relative_to(repo).as_posix() for top in tops for p in top.rglob("bundle-v*.schema.json"))
    assert copies == [SCHEMA_PATH.relative_to(repo).as_posix()]
    assert "](../loramkit/bundle/bundle-v1.schema.json)" in (repo / "specs" / "bundle-v1.md").read_text(encoding="utf-8")
