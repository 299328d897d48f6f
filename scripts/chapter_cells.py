"""The two generated cells every chapter notebook starts with, right after its `#| default_exp` cell:

1. the Colab cell: on Colab (and only there) it installs the package from the repository, with the `colab`
   extra (nbdev, for the chapters' `show_doc` cells) and without touching Colab's own torch and triton;
2. the verified box: `lmcourse.verified.verified_box("<module>")`, re-run by nbdev whenever the docs are built
   (`#| exec_doc`), shown without its code (`#| echo: false`).

`python scripts/chapter_cells.py` checks every notebook in nbs/ and lists what differs (exit code 1 if anything does);
`python scripts/chapter_cells.py --write` makes every notebook conform; `--outputs` stores each box cell's output as
executing that cell gives it, leaving every other cell as it is (then run nbdev-clean).
tests/test_chapter_cells.py runs the check, so a new chapter cannot drift.
"""
import argparse
import json
import re
import secrets
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLAB_MARK = '"google.colab" in sys.modules'
BOX_IMPORT = "from lmcourse.verified import verified_box"


def colab_requirement(pyproject: Path = ROOT / "pyproject.toml") -> str:
    "`lmcourse[colab] @ git+<repository>@<branch>`, from pyproject.toml's project URL and nbdev branch."
    cfg = tomllib.loads(pyproject.read_text())
    repo = cfg["project"]["urls"]["Repository"].rstrip("/")
    return f"{cfg['project']['name']}[colab] @ git+{repo}@{cfg['tool']['nbdev']['branch']}"


def colab_source(requirement: str | None = None) -> str:
    return ("#| hide\n"
            "import sys, subprocess\n"
            f"if {COLAB_MARK}:\n"
            f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "{requirement or colab_requirement()}"], check=True)')


def box_source(module: str) -> str:
    return f'#| echo: false\n#| exec_doc\n{BOX_IMPORT}\nverified_box("{module}")'


def _source(cell) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def default_exp(nb: dict) -> tuple[int, str] | None:
    "(index, module) of the notebook's `#| default_exp` cell, or None (the index page has none)."
    for i, cell in enumerate(nb["cells"]):
        m = re.search(r"^#\|\s*default_exp\s+([\w.]+)", _source(cell), re.M) if cell["cell_type"] == "code" else None
        if m: return i, m.group(1).split(".")[0]
    return None


def problems(nb: dict) -> list[str]:
    "What differs from the two standard cells right after `#| default_exp` (empty when the notebook conforms)."
    found = default_exp(nb)
    if found is None: return []
    i, module = found
    cells = nb["cells"]
    expected = [("the Colab cell", colab_source()), ("the verified-box cell", box_source(module))]
    out = []
    for offset, (what, source) in enumerate(expected, start=1):
        cell = cells[i + offset] if i + offset < len(cells) else None
        if cell is None or cell["cell_type"] != "code" or _source(cell) != source:
            got = "nothing" if cell is None else f"{cell['cell_type']} cell {_source(cell)[:80]!r}"
            out.append(f"cell {i + offset} should be {what}, found {got}")
    marks = [n for n, c in enumerate(cells) if c["cell_type"] == "code" and (COLAB_MARK in _source(c) or BOX_IMPORT in _source(c))]
    if len(marks) > 2: out.append(f"more than one Colab or verified-box cell (cells {marks})")
    return out


def conform(nb: dict) -> bool:
    "Make `nb` start with the two standard cells (reusing the existing ones' ids); True if anything changed."
    found = default_exp(nb)
    if found is None or not problems(nb): return False
    i, module = found
    cells = nb["cells"]
    old = {mark: next((c for c in cells if c["cell_type"] == "code" and mark in _source(c)), None) for mark in (COLAB_MARK, BOX_IMPORT)}
    rest = [c for c in cells[i + 1:] if c not in old.values()]
    new = []
    for mark, source in ((COLAB_MARK, colab_source()), (BOX_IMPORT, box_source(module))):
        cell = old[mark] or {"cell_type": "code", "execution_count": None, "id": secrets.token_hex(4), "metadata": {},
                             "outputs": [], "source": []}
        if _source(cell) != source: cell.update(source=source.splitlines(True), outputs=[], execution_count=None)
        new.append(cell)
    nb["cells"] = cells[:i + 1] + new + rest
    return True


def box_outputs(nb: dict) -> bool:
    "Store the verified-box cell's output, computed here as executing the cell would; True if it changed."
    found = default_exp(nb)
    if found is None: return False
    from lmcourse.verified import verified_box
    box = verified_box(found[1])
    outputs = [{"data": {"text/html": box._repr_html_().splitlines(True), "text/plain": [repr(box)]},
                "execution_count": None, "metadata": {}, "output_type": "execute_result"}]
    cell = next(c for c in nb["cells"] if c["cell_type"] == "code" and BOX_IMPORT in _source(c))
    if cell.get("outputs") == outputs: return False
    cell["outputs"] = outputs
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the notebooks that differ")
    parser.add_argument("--outputs", action="store_true", help="store the box cells' outputs (after --write)")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in nbs/")
    args = parser.parse_args(argv)
    bad = 0
    for path in args.notebooks or sorted((ROOT / "nbs").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        changed = args.write and conform(nb)
        changed = (args.outputs and not problems(nb) and box_outputs(nb)) or changed
        if changed:
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            print(f"rewrote {path.name}: run nbdev-clean")
        for p in problems(nb):
            bad += 1
            print(f"{path.name}: {p}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
