"""README figures cannot drift from their results files.

Every ``benchmarks/results/...`` file the README cites must exist: a full path anywhere, and a bare
backticked file name (`perf_cpu.md`) in a paragraph that runs a benchmark (``benchmarks/bench_*``);
elsewhere a bare name counts as a citation only when the results file exists (`report.json` of
``kalm-store eval`` is not one). Every bold figure in a README table must appear in a results file
cited for that table: in the table's own rows or in the prose between the previous heading and the
table. The check is general (any section, any table), so sections added later are held to it too.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
_FULL = re.compile(r"benchmarks/results/([\w.-]+\.(?:md|json|png|csv))\b")
_BARE = re.compile(r"`([\w.-]+\.(?:md|json|png|csv))`")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def cited_files(text: str, results: Path = RESULTS) -> list[str]:
    """Names of the results files cited in ``text``, in order, without repeats (see the module docstring)."""
    names = list(_FULL.findall(text))
    for paragraph in re.split(r"\n\s*\n", text):
        runs_a_benchmark = "benchmarks/bench_" in paragraph
        names += [n for n in _BARE.findall(paragraph) if runs_a_benchmark or (results / n).is_file()]
    return list(dict.fromkeys(names))


def tables(text: str) -> list[tuple[str, list[str]]]:
    """(prose before the table since the last heading, the table's lines) for every Markdown table."""
    out, prose, rows = [], [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append(line)
            continue
        if rows:
            out.append(("\n".join(prose), rows))
            prose, rows = [], []
        prose = [] if line.startswith("#") else prose + [line]
    return out


def figures(cell: str) -> list[str]:
    """The numbers of each bold span: '**40,283 cases**' -> ['40283']."""
    return [n.replace(",", "") for bold in re.findall(r"\*\*(.+?)\*\*", cell) for n in _NUMBER.findall(bold)]


def holds(content: str, number: str) -> bool:
    """``number`` appears in ``content`` as a whole number (thousands separators ignored)."""
    flat = re.sub(r"(?<=\d),(?=\d{3})", "", content)
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d]|\.\d)", flat) is not None


def test_every_cited_results_file_exists():
    text = README.read_text("utf-8")
    names = cited_files(text)
    assert len(names) >= 10, names  # the README cites its results; a parser that finds none is broken
    missing = [n for n in names if not (RESULTS / n).is_file()]
    assert not missing, f"README cites results files that do not exist: {missing}"


def test_each_cited_markdown_result_names_its_command():
    for name in cited_files(README.read_text("utf-8")):
        if name.endswith(".md"):
            assert re.search(r"Command: `[^`]+`", (RESULTS / name).read_text("utf-8")), name


def test_every_bold_table_figure_is_in_its_cited_file():
    checked, problems = 0, []
    for prose, rows in tables(README.read_text("utf-8")):
        for row in rows:
            numbers = figures(row)
            if not numbers:
                continue
            sources = [n for n in cited_files(row) + cited_files(prose) if n.endswith((".md", ".json"))]
            if not sources:
                problems.append(f"no results file cited for the table row {row[:80]!r}")
                continue
            contents = [(RESULTS / n).read_text("utf-8") for n in sources if (RESULTS / n).is_file()]
            for number in numbers:
                checked += 1
                if not any(holds(c, number) for c in contents):
                    problems.append(f"{number} (row {row[:60]!r}) is in none of {sources}")
    assert checked >= 3, checked  # the README's tables do carry bold figures
    assert not problems, "\n".join(problems)


def test_the_checks_catch_drift():
    """The parsers on a made-up README: a figure not in its file, a missing file, a row without a source."""
    assert cited_files("see `perf_cpu.md` and benchmarks/results/x_y.json, and `report.json`") == \
        ["x_y.json", "perf_cpu.md"]  # report.json is no results file, and nothing here runs a benchmark
    assert cited_files("`python benchmarks/bench_x.py` (`x_new.md`)") == ["x_new.md"]  # must then exist
    assert figures("| 4096 | **76.0x** | **40,283 cases** |") == ["76.0", "40283"]
    assert holds("| 4 | 76.0x |", "76.0") and not holds("| 4 | 176.05x |", "76.0") and holds("40,283", "40283")
    assert not holds("| 12.5x |", "2.5")
    (prose, rows), = tables("## A\ntext `a.md`\n\n| x | y |\n|---|---|\n| 1 | **2** |\n\n## B\n")
    assert "a.md" in prose and rows[-1] == "| 1 | **2** |"
