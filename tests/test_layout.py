"""Imports run one way through the flat root modules (issue 12): each module may import only modules earlier in
ORDER, at its top level. A function-level import of a project module (the old way around an import circle) fails,
and so does a root module missing from ORDER (a new module must be given its place)."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lowest first.
ORDER = ["routing_fns", "aux_stats", "model", "quant", "generate", "router", "moe_lora", "config", "ir", "retrieval",
         "data", "synthetic", "nli", "listwise", "unimoer", "dryrun", "runs", "extend", "evaluate", "rag", "export",
         "losses", "mtl", "train", "measures", "figures", "analysis", "grid"]
MODULES = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))


def imported_modules(node) -> list:
    """(line, top-level module name) of each import statement in node's subtree."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name.split(".")[0]) for a in n.names]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
            out.append((n.lineno, n.module.split(".")[0]))
    return out


def parse(module: str) -> ast.Module:
    with open(os.path.join(REPO, f"{module}.py")) as f:
        return ast.parse(f.read())


def top_level_imports(tree: ast.Module) -> list:
    """Imports outside any function or class body (module level, including under `if` / `try`)."""
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out += imported_modules(node)
    return out


def function_level_imports(tree: ast.Module) -> list:
    return [(line, name) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            for line, name in imported_modules(node)]


def test_every_root_module_has_a_place_in_the_order():
    assert sorted(ORDER) == MODULES


@pytest.mark.parametrize("module", ORDER)
def test_a_module_imports_only_project_modules_earlier_in_the_order(module):
    earlier = set(ORDER[:ORDER.index(module)])
    bad = [(line, name) for line, name in top_level_imports(parse(module)) if name in MODULES and name not in earlier]
    assert bad == [], f"{module}.py imports {bad}, not earlier than {module} in {ORDER}"


@pytest.mark.parametrize("module", ORDER)
def test_no_function_imports_a_project_module(module):
    bad = [(line, name) for line, name in function_level_imports(parse(module)) if name in MODULES]
    assert bad == [], f"{module}.py imports project modules inside functions: {bad}"


def test_the_walk_catches_a_backward_and_a_function_level_import():
    """The checks above can fail: a module importing a later one, and an import hidden in a function."""
    tree = ast.parse("import os\nimport train\n\ndef f():\n    import evaluate as _module\n")
    assert ("train" in [n for _, n in top_level_imports(tree)]) and ORDER.index("train") > ORDER.index("data")
    assert function_level_imports(tree) == [(5, "evaluate")]
