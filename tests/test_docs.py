"""The user-facing docs stay true to the stored artefacts and to the tree.

- Every relative link in README.md, docs/, benchmarks/ and experiments/ markdown points at a file or folder that
  exists.
- Every source marker `<!-- src: PATH#KEY -->` resolves: PATH is a JSON file of the repository, KEY a dotted path into
  it (`a.b.0.c`; a list item may be picked by its fields, `cases[path=naive,T=8192]`, which must match exactly one),
  and the last number written before the marker on its line equals that value at the precision it is written with.
  A marker may scale the value first: `<!-- src: PATH#KEY *100 -->` (a fraction written as a percentage).
- In the pages a user reads (README.md, docs/*.md, benchmarks/*.md, experiments/README.md and the results index;
  not docs/history/, which keeps the past as written, nor a results.md rendered from its own JSON) every
  percentage, ratio (`×`) and `±` figure outside code carries a marker on its line, so no hand-copied number can
  drift from its file.
- README.md stays a user's page: at most 10 kB, no commit hashes, no machine paths.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md")),
         *sorted((ROOT / "experiments").rglob("*.md"))]
RESULT_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.md")),
                ROOT / "experiments" / "README.md", ROOT / "experiments" / "results" / "README.md"]
MARKER = re.compile(r"<!--\s*src:\s*(?P<path>[^#\s]+)#(?P<key>.+?)(?:\s+\*(?P<scale>[0-9.]+))?\s*-->")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
NUMBER = re.compile(r"[-+−]?\d[\d,]*(?:\.\d+)?")
RESULT_FIGURE = re.compile(r"\d(?:[\d,]*\.?\d*)\s*(?:%|×)|±\s*\d")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks, with inline code removed."""
    out, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, re.sub(r"`[^`]*`", "", line)))
    return out


def resolve(data: Any, key: str) -> Any:
    for segment in re.split(r"\.(?![^\[]*\])", key):  # dots inside [field=value] are not separators
        pick = re.fullmatch(r"(?P<name>[^\[]*)\[(?P<conditions>[^\]]+)\]", segment)
        if pick:
            items = data[pick["name"]] if pick["name"] else data
            # A comma starts a new condition only before `name=` (values may hold commas: "V=151,665").
            conditions = dict(c.split("=", 1) for c in re.split(r",(?=[\w.]+=)", pick["conditions"]))
            matches = [item for item in items if all(str(item.get(k)) == v for k, v in conditions.items())]
            assert len(matches) == 1, f"{segment!r} matches {len(matches)} items"
            data = matches[0]
        elif isinstance(data, list):
            data = data[int(segment)]
        else:
            data = data[segment]
    return data


def test_relative_links_point_at_files_that_exist():
    broken = []
    for page in PAGES:
        for number, line in _prose_lines(page):
            for link in LINK.finditer(line):
                target = link["target"].split("#")[0]
                if not target or re.match(r"^[a-z]+:", target):
                    continue
                if not (page.parent / target).exists():
                    broken.append(f"{page.relative_to(ROOT)}:{number}: {link['target']}")
    assert not broken, "\n".join(broken)


def test_every_source_marker_resolves_to_the_number_written_before_it():
    seen, wrong = 0, []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            if line.count("<!-- src:") != len(MARKER.findall(line)):
                wrong.append(f"{page.relative_to(ROOT)}:{number}: a source marker that does not parse")
            for marker in MARKER.finditer(line):
                seen += 1
                where = f"{page.relative_to(ROOT)}:{number}"
                source = ROOT / marker["path"]
                if not source.is_file():
                    wrong.append(f"{where}: no file {marker['path']}")
                    continue
                try:
                    value = float(resolve(json.loads(source.read_text()), marker["key"]))
                except (KeyError, IndexError, TypeError, ValueError, AssertionError) as exc:
                    wrong.append(f"{where}: {marker['key']} not in {marker['path']} ({exc})")
                    continue
                value *= float(marker["scale"] or 1)
                before = re.sub(r"<!--.*?-->", "", line[:marker.start()])
                numbers = NUMBER.findall(before)
                if not numbers:
                    wrong.append(f"{where}: no number before the marker")
                    continue
                written = numbers[-1].replace(",", "").replace("−", "-")
                decimals = len(written.split(".")[1]) if "." in written else 0
                if abs(abs(value) - abs(float(written))) > 0.5 * 10 ** -decimals + 1e-12:
                    wrong.append(f"{where}: writes {written}, {marker['path']}#{marker['key']} is {value:.6g}")
    assert seen > 0 and not wrong, "\n".join(wrong)


@pytest.mark.parametrize("page", RESULT_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_result_figures_carry_a_source_marker(page):
    unmarked = [f"{number}: {line.strip()}" for number, line in _prose_lines(page)
                if RESULT_FIGURE.search(re.sub(r"<!--.*?-->", "", line)) and not MARKER.search(line)]
    assert not unmarked, "figures without a source marker:\n" + "\n".join(unmarked)


def test_the_readme_is_a_users_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 10_000, f"README.md is {len(text.encode())} bytes"
    assert not re.search(r"(?<![\w/])[0-9a-f]{7,40}(?![\w/])", re.sub(r"<!--.*?-->", "", text)), "a commit hash"
    assert not re.search(r"/(?:work|root|home|tmp)/", text), "a machine path"


def test_stored_artefacts_carry_no_machine_path():
    machine_path = re.compile(r"(?<![\w.$])/(?:root|home|work|tmp|Users)/")
    found = [str(p.relative_to(ROOT)) for base in ("experiments/results", "benchmarks/results")
             for p in sorted((ROOT / base).rglob("*")) if p.is_file() and p.suffix in (".json", ".yaml", ".md")
             and machine_path.search(p.read_text())]
    assert not found, f"machine paths in {found}"
