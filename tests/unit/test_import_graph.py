"""The layering rules of DESIGN.md, checked on the import graph of alignlab/ (parsed with ast, never imported):

1. no import cycle between alignlab modules;
2. no module in alignlab/recipes/ imports a recipe other than itself. A recipe is a module of alignlab/recipes/ that
   defines a top-level `run` (the stage entry point); the others there (the package's __init__, common, ...) are
   shared infrastructure, which by this same rule imports no recipe either (__init__ dispatches with
   importlib.import_module, which is not an import statement: that is the one sanctioned way to reach a recipe);
3. alignlab/rl/ is pure tensor math: it imports only torch, the standard library and alignlab.rl;
4. the library sits below the recipes: no module outside alignlab/recipes/ imports alignlab.recipes, except the
   entry point (alignlab.__main__, which dispatches to recipes.run_stage).

Every import statement counts: module level, inside functions, under `if TYPE_CHECKING:` (a cycle hidden in a
function body is still a cycle to whoever reads the code). The checker itself is tested on small fake packages,
so a pass on the real tree cannot be vacuous.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, dotted
    dst: str  # imported module (an internal module, or the external top-level name)
    file: str
    line: int
    local: bool  # inside a function body

    def __str__(self) -> str:
        where = " (in a function)" if self.local else ""
        return f"{self.src} -> {self.dst}  [{self.file}:{self.line}{where}]"


def modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package rooted at src/<package>."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def resolve(name: str, known: dict[str, Path]) -> str:
    """The longest prefix of a dotted name that is a known module (the module an import statement loads)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return name


def imports(src: Path, package: str) -> list[Edge]:
    """Every import statement of every module: internal targets resolved to modules, externals to top-level names."""
    known = modules(src, package)
    edges = []
    for mod, path in known.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        local_lines = {
            node.lineno
            for fn in ast.walk(tree)
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            for node in ast.walk(fn)
            if isinstance(node, (ast.Import, ast.ImportFrom))
        }
        rel = str(path.relative_to(src))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = mod.split(".") if is_package else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                # `from a import b` loads a.b when b is a module, else a (b is a name in it)
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                internal = target == package or target.startswith(package + ".")
                dst = resolve(target, known) if internal else target.split(".")[0]
                edges.append(Edge(mod, dst, rel, node.lineno, node.lineno in local_lines))
    return edges


def internal_graph(edges: list[Edge], package: str) -> dict[str, list[Edge]]:
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.src, [])
        if (e.dst == package or e.dst.startswith(package + ".")) and e.dst != e.src:
            graph[e.src].append(e)
            graph.setdefault(e.dst, [])
    return graph


def cycles(edges: list[Edge], package: str) -> list[list[Edge]]:
    """Each import cycle (a strongly connected component of more than one module) as the edges inside it."""
    graph = internal_graph(edges, package)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.dst not in index:
                visit(e.dst)
                low[v] = min(low[v], low[e.dst])
            elif e.dst in on_stack:
                low[v] = min(low[v], index[e.dst])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return [
        sorted((e for v in c for e in graph[v] if e.dst in c), key=lambda e: (e.src, e.dst, e.line))
        for c in sorted(components, key=sorted)
    ]


def recipes(src: Path, package: str) -> set[str]:
    """The recipe modules: modules of <package>.recipes that define a top-level run()."""
    out = set()
    for mod, path in modules(src, package).items():
        if mod.startswith(f"{package}.recipes.") and path.name != "__init__.py":
            tree = ast.parse(path.read_text())
            if any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body):
                out.add(mod)
    return out


def recipe_to_recipe(edges: list[Edge], src: Path, package: str) -> list[Edge]:
    """Imports of a recipe by any module of <package>.recipes (recipes and shared infrastructure alike)."""
    stage_modules = recipes(src, package)
    in_recipes = f"{package}.recipes"
    return [
        e
        for e in edges
        if (e.src == in_recipes or e.src.startswith(in_recipes + "."))
        and e.dst in stage_modules
        and e.dst != e.src
    ]


