"""The layering rule, enforced: core library modules never import the sidecar, and the plugin stays glue.

`adaspec.core` is what both servers and the benchmarks share; the sidecar is a separate process that may use
core, never the reverse. Only the composition roots -- the CLI, which offers the sidecar's own commands, and
the drift runner, which starts a sidecar (in process or as a child) -- may import `adaspec.sidecar`. Imports
are read from the source (AST), function-level imports included, so a lazy import cannot slip through.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The only core modules allowed to import adaspec.sidecar (they assemble processes, they are not library).
COMPOSITION_ROOTS = {"core/cli.py", "core/drift/runner.py"}
#: Policy hooks are declared on PolicyBase; nobody probes a policy for them.
HOOKS = {"peek", "peek_k", "peeked", "trim", "finish", "set_available", "lam"}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_core_never_imports_the_sidecar_outside_the_composition_roots():
    leaks = [f"{p.relative_to(ROOT)}:{line}: {mod}" for p in _sources("core") for line, mod in _imports(p)
             if (mod == "adaspec.sidecar" or mod.startswith("adaspec.sidecar."))
             and str(p.relative_to(ROOT)) not in COMPOSITION_ROOTS]
    assert not leaks, "core imports the sidecar:\n" + "\n".join(leaks)


def test_core_and_the_plugin_import_no_sglang_at_module_level_and_kernels_need_no_core():
    for p in _sources("core"):
        assert not [m for _, m in _imports(p) if m == "sglang" or m.startswith("sglang.")], p
    for p in _sources("kernels"):
        assert not [m for _, m in _imports(p) if m.startswith("adaspec.core")], p


def _probes(path: Path) -> list[tuple[int, str]]:
    """getattr/hasattr calls naming a policy hook."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in HOOKS):
            out.append((node.lineno, node.args[1].value))
    return out


@pytest.mark.parametrize("folder", ["core", "sglang_ext"])
def test_no_policy_hook_is_probed(folder):
    probes = [f"{p.relative_to(ROOT)}:{line}: {hook}" for p in _sources(folder) for line, hook in _probes(p)]
    assert not probes, "probe for a declared hook:\n" + "\n".join(probes)


def test_the_scan_sees_a_leak(tmp_path):
    """Negative control: the scanners find a function-level sidecar import and a hook probe."""
    leak = tmp_path / "leak.py"
    leak.write_text("def f():\n    from adaspec.sidecar.base import x\n    return getattr(p, 'trim', None)\n")
    assert (2, "adaspec.sidecar.base") in _imports(leak)
    assert _probes(leak) == [(3, "trim")]


#: The top-level folders pyproject.toml maps into the `adaspec` namespace.
MAPPED_FOLDERS = ("core", "sglang_ext", "sidecar", "kernels")


def test_no_top_level_folder_shadows_an_installed_distribution():
    """`python -m ...` from the repo root puts the root on sys.path, where a folder with an __init__.py is a
    regular top-level package and wins over a site-packages one of the same name (how `kernels/` broke
    transformers 5.25, which imports Hugging Face's `kernels`). A namespace portion (no __init__.py) never does."""
    installed = importlib.metadata.packages_distributions()
    shadows = [f"{folder}/ shadows {installed[folder]}" for folder in MAPPED_FOLDERS
               if (ROOT / folder / "__init__.py").exists() and folder in installed]
    assert not shadows, shadows


def test_transformers_imports_with_the_repo_root_on_sys_path():
    code = "import transformers; from transformers import AttentionInterface, PreTrainedModel"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
