"""The house's shape: layers that import only downwards (import-linter's contract in pyproject.toml),
no import cycles anywhere, inference that never loads the training stack, a light `import chatforge`."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "chatforge"
LINT = shutil.which("lint-imports")


def _python(code: str) -> str:
    """Run `code` in a fresh interpreter (so sys.modules starts empty) and return what it printed."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}  # before site-packages: the copy, not the install
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(LINT is None, reason="lint-imports is not installed (pip install -e '.[dev]')")
def test_the_layer_contract_holds_and_a_broken_layer_fails_it(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(SRC, copy / "src" / "chatforge", ignore=shutil.ignore_patterns("__pycache__", "demo"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    kept = _lint(copy)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "0 broken" in kept.stdout

    # the engine reaching up into training, as `pipeline("conversational")` once did through tasks.py
    target = copy / "src" / "chatforge" / "engine" / "kv_cache.py"
    target.write_text(target.read_text() + "\nfrom chatforge.train.trainer import Trainer  # noqa\n")
    broken = _lint(copy)
    assert broken.returncode != 0
    assert "chatforge.engine is not allowed to import chatforge.train" in broken.stdout
    assert "Inference never imports training BROKEN" in broken.stdout


def _import_graph() -> dict[str, set[str]]:
    """chatforge module -> the chatforge modules it imports, at module level or inside functions."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name_of(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("chatforge"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("chatforge"))
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
        # the root package re-exports lazily; what imports it asks for __version__ only
        graph[module] = {d for d in deps if d in files and d not in (module, "chatforge")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles_at_all():
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_conversational_pipeline_loads_nothing_from_training():
    out = _python("import sys\n"
                  "from chatforge import pipeline\n"
                  "chat = pipeline('conversational', max_new_tokens=4, temperature=0)\n"
                  "print(chat('Hello').messages[-1]['role'])\n"
                  "print(sorted(m for m in sys.modules if m.startswith('chatforge.train')))")
    assert out.splitlines() == ["assistant", "[]"]


def test_import_chatforge_and_help_do_not_load_torch():
    out = _python("import sys, contextlib, io\n"
                  "import chatforge\n"
                  "print('torch' in sys.modules)\n"
                  "from chatforge.cli import build_parser\n"
                  "with contextlib.redirect_stdout(io.StringIO()):\n"
                  "    text = build_parser().format_help()\n"
                  "print('torch' in sys.modules, 'serve' in text)")
    assert out.splitlines() == ["False", "False True"]