def impure_rl(edges: list[Edge], package: str) -> list[Edge]:
    """Imports of <package>.rl modules that are not torch, the standard library or <package>.rl."""
    rl = f"{package}.rl"
    allowed_external = {"torch", "__future__"} | set(sys.stdlib_module_names)
    return [
        e
        for e in edges
        if (e.src == rl or e.src.startswith(rl + "."))
        and not (e.dst == rl or e.dst.startswith(rl + "."))
        and not (e.dst in allowed_external and not e.dst.startswith(package))
    ]


def library_to_recipes(edges: list[Edge], package: str, entry: tuple[str, ...] = ()) -> list[Edge]:
    """Imports of <package>.recipes (or a module in it) by a module outside it, other than the entry points."""
    in_recipes = f"{package}.recipes"
    return [
        e
        for e in edges
        if not (e.src == in_recipes or e.src.startswith(in_recipes + "."))
        and e.src not in entry
        and (e.dst == in_recipes or e.dst.startswith(in_recipes + "."))
    ]


def report(title: str, items: list) -> str:
    return f"{title} ({len(items)}):\n" + "\n".join(f"  {i}" for i in items)


# ---------------------------------------------------------------------------------------------------------------
# The real tree

EDGES = imports(ROOT, "alignlab")


def test_the_parser_sees_the_tree():
    # not vacuous: the package's modules and some of their imports are found, function-local ones included
    srcs = {e.src for e in EDGES}
    assert {"alignlab.recipes.ppo", "alignlab.rl.losses", "alignlab.config"} <= srcs
    assert any(e.dst == "torch" for e in EDGES) and any(e.local for e in EDGES)
    assert (
        len(recipes(ROOT, "alignlab")) >= 9
    )  # pretrain sft rm ppo rejection_sampling context_distillation ...


def test_no_import_cycle():
    found = cycles(EDGES, "alignlab")
    assert not found, "\n".join(
        report(f"import cycle through {sorted({e.src for e in c})}", c) for c in found
    )


def test_no_recipe_imports_another_recipe():
    bad = recipe_to_recipe(EDGES, ROOT, "alignlab")
    assert not bad, report(
        "recipe imports of a recipe (move what they share into a library module below the recipes)", bad
    )


def test_rl_is_pure_tensor_math():
    bad = impure_rl(EDGES, "alignlab")
    assert not bad, report("alignlab/rl imports outside torch, the standard library and alignlab.rl", bad)


def test_the_library_does_not_import_the_recipes():
    bad = library_to_recipes(EDGES, "alignlab", entry=("alignlab.__main__",))
    assert not bad, report(
        "library imports of alignlab.recipes (move the shared piece below the recipes)", bad
    )


# ---------------------------------------------------------------------------------------------------------------
# The checker, on fake packages


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for d in {p.parent for p in root.rglob("*.py")}:
        (d / "__init__.py").touch()
    return root


GOOD = {
    "pkg/__init__.py": "",
    "pkg/models.py": "import torch\nfrom pkg.rl import kl\n",
    "pkg/finetune.py": "from . import models\n\ndef train():\n    from pkg.data import splits\n",
    "pkg/data/splits.py": "import random\n",
    "pkg/rl/__init__.py": "from .kl import penalty\n",
    "pkg/rl/kl.py": "from __future__ import annotations\nimport math\nimport torch\nfrom typing import Any\n",
    "pkg/rl/losses.py": "import torch.nn.functional as F\nfrom pkg.rl.kl import penalty\nfrom . import kl\n",
    "pkg/recipes/__init__.py": "import importlib\n\ndef dispatch(s):\n    return importlib.import_module(f'pkg.recipes.{s}')\n",
    "pkg/recipes/common.py": "from pkg import finetune\n",
    "pkg/recipes/sft.py": "from pkg.recipes import common\nfrom pkg import finetune\n\ndef run(cfg):\n    pass\n",
    "pkg/recipes/ppo.py": "from .common import x\nfrom pkg.recipes import RESUMABLE\n\ndef run(cfg):\n    pass\n",
}


