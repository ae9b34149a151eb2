"""JSON Lines files checked record by record: the one reader for chat conversations and preference pairs
(training, `data/conversations.py`, `data/preferences.py`) and for the held-out task rows `tinyllm eval tasks`
scores (`eval/tasks.py`).

Every non-blank line is parsed; a line that is not UTF-8 JSON is skipped and counted, and so is any record the
caller finds unusable (`ReadReport.skip`), each with its `file:line`, so that a person can fix the input. Nothing
here imports transformers or torch: `tinyllm eval tasks --help` loads this module.
"""

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

EXAMPLES_KEPT = 10


@dataclass
class ReadReport:
    """What a read kept and skipped: skip reasons counted, the first few skipped lines kept with file and line."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    unit: str = "conversations"

    def skip(self, where: str, reason: str, detail: str = "") -> None:
        """Count `reason` (a short, fixed text: the counts group by it); `detail` goes into the example only."""
        self.skipped[reason] += 1
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(f"{where}: {reason}" + (f": {detail}" if detail else ""))

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict:
        """JSON-ready, for a run's summary.json."""
        return vars(self) | {"skipped": dict(self.skipped)}

    def summary(self) -> str:
        skipped = ", ".join(f"{reason} {count}" for reason, count in self.skipped.most_common()) or "none"
        kept = f"{self.kept:,} of {self.read:,} {self.unit} kept"
        if self.unit == "conversations":
            kept += f" ({self.truncated:,} cut from the left)"
        return f"{kept}; skipped: {skipped}"


class JsonLine(NamedTuple):
    path: Path
    line: int  # 1-based
    value: object  # the parsed JSON

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def read_jsonl(paths: Iterable[Path], report: ReadReport, limit: int | None = None) -> Iterator[JsonLine]:
    """Every non-blank line of the files, parsed, counted in `report.read`; a line that is not UTF-8 JSON is
    skipped and counted. `limit` caps each file by what the caller keeps (counted in `report.kept`), so every file
    of a mix is represented."""
    for path in paths:
        kept_before = report.kept
        with Path(path).open("rb") as lines:  # bytes: a line that is not UTF-8 is one skipped line, not a crash
            for number, raw in enumerate(lines, start=1):
                if limit is not None and report.kept - kept_before >= limit:
                    break
                if not raw.strip():
                    continue
                report.read += 1
                where = f"{path}:{number}"
                try:
                    value = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as error:
                    detail = f"byte 0x{raw[error.start]:02x} at byte offset {error.start}"
                    report.skip(where, "malformed line (UnicodeDecodeError)", detail)
                    continue
                except json.JSONDecodeError as error:
                    report.skip(where, "malformed line (JSONDecodeError)", f"{error.msg} at column {error.colno}")
                    continue
                yield JsonLine(Path(path), number, value)
