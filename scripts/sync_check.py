"""`make sync-check`: the package must be what the notebooks export, and the notebooks what `nbdev-clean` leaves.

Runs `nbdev-export` and `nbdev-clean` on a copy of the checkout (the working tree is left as it is, committed or
not) and says precisely what they would change: for `lmcourse/`, each file they would create, change or delete,
with the start of its diff; for `nbs/`, each cell whose execution count, metadata or outputs `nbdev-clean` would
rewrite. Exit status 1 when anything would change; fix it with `make export` (nbdev-export, then nbdev-clean).

    python scripts/sync_check.py [--nbdev-bin DIR]
"""
import argparse
import difflib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIFF_LINES = 30   # lines of each file's diff to show


def snapshot(directory: Path) -> dict[str, bytes]:
    "Every file under `directory` (but caches) by relative path."
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.name != ".last_checked"}


def package_changes(before: dict, after: dict) -> list[str]:
    "What nbdev-export would do to lmcourse/, file by file."
    lines = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"  lmcourse/{name}: would be created by nbdev-export (a notebook exports a module not in the package)")
            continue
        if new is None:
            lines.append(f"  lmcourse/{name}: is not exported by any notebook (nbdev-export would not write it)")
            continue
        diff = list(difflib.unified_diff(old.decode().splitlines(), new.decode().splitlines(),
                                         f"lmcourse/{name} (now)", f"lmcourse/{name} (exported)", lineterm="", n=1))
        lines.append(f"  lmcourse/{name}: differs from what the notebooks export ({len(diff)} diff lines):")
        lines += ["    " + line for line in diff[:DIFF_LINES]]
        if len(diff) > DIFF_LINES:
            lines.append(f"    ... {len(diff) - DIFF_LINES} more lines")
    return lines


def _describe(old, new) -> str:
    return f"{json.dumps(old)[:80]} -> {json.dumps(new)[:80]}"


def notebook_changes(name: str, old_text: bytes, new_text: bytes) -> list[str]:
    "What nbdev-clean would rewrite in one notebook, cell by cell."
    old, new = json.loads(old_text), json.loads(new_text)
    found = []
    for key in sorted(set(old.get("metadata", {})) | set(new.get("metadata", {}))):
        if old["metadata"].get(key) != new["metadata"].get(key):
            found.append(f"notebook metadata {key!r}: {_describe(old['metadata'].get(key), new['metadata'].get(key))}")
    if len(old["cells"]) != len(new["cells"]):
        found.append(f"{len(old['cells'])} cells become {len(new['cells'])}")
    for i, (a, b) in enumerate(zip(old["cells"], new["cells"])):
        where = f"cell {i} (id {a.get('id', '?')}, {a['cell_type']})"
        for key in sorted(set(a) | set(b)):
            if key == "outputs" and a.get(key) != b.get(key):
                found.append(f"{where}: output metadata or execution counts inside outputs would be cleaned")
            elif key != "outputs" and a.get(key) != b.get(key):
                found.append(f"{where}: {key} {_describe(a.get(key), b.get(key))}")
    if not found:
        old_lines, new_lines = old_text.decode().splitlines(), new_text.decode().splitlines()
        line = next((i for i, (x, y) in enumerate(zip(old_lines, new_lines)) if x != y), min(len(old_lines), len(new_lines)))
        shown = lambda lines: json.dumps(lines[line][:60]) if line < len(lines) else "end of file"
        found.append(f"only the JSON formatting would change, from line {line + 1}: {shown(old_lines)} -> {shown(new_lines)}")
    return [f"  nbs/{name}: {line}" for line in found]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nbdev-bin", type=Path, default=Path(sys.executable).parent,
                        help="directory holding nbdev-export and nbdev-clean (default: next to this Python)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        shutil.copy2(ROOT / "pyproject.toml", copy / "pyproject.toml")
        for folder in ("lmcourse", "nbs"):
            shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        for tool in ("nbdev-export", "nbdev-clean"):
            done = subprocess.run([str(args.nbdev_bin / tool)], cwd=copy, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"sync-check: {tool} failed:\n{done.stdout}{done.stderr}")
                return 1
        package = package_changes(snapshot(ROOT / "lmcourse"), snapshot(copy / "lmcourse"))
        before, after = snapshot(ROOT / "nbs"), snapshot(copy / "nbs")
        notebooks = [line for name in sorted(before) if name.endswith(".ipynb") and before[name] != after.get(name)
                     for line in notebook_changes(name, before[name], after[name])]
    if package:
        print("sync-check: the package is out of sync with the notebooks — nbdev-export would change:", *package, sep="\n")
    if notebooks:
        print("sync-check: notebooks are not clean — nbdev-clean would change:", *notebooks, sep="\n")
    if package or notebooks:
        print("Fix: `make export` (nbdev-export, then nbdev-clean), check the result, commit it.")
        return 1
    print("sync-check: package and notebooks in sync, notebooks clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
