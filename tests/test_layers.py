"""Every import points down: a module imports only from its own layer or the layers below it.

The layers are listed once, lowest first. An entry names a module or a package (a package covers
its submodules, except the top package `muxserve`, whose entry is its `__init__` only); a module
belongs to the layer of the longest entry that covers it. The test reads the source (an AST walk,
nothing is imported) and counts every import: at the top of a module, inside functions (lazy
imports), and `importlib.import_module("...")` with a literal name. Imports under
`if TYPE_CHECKING:` are left out: they never run, and annotations may name a type from above.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("muxserve", "placement")

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "muxserve",
            "muxserve.errors",
            "muxserve.dtypes",
            "muxserve.demo_corpus",
            "muxserve.cuda_timing",
        ),
    ),
    (
        "records",
        (
            "muxserve.sampling_params",
            "muxserve.tokenizer",
            "muxserve.structured_output",
            "muxserve.kv",
            "muxserve.parallel",
        ),
    ),
    ("models", ("muxserve.models",)),
    ("config", ("muxserve.config",)),
    ("request", ("muxserve.request",)),
    ("scheduler", ("muxserve.scheduler", "muxserve.residency")),
    (
        "per-model descriptors",
        (
            "muxserve.model_descriptor",
            "muxserve.step_controls",
            "muxserve.output_processor",
            "muxserve.served_model",
        ),
    ),
    ("runner", ("muxserve.runner",)),
    ("kernels", ("muxserve.runner.kernels",)),
    ("model runner", ("muxserve.runner.cuda_graphs", "muxserve.runner.model_runner")),
    ("executor", ("muxserve.executor",)),
    ("engine", ("muxserve.engine", "muxserve.model_residency", "muxserve.roster")),
    ("client", ("muxserve.client", "muxserve.demo")),
    ("mesh", ("muxserve.mesh",)),
    ("router", ("muxserve.router",)),
    ("applications", ("muxserve.server", "muxserve.bench", "muxserve.generate_cli", "placement")),
    ("command line", ("muxserve.cli",)),
)


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of our packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def layer_of(module: str) -> int | None:
    """Index of the module's layer in LAYERS, or None where no entry covers it."""
    best: tuple[int, int] | None = None  # (entry length, layer)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            covers = module == entry or (entry != "muxserve" and module.startswith(entry + "."))
            if covers and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


@dataclass(frozen=True)
class Import:
    """One import of one of our modules by another: where it is and what it names."""

    importer: str
    line: int
    target: str


def _under_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _named(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """The dotted names an import node asks for (both `a.b` and `a.b.c` for `from a.b import c`,
    since `c` may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            anchor = importer.split(".")
            anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join([*anchor, base] if base else anchor)
        return [base] + [f"{base}.{alias.name}" for alias in node.names]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Our modules that `module` imports, each resolved to the deepest module it names."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _under_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        targets = set()
        for name in _named(node, module, path.name == "__init__.py"):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        # `from a.b import c` where c is a module names a.b.c; a.b itself is only its __init__
        deepest = {t for t in targets if not any(o.startswith(t + ".") for o in targets)}
        found += [Import(module, getattr(node, "lineno", 0), t) for t in sorted(deepest)]
    return sorted(found, key=lambda imp: (imp.line, imp.target))


def violations(root: Path = ROOT) -> list[str]:
    """Every import that runs up a layer, and every module no layer names."""
    files = module_files(root)
    known = set(files)
    problems = [f"{m}: in no layer of tests/test_layers.py" for m in files if layer_of(m) is None]
    for module, path in files.items():
        own = layer_of(module)
        if own is None:
            continue
        for imp in imports_of(module, path, known):
            theirs = layer_of(imp.target)
            if theirs is not None and theirs > own:
                problems.append(
                    f"{path.relative_to(root)}:{imp.line}: {module} ({LAYERS[own][0]}) imports "
                    f"{imp.target} ({LAYERS[theirs][0]}), a higher layer"
                )
    return problems


def test_every_import_points_down():
    assert violations() == []


def test_every_layer_entry_names_a_module():
    files = module_files()
    stale = [
        entry
        for _, entries in LAYERS
        for entry in entries
        if entry not in files and not any(m.startswith(entry + ".") for m in files)
    ]
    assert stale == []


def test_an_import_that_runs_up_is_caught(tmp_path):
    """A scratch package shaped like ours: the scheduler importing the engine is refused, in a
    function too; the same import under TYPE_CHECKING, or downwards, is not."""
    pkg = tmp_path / "muxserve"
    (pkg / "scheduler").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "scheduler" / "__init__.py").write_text("")
    (pkg / "engine.py").write_text("from muxserve.scheduler import scheduler\n")
    (pkg / "scheduler" / "scheduler.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from muxserve.engine import MuxEngine\n"
        "def f():\n"
        "    from muxserve import engine\n"
    )
    (pkg / "scheduler" / "job.py").write_text(
        "import importlib\nimportlib.import_module('muxserve.engine')\n"
    )
    (pkg / "nowhere.py").write_text("")
    (tmp_path / "placement").mkdir()
    (tmp_path / "placement" / "__init__.py").write_text("from .simulator import x\n")
    (tmp_path / "placement" / "simulator.py").write_text("from muxserve import engine\n")
    assert violations(tmp_path) == [
        "muxserve.nowhere: in no layer of tests/test_layers.py",
        "muxserve/scheduler/job.py:2: muxserve.scheduler.job (scheduler) imports "
        "muxserve.engine (engine), a higher layer",
        "muxserve/scheduler/scheduler.py:5: muxserve.scheduler.scheduler (scheduler) imports "
        "muxserve.engine (engine), a higher layer",
    ]


def test_layers_of_modules():
    assert layer_of("muxserve") == 0
    assert layer_of("muxserve.nowhere") is None  # the top package's entry is its __init__ only
    assert LAYERS[layer_of("muxserve.runner.attention")][0] == "runner"  # type: ignore[index]
    assert LAYERS[layer_of("muxserve.runner.device_tables")][0] == "runner"  # type: ignore[index]
    assert LAYERS[layer_of("muxserve.runner.kernels.ops")][0] == "kernels"  # type: ignore[index]
    assert LAYERS[layer_of("muxserve.runner.model_runner")][0] == "model runner"  # type: ignore[index]
    assert LAYERS[layer_of("placement.simulator")][0] == "applications"  # type: ignore[index]
