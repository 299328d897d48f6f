"""Every chapter starts with the same two generated cells (scripts/chapter_cells.py): the Colab install cell and the
verified box. And the Colab install is right for Colab: the repository's URL and branch, an extra that exists, and
requirements that Colab's preinstalled torch and triton satisfy (checked with pip's resolver in a dry run)."""
import copy
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("chapter_cells", ROOT / "scripts" / "chapter_cells.py")
chapter_cells = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chapter_cells)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# A torch / triton pair that Colab had preinstalled in 2025 (torch 2.6 pins triton 3.2); newer runtimes have newer
# ones. The package must accept them as they are, or pip would replace Colab's CUDA build of torch.
COLAB_TORCH, COLAB_TRITON = "2.6.0", "3.2.0"


@pytest.mark.parametrize("path", sorted((ROOT / "nbs").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_chapter_has_the_standard_cells(path):
    problems = chapter_cells.problems(json.loads(path.read_text()))
    assert not problems, f"{path.name}: {problems} — run `python scripts/chapter_cells.py --write --outputs`"


def test_conform_fixes_a_drifted_notebook_and_keeps_ids():
    nb = json.loads((ROOT / "nbs" / "00a_model.ipynb").read_text())
    i, module = chapter_cells.default_exp(nb)
    drifted = copy.deepcopy(nb)
    old_colab = drifted["cells"][i + 1]
    old_colab["source"] = old_colab["source"][:-1] + ['    subprocess.run(["pip", "install", "lmcourse"])']
    del drifted["cells"][i + 2]                                    # the box cell is gone
    assert len(chapter_cells.problems(drifted)) == 2
    assert chapter_cells.conform(drifted)
    assert chapter_cells.problems(drifted) == []
    assert drifted["cells"][i + 1]["id"] == old_colab["id"]
    assert ["".join(c["source"]) for c in drifted["cells"]] == ["".join(c["source"]) for c in nb["cells"]]
    index = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    assert chapter_cells.default_exp(index) is None and not chapter_cells.conform(index)


def test_colab_requirement_names_this_repository_and_an_extra_that_exists():
    req = Requirement(chapter_cells.colab_requirement())
    assert req.name == PYPROJECT["project"]["name"]
    assert req.url == f"git+{PYPROJECT['project']['urls']['Repository']}@{PYPROJECT['tool']['nbdev']['branch']}"
    assert req.extras == {"colab"}
    colab = [Requirement(r).name for r in PYPROJECT["project"]["optional-dependencies"]["colab"]]
    assert "nbdev" in colab                                         # the chapters' show_doc cells import it
    assert not {"torch", "triton", "jupyterlab", "ipykernel"} & set(colab)   # Colab has these; never reinstall them


def test_colab_torch_and_triton_satisfy_the_requirements():
    deps = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    assert deps["torch"].specifier.contains(COLAB_TORCH), deps["torch"]
    assert deps["triton"].specifier.contains(COLAB_TRITON), deps["triton"]


def test_colab_install_resolves_without_touching_torch(tmp_path):
    """pip's resolver, in a dry run, on the Colab cell's requirement with the repository replaced by this checkout:
    in an environment that has torch and triton (as Colab does), it installs the package and nothing of torch's.
    Offline (`--no-index`): anything the requirement needed beyond what is installed would make it fail."""
    requirement = chapter_cells.colab_requirement().split(" @ ")[0] + f" @ {ROOT.as_uri()}"
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--no-build-isolation",
                        "--report", str(report), requirement],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    installed = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert "lmcourse" in installed
    assert not {n for n in installed if n in ("torch", "triton") or n.startswith("nvidia-")}, installed


def test_index_page_shows_the_same_install_command():
    index = "".join("".join(c["source"]) for c in json.loads((ROOT / "nbs" / "index.ipynb").read_text())["cells"])
    assert f'pip install "{chapter_cells.colab_requirement()}"' in index
