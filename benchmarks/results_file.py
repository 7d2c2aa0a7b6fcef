"""Where benchmark reports go: each script prints its dated report and appends it to
benchmarks/history/<date>-<script>.md. benchmarks/RESULTS.md is the curated table of current figures; it is
updated by hand from the history, never by a script."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

HISTORY = Path(__file__).with_name("history")
RESULTS = Path(__file__).with_name("RESULTS.md")


def history_file(script: str, date: datetime.date | None = None) -> Path:
    """benchmarks/history/<date>-<script>.md, e.g. history/2026-12-07-bench_train.md."""
    return HISTORY / f"{date or datetime.date.today()}-{script}.md"


def publish(report: str, write: bool = True) -> None:
    """Prints `report`; with `write`, appends it to today's history file of the running script (newest last) and
    reminds that the table in RESULTS.md is updated by hand."""
    print(report)
    if not write:
        return
    script = Path(sys.argv[0]).stem
    path = history_file(script)
    if not path.exists():
        HISTORY.mkdir(exist_ok=True)
        path.write_text(f"# {path.stem}: reports of `benchmarks/{script}.py`, newest last\n")
    with path.open("a") as f:
        f.write(report)
    print(f"Appended the report to {path}. Update the table in {RESULTS} by hand with the new figures "
          f"(source: [{path.stem}](history/{path.name})).", flush=True)
