"""The documentation site (mkdocs.yml, docs/) and the script that draws its figures.

`mkdocs build --strict` is what `make lint` runs: these tests check that it passes as
committed, that it does fail on what it is there to catch, and that
`scripts/docs_figures.py` draws what it can from a run's outputs and names what is missing.
No training runs here: the inputs are small files written by the tests.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = REPO / "scripts" / "docs_figures.py"
PNG = b"\x89PNG\r\n\x1a\n"


def mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # no end-of-life banner
        capture_output=True,
        text=True,
    )


def docs_copy(tmp_path: Path, figures: bool = True) -> Path:
    """mkdocs.yml, docs/ and the hook's scripts, copied; without docs/figures if asked."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
    (root / "scripts").mkdir()
    for name in ("mkdocs_hooks.py", "docs_figures.py"):
        shutil.copy(REPO / "scripts" / name, root / "scripts" / name)
    if not figures:
        shutil.rmtree(root / "docs" / "figures", ignore_errors=True)
    return root


def test_the_site_builds_strict(tmp_path: Path) -> None:
    result = mkdocs_build(REPO, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    for page in ("index.html", "train/index.html", "studies/noise/index.html", "teams/index.html"):
        assert (tmp_path / "site" / page).is_file(), page


BROKEN = [  # (page, text appended to it, what the build's warning names)
    ("teams.md", "\nSee [the missing page](no-such-page.md).\n", "no-such-page.md"),
    ("studies/mask.md", "\nSee [this](../train.md#no-such-section).\n", "no-such-section"),
    ("evaluate.md", "\n![not the script's](figures/no-such-figure.png)\n", "no-such-figure.png"),
    ("orphan.md", "# A page that is not in the nav\n", "orphan.md"),
]


def test_the_strict_build_fails_on_broken_links(tmp_path: Path) -> None:
    """A missing page, a missing anchor, a figure the script never writes and a page left out
    of the nav: each is a warning, and --strict turns warnings into a failure."""
    root = docs_copy(tmp_path)
    for page, text, _ in BROKEN:
        with open(root / "docs" / page, "a") as f:
            f.write(text)
    result = mkdocs_build(root, tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "warnings in strict mode" in output
    messages = re.split(r"^(?=INFO|WARNING|ERROR)", output, flags=re.MULTILINE)
    warnings = [m for m in messages if m.startswith("WARNING")]
    for _, _, named in BROKEN:
        assert any(named in warning for warning in warnings), (named, warnings)


def test_a_figure_not_generated_yet_is_a_note_not_a_failure(tmp_path: Path) -> None:
    root = docs_copy(tmp_path, figures=False)
    result = mkdocs_build(root, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    page = (tmp_path / "site" / "studies" / "noise" / "index.html").read_text()
    assert "Figure not generated yet" in page
    assert "studies/dvc.yaml:noise" in page and "make docs-figures" in page


def test_pages_and_readme_show_only_figures_the_script_writes() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import docs_figures
    finally:
        sys.path.remove(str(SCRIPT.parent))
    texts = {p: p.read_text() for p in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]}
    shown = {
        (path, name)
        for path, text in texts.items()
        for name in re.findall(r"!\[[^\]]*\]\((?:\.\./)*(?:docs/)?figures/([^)]+)\)", text)
    }
    assert {name for _, name in shown} >= {"training-curves.png", "confusion.png"}
    unknown = [f"{p.relative_to(REPO)}: {n}" for p, n in shown if n not in docs_figures.BY_NAME]
    assert not unknown, unknown


def write_run_outputs(root: Path) -> bytes:
    """A training's curves.csv (a few steps) and holdout.csv, and evaluate's confusion.png
    (a small real PNG); returns the PNG's bytes."""
    from PIL import Image

    train = root / "data" / "train"
    train.mkdir(parents=True)
    with open(train / "curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration", "epoch", "loss", "train_accuracy", "lr", "images_per_s"])
        for step in range(1, 9):
            writer.writerow([step * 10, 0, 2.3 - 0.1 * step, 0.1 + 0.05 * step, 0.1, 150.0])
    (train / "holdout.csv").write_text("iteration,holdout_accuracy\n40,0.2\n80,0.3\n")
    evaluate = root / "data" / "evaluate"
    evaluate.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(evaluate / "confusion.png")
    return (evaluate / "confusion.png").read_bytes()


def run_script(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True, text=True
    )


def test_docs_figures_draws_what_it_can_and_names_what_is_missing(tmp_path: Path) -> None:
    confusion = write_run_outputs(tmp_path)
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    figures = tmp_path / "docs" / "figures"
    assert sorted(p.name for p in figures.iterdir()) == ["confusion.png", "training-curves.png"]
    assert (figures / "training-curves.png").read_bytes().startswith(PNG)
    assert (figures / "confusion.png").read_bytes() == confusion
    lines = result.stderr.splitlines()
    assert "data/ingest missing: run `make repro` (noise-transition.png skipped)" in lines
    masks = "data/evaluate/masks/test-00.png missing: run `make repro`"
    study = (
        "reports/arl-nal/report.png missing: run `dvc repro --keep-going studies/dvc.yaml:arl-nal`"
    )
    for start in (masks, study):
        assert any(line.startswith(start) for line in lines), (start, lines)
    assert "2 figures written" in result.stdout


def test_docs_figures_with_nothing_to_draw_fails(tmp_path: Path) -> None:
    result = run_script(tmp_path)
    assert result.returncode == 1
    assert "data/train/curves.csv missing: run `make repro`" in result.stderr
    assert "no figure produced" in result.stderr
    assert not (tmp_path / "docs").exists()


def test_the_readme_links_into_the_docs_resolve() -> None:
    """The README is not built by MkDocs: its relative links are checked here (figures by
    the test above: they exist once `make docs-figures` has run)."""
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link.split("#")[0] for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    broken = [link for link in local if not link.startswith("docs/figures/")]
    broken = [link for link in broken if not (REPO / link).exists()]
    assert not broken, broken


def test_the_cost_tables_are_what_the_committed_plan_and_rates_give() -> None:
    """The README and docs/cluster.md copy `benchmarks/cost.py table`'s rows: a plan
    regenerated for a new cell must reach both (the README's once kept the old count)."""
    results = REPO / "benchmarks" / "results"
    printed = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "cost.py"),
            "table",
            str(results / "cost-plan.json"),
            str(results / "cost-rates-h200.json"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(rows) > 2, printed
    for page in [REPO / "README.md", REPO / "docs" / "cluster.md"]:
        text = page.read_text()
        assert all(row in text.splitlines() for row in rows), page
