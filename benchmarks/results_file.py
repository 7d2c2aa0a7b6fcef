"""The one writer of benchmarks/RESULTS.md: each benchmark script appends its report, newest last."""
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def append_report(report: str) -> None:
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nProduced by the scripts in this folder; newest last.\n")
    with RESULTS.open("a") as f:
        f.write(report)
