"""Fault-injection soak, the longer runs behind the CI-sized fault tests (tests/e2e/test_faults_store.py):

    python -m benchmarks.faults --cases store [--kills 12] [--rows 384] [--rows-per-shard 8] [--seed 0]

Each case writes its own section of benchmarks/results/faults.md (between `<!-- case: NAME -->` and
`<!-- end: NAME -->`; other cases' sections are kept) and prints it. A small dispatcher: one function per case.

- `store` (benchmarks/faults_store.py): `axolotl xkd precompute` killed `--kills` times at seeded points and
  resumed each time; the finished store compared with an uninterrupted build by sha256 per shard.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks import faults_store

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "faults.md"
HEADER = "# Fault-injection results\n\nEach section: what was injected, how often, what survived, what was lost.\n"

CASES: dict[str, Callable[[argparse.Namespace], str]] = {"store": faults_store.store_case}


def write_section(name: str, section: str) -> None:
    """Replace (or add) case `name`'s section of RESULTS, keeping the others."""
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    block = f"<!-- case: {name} -->\n{section}<!-- end: {name} -->\n"
    pattern = re.compile(rf"<!-- case: {re.escape(name)} -->\n.*?<!-- end: {re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=sorted(CASES))
    faults_store.add_arguments(parser)
    args = parser.parse_args()
    for name in args.cases:
        section = CASES[name](args)
        write_section(name, section)
        print(section)
    print(f"written to {RESULTS} ({' '.join(sys.argv[1:])})")


if __name__ == "__main__":
    main()
