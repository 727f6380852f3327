"""The library's shape, checked: layers that import one way (import-linter's contract in
pyproject.toml), first-party imports at the top of modules unless they keep a heavy library
lazy, DVC stage deps that cover the code each stage runs, and the data paths in one place."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, copy_checkout
from stage_code import files_run, missing_deps

from ran import paths

# Importing one of these at module level is what a function-level import may avoid (numpy and
# pandas too: `ran-cli --help` loads neither, tests/test_cli.py).
HEAVY = {"torch", "torchvision", "mlflow", "ffcv", "great_expectations", "timm", "ray"}
HEAVY |= {"litserve", "numpy", "pandas"}


def _plant(module: Path, line: str) -> None:
    module.write_text(module.read_text() + f"\n{line}  # noqa: E402, F401\n")


def test_a_planted_upward_import_breaks_the_layers_contract(tmp_path: Path) -> None:
    """``lint-imports`` (run by ``make lint``) passes on the code and fails, naming the
    import, when a lower layer imports a higher one, even inside a function."""
    root = copy_checkout(tmp_path / "project")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(root)}
    kept = subprocess.run([BIN / "lint-imports"], cwd=root, env=env, capture_output=True, text=True)
    assert kept.returncode == 0, kept.stdout[-2000:]
    assert "2 kept, 0 broken" in kept.stdout
    meta = root / "ran" / "data" / "meta.py"
    meta.write_text(meta.read_text() + "\n\ndef _upward():\n    from ran.train import loop\n")
    broken = subprocess.run(
        [BIN / "lint-imports"], cwd=root, env=env, capture_output=True, text=True
    )
    assert broken.returncode == 1
    assert "ran.data is not allowed to import ran.train" in broken.stdout
    assert "ran.data.meta -> ran.train.loop" in broken.stdout


def _top_level_imports(path: Path) -> set[str]:
    """What a module imports when it is imported (``if TYPE_CHECKING`` blocks excluded)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _module_path(module: str) -> Path | None:
    path = REPO / Path(*module.split("."))
    if path.is_dir():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def _loads_heavy(module: str, seen: set[str]) -> bool:
    """Whether importing first-party ``module`` imports a heavy library (its packages'
    ``__init__`` included)."""
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        path = _module_path(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        for imported in _top_level_imports(path):
            if imported.split(".")[0] in HEAVY:
                return True
            if imported.split(".")[0] == "ran" and _loads_heavy(imported, seen):
                return True
    return False


def test_first_party_imports_inside_functions_only_keep_a_heavy_library_lazy() -> None:
    """An import of a ``ran`` module inside a function must be one whose import would load a
    heavy library (torch, MLflow, FFCV, Great Expectations, timm, Ray, LitServe, numpy,
    pandas); every other first-party import belongs at the top of the module."""
    needless = []
    for path in sorted((REPO / "ran").rglob("*.py")):
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            imports = [n for n in ast.walk(function) if isinstance(n, ast.ImportFrom)]
            for node in imports:
                first_party = (node.module or "").startswith("ran")
                if first_party and not _loads_heavy(node.module, set()):
                    needless.append(f"{path.relative_to(REPO)}:{node.lineno} {node.module}")
    assert needless == []
    assert _loads_heavy("ran.train.loop", set()) and not _loads_heavy("ran.tracking", set())


def test_every_stage_declares_the_code_it_runs() -> None:
    assert missing_deps(REPO) == {}


def test_a_planted_import_outside_a_stage_deps_is_found(tmp_path: Path) -> None:
    """A module the ingest stage runs that starts importing one its deps do not name makes
    the check fail, naming the stage and the file."""
    root = copy_checkout(tmp_path / "project")
    _plant(root / "ran" / "data" / "beton.py", "import ran.studies.tables")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": str(root)}
    check = [sys.executable, str(root / "tests" / "stage_code.py"), "--check"]
    result = subprocess.run(check, cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "dvc.yaml:ingest runs ran/studies/__init__.py, ran/studies/tables.py" in result.stdout


@pytest.mark.slow
def test_a_change_in_any_module_evaluate_runs_makes_dvc_see_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real DVC in a fresh git repository: with ``evaluate`` committed, editing any file
    its script runs makes ``dvc status`` report the stage changed, and undoing it does not."""
    from dvc.repo import Repo

    root = copy_checkout(tmp_path / "project")
    for path in ("data/ingest/meta.json", "data/train/model.pt", "data/evaluate/masks/a.png"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(path)
    for name in ("per_class.json", "confusion.json", "metrics.json", "predictions.csv"):
        (root / "data" / "evaluate" / name).write_text(name)
    (root / "data" / "evaluate" / "confusion.png").write_text("png")
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)  # .dvc/ is tracked
    subprocess.run([BIN / "dvc", "commit", "-f", "-q", "evaluate"], cwd=root, env=env, check=True)
    monkeypatch.chdir(root)  # DVC resolves targets from the working directory
    repo = Repo(str(root))
    assert repo.status(targets=["evaluate"]) == {}
    files = sorted(files_run(Path("pipeline/evaluate.py"), REPO))
    assert "ran/inference/scoring.py" in files and "ran/modelfile.py" in files
    unseen = []
    for file in files:
        original = (root / file).read_text()
        (root / file).write_text(original + "\n# changed\n")
        if "evaluate" not in repo.status(targets=["evaluate"]):
            unseen.append(file)
        (root / file).write_text(original)
    assert unseen == []
    assert repo.status(targets=["evaluate"]) == {}


def test_dvc_files_write_the_paths_of_ran_paths() -> None:
    """``dvc.yaml`` and ``studies/dvc.yaml`` spell out the data paths of :mod:`ran.paths`."""
    main = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert main["ingest"]["outs"] == [str(paths.INGEST)]
    assert main["noise"]["outs"] == [str(paths.NOISE)]
    assert {str(paths.INGEST), str(paths.LABELS)} <= set(main["train"]["deps"])
    train_outs = [next(iter(o)) if isinstance(o, dict) else o for o in main["train"]["outs"]]
    assert str(paths.MODEL) in train_outs
    assert all(o.startswith(f"{paths.TRAIN}/") for o in train_outs)
    assert {str(paths.MODEL), str(paths.INGEST)} <= set(main["evaluate"]["deps"])
    assert all(o.startswith(f"{paths.EVALUATE}/") for o in main["evaluate"]["outs"])

    studies = yaml.safe_load((REPO / "studies" / "dvc.yaml").read_text())["stages"]
    assert studies["ingest-cifar100"]["outs"] == [str(paths.ingest_folder("cifar100"))]
    datasets = ("cifar10", "cifar100")
    pretrain = studies["pretrain"]  # each data set's ViT, its prior, the constant control
    assert pretrain["foreach"] == {d: str(paths.ingest_folder(d)) for d in datasets}
    assert next(iter(pretrain["do"]["outs"][0])) == str(paths.pretrain_folder("${key}"))
    assert studies["prior"]["foreach"] == {
        d: {"ingest": str(paths.ingest_folder(d)), "vit": str(paths.pretrain_folder(d))}
        for d in datasets
    }
    assert studies["prior"]["do"]["outs"] == [str(paths.prior_folder("${key}"))]
    constant = studies["prior-constant"]
    assert constant["foreach"] == pretrain["foreach"]
    assert constant["do"]["outs"] == [str(paths.prior_folder("${key}", constant=True))]
    assert paths.prior_name(paths.prior_folder("cifar10", constant=True).name) == ("cifar10", True)
    for study in ("noise", "arl-nal", "attention", "mask"):
        (cell_out,) = studies[f"{study}-cell"]["outs"]
        assert next(iter(cell_out)) == str(paths.cell_folder(study, "${item.cell}"))
        report = paths.report_folder(study)  # results and plot: plain outputs (report.py)
        assert studies[study]["outs"] == [
            f"{report}/report.md",
            {f"{report}/results.json": {"cache": False}},
            {f"{report}/report.png": {"cache": False}},
        ]
        assert "metrics" not in studies[study] and "plots" not in studies[study]
    (vitmask_out,) = studies["vitmask-cell"]["do"]["outs"]
    assert next(iter(vitmask_out)) == str(paths.cell_folder("vitmask", "${key}"))