def test_checker_passes_a_layered_package(tmp_path):
    src = write_package(tmp_path, GOOD)
    edges = imports(src, "pkg")
    assert recipes(src, "pkg") == {"pkg.recipes.sft", "pkg.recipes.ppo"}
    assert cycles(edges, "pkg") == []
    assert recipe_to_recipe(edges, src, "pkg") == []
    assert impure_rl(edges, "pkg") == []
    assert library_to_recipes(edges, "pkg") == []
    # relative imports resolve to modules: `from . import models` in pkg/finetune.py is pkg.models, `from .common
    # import x` in pkg/recipes/ppo.py is pkg.recipes.common, `from .kl import penalty` in pkg/rl/__init__ is pkg.rl.kl
    pairs = {(e.src, e.dst) for e in edges}
    assert {
        ("pkg.finetune", "pkg.models"),
        ("pkg.recipes.ppo", "pkg.recipes.common"),
        ("pkg.rl", "pkg.rl.kl"),
        ("pkg.recipes.ppo", "pkg.recipes"),
        ("pkg.finetune", "pkg.data.splits"),
    } <= pairs


def test_checker_finds_every_violation(tmp_path):
    bad = dict(GOOD)
    # a cycle closed only inside a function body: models -> rl.kl (module level), rl.kl -> models (local)
    bad["pkg/rl/kl.py"] = "import torch\nimport numpy as np\n\ndef score(m):\n    from pkg import models\n"
    # a second cycle of three: a -> b -> c -> a
    bad["pkg/a.py"] = "import pkg.b\n"
    bad["pkg/b.py"] = "from pkg import c\n"
    bad["pkg/c.py"] = "from . import a\n"
    # recipe -> recipe, hidden in a function; and "infrastructure" that imports a recipe
    bad["pkg/recipes/ppo.py"] = (
        "from .common import x\n\ndef run(cfg):\n    from pkg.recipes.sft import run as r\n"
    )
    bad["pkg/recipes/common.py"] = "from pkg.recipes import sft\n"
    # a library module reaching up into the recipes, inside a function
    bad["pkg/report.py"] = "def show(rows):\n    from pkg.recipes.common import x\n"
    src = write_package(tmp_path, bad)
    edges = imports(src, "pkg")

    found = cycles(edges, "pkg")
    members = [sorted({e.src for e in c}) for c in found]
    # the third: common -> sft (above) closes sft -> common
    assert members == [
        ["pkg.a", "pkg.b", "pkg.c"],
        ["pkg.models", "pkg.rl.kl"],
        ["pkg.recipes.common", "pkg.recipes.sft"],
    ]
    local = [e for e in found[1] if e.src == "pkg.rl.kl"]
    assert [(e.dst, e.line, e.local) for e in local] == [("pkg.models", 5, True)]

    assert sorted((e.src, e.dst, e.local) for e in recipe_to_recipe(edges, src, "pkg")) == [
        ("pkg.recipes.common", "pkg.recipes.sft", False),
        ("pkg.recipes.ppo", "pkg.recipes.sft", True),
    ]
    assert [(e.src, e.dst, e.local) for e in library_to_recipes(edges, "pkg")] == [
        ("pkg.report", "pkg.recipes.common", True)
    ]
    assert sorted((e.src, e.dst) for e in impure_rl(edges, "pkg")) == [
        ("pkg.rl.kl", "numpy"),
        ("pkg.rl.kl", "pkg.models"),
    ]
    # the failure message names every edge with its file and line
    text = report("x", recipe_to_recipe(edges, src, "pkg"))
    assert "pkg/recipes/ppo.py:4 (in a function)" in text and "pkg/recipes/common.py:1" in text


@pytest.mark.parametrize(
    "line,expected",
    [
        ("from .. import models", "pkg.models"),  # two dots in pkg/rl/x.py: pkg
        ("from ..data import splits", "pkg.data.splits"),
        ("from . import kl", "pkg.rl.kl"),
        ("import pkg.data.splits as s", "pkg.data.splits"),
        ("from pkg.models import thing", "pkg.models"),
    ],
)
def test_relative_and_absolute_imports_resolve_to_modules(tmp_path, line, expected):
    files = dict(GOOD)
    files["pkg/rl/x.py"] = line + "\n"
    src = write_package(tmp_path, files)
    assert [e.dst for e in imports(src, "pkg") if e.src == "pkg.rl.x"] == [expected]
