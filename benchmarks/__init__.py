"""Benchmarks and the quality study; run from the repository root as `python -m benchmarks.<name>`."""


def write_report(path, report: str) -> None:
    """Write a benchmark's markdown report to `path` (creating its folder) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(report)
