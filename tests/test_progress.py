"""Progress bars outside a terminal: one line per step when it ends with its final count
(not a redraw per update); MLflow's per-file artifact bars off."""

from __future__ import annotations

import subprocess
import sys

STEPS = """
import os, time
from ran.data.parallel import ordered_map
from ran.progress import progress_bar, tracked
from ran.tracking import tracking_uri
with progress_bar("loss {task.fields[loss]:.2f}") as bar:
    task = bar.add_task("train", total=500, loss=9.0)
    for step in range(500):
        bar.update(task, advance=1, loss=1 / (step + 1))
for _ in tracked("decoding val", 300)(ordered_map(abs, range(300), 2)):  # forks 2 workers
    time.sleep(0.002)  # longer than rich's refresh period in all
tracking_uri()
print(os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"))
"""


def test_bars_in_a_log_print_one_line_per_step() -> None:
    result = subprocess.run(
        [sys.executable, "-c", STEPS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("train ") and "500/500 loss 0.00" in lines[0]
    assert lines[1].startswith("decoding val ") and "300/300" in lines[1]
    assert result.stdout.strip() == "false"
