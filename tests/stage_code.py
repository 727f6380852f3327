"""Which first-party code a DVC stage runs, from the import graph (grimp, import-linter's).

A stage's script (``python pipeline/X.py …``) runs every ``ran`` module it imports, directly
or through others (imports inside functions included), and the packages holding them. Its
``deps`` in ``dvc.yaml`` must cover each of those files, or a change there leaves DVC
saying "up to date" over stale outputs. ``python tests/stage_code.py`` prints the code deps
each script needs, in the form the ``dvc.yaml`` files write them (a subpackage as its folder,
a top-level module as its file); ``--check`` lists the stages whose deps miss a file.
"""

from __future__ import annotations

import ast
import shlex
import sys
from pathlib import Path

import grimp
import yaml

PACKAGE = "ran"


def _imported(script: Path, graph: grimp.ImportGraph) -> set[str]:
    """The first-party modules ``script`` imports itself (``from ran import paths`` counts
    ``ran.paths``)."""
    found = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == PACKAGE:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names} & graph.modules
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
    return found


def modules_run(script: Path, graph: grimp.ImportGraph | None = None) -> set[str]:
    """Every first-party module importing ``script`` executes, with the packages above them."""
    graph = graph or grimp.build_graph(PACKAGE)
    direct = _imported(script, graph)
    closure = set(direct)
    for module in direct:
        closure |= graph.find_upstream_modules(module)
    parts = [m.split(".") for m in closure]
    return {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)}


def module_file(module: str, root: Path) -> str:
    """``ran.data.beton`` → ``ran/data/beton.py``; a package → its ``__init__.py``."""
    path = Path(*module.split("."))
    return str(path / "__init__.py") if (root / path).is_dir() else f"{path}.py"


def files_run(script: Path, root: Path, graph: grimp.ImportGraph | None = None) -> set[str]:
    """The files (relative to ``root``) a stage running ``script`` executes: itself too."""
    files = {module_file(m, root) for m in modules_run(root / script, graph)}
    return files | {str(script)}


def code_deps(script: Path, root: Path, graph: grimp.ImportGraph | None = None) -> list[str]:
    """The code deps to write for ``script``: subpackages as folders, top-level files."""
    deps = set()
    for file in files_run(script, root, graph):
        parts = Path(file).parts
        deps.add(str(Path(*parts[:2])) if parts[0] == PACKAGE and len(parts) > 2 else file)
    return sorted(deps)


def uncovered(files: set[str], deps: list[str]) -> list[str]:
    """The ``files`` that no entry of ``deps`` (a file, or a folder holding it) names."""
    return sorted(f for f in files if not any(f == d or f.startswith(f"{d}/") for d in deps))


def stage_script(cmd: str) -> Path | None:
    """The script of a stage's ``cmd`` (``python pipeline/X.py ARGS``), if it runs one."""
    words = shlex.split(cmd)
    return Path(words[1]) if len(words) > 1 and words[0] == "python" else None


def declared_stages(root: Path) -> dict[str, tuple[str, list[str]]]:
    """Every stage of ``dvc.yaml`` and ``studies/dvc.yaml`` (a ``foreach``/``matrix`` stage
    once, as written): its ``cmd`` and its ``deps``."""
    stages = {}
    for file in ("dvc.yaml", "studies/dvc.yaml"):
        for name, stage in yaml.safe_load((root / file).read_text())["stages"].items():
            body = stage.get("do", stage)
            stages[f"{file}:{name}"] = (body["cmd"], [str(d) for d in body.get("deps", [])])
    return stages


def missing_deps(root: Path) -> dict[str, list[str]]:
    """Per stage, the files its script runs that its ``deps`` do not cover (none: ``{}``)."""
    graph = grimp.build_graph(PACKAGE)
    problems = {}
    for name, (cmd, deps) in declared_stages(root).items():
        script = stage_script(cmd)
        if script is not None:
            missing = uncovered(files_run(script, root, graph), deps)
            if missing:
                problems[name] = missing
    return problems


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    if sys.argv[1:] == ["--check"]:
        problems = missing_deps(root)
        for name, missing in problems.items():
            print(f"{name} runs {', '.join(missing)}, which its deps do not cover")
        sys.exit(1 if problems else 0)
    graph = grimp.build_graph(PACKAGE)
    for script in sorted((root / "pipeline").glob("*.py")):
        relative = script.relative_to(root)
        print(f"{relative}: [{', '.join(code_deps(relative, root, graph))}]")
