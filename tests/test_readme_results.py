"""Measured claims in the README link their raw output: a table of measured numbers names a file under
``docs/results/`` in the lines just before it, and every such link points to a committed file."""
import re
from typing import List

from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
RESULT_LINK = re.compile(r"\((docs/results/[^)\s]+)\)")
NUMBER_CELL = re.compile(r"^[\d.,]+\s*%?$")  # a cell that is only a measurement: 1,015 | 1.79 | 97.10 %
LINES_BEFORE_TABLE = 8


def measured_table_starts(lines: List[str]) -> List[int]:
    """Line indices where a markdown table with at least one purely numeric cell begins."""
    starts, start = [], None
    for index, line in enumerate(lines + [""]):
        if line.startswith("|"):
            start = index if start is None else start
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if any(NUMBER_CELL.match(cell) for cell in cells) and start not in starts:
                starts.append(start)
        else:
            start = None
    return starts


def test_every_results_link_points_to_a_committed_file() -> None:
    links = RESULT_LINK.findall(README.read_text(encoding="utf-8"))
    missing = [link for link in links if not (REPO_ROOT / link).is_file()]
    assert not missing, f"README links raw output that does not exist: {missing}"


def test_every_measured_table_links_its_raw_output() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    unbacked = [
        f"README.md line {start + 1}: {lines[start]}"
        for start in measured_table_starts(lines)
        if not RESULT_LINK.search("\n".join(lines[max(0, start - LINES_BEFORE_TABLE):start]))
    ]
    assert not unbacked, "measured tables without a docs/results/ link just before them:\n" + "\n".join(unbacked)


def test_measured_table_detection() -> None:
    """The detector sees the old benchmark table's rows as measurements and an option table as none."""
    assert measured_table_starts(["text", "| system | x stock |", "|---|---|", "| fast | 1.79 |", "after"]) == [1]
    assert measured_table_starts(["| option | values |", "|---|---|", "| `--beam` | `5` |"]) == []
