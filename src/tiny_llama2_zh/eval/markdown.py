"""How measurements become files people read: markdown tables (tabulate's pipe format), percentages, a result
written as JSON beside its markdown, and notes on stderr. One of each for every report of the project."""

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from tabulate import tabulate


def table(headers: Sequence[str], rows: Iterable[Sequence], left: int = 1) -> str:
    """A markdown (pipe) table: the first `left` columns left-aligned (names), the rest right-aligned (figures).
    Cells are written as given: format numbers before (no re-parsing of "1,234" or "12.0%")."""
    rows = [list(map(str, row)) for row in rows]
    align = ["left"] * left + ["right"] * (len(headers) - left)
    return tabulate(rows, headers=list(headers), tablefmt="pipe", colalign=align, disable_numparse=True)


def percent(value: float | None, digits: int = 1) -> str:
    """0.8125 -> '81.2%'; None (not measured) -> '—'."""
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def write_result(result: dict, markdown: str, output_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """OUTPUT_DIR/STEM.json (the figures, for programs) and OUTPUT_DIR/STEM.md (for people)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return json_path, md_path


def note(command: str, message: str) -> None:
    """A notice for the person running `tinyllm COMMAND` (skipped rows, missing files), on stderr."""
    print(f"tinyllm {command}: {message}", file=sys.stderr)
