"""The offline site builder (scripts/build_site.py) on a tiny processed notebook: what the browser test checks in a
real browser, checked here on the HTML (fast, in the default run)."""
import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")   # absent on the GPU machines, where make gpu runs `pytest tests -m gpu`
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output, new_raw_cell  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_site", ROOT / "scripts" / "build_site.py")
build_site = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_site)

INFO = build_site.SiteInfo(title="course", repo_url="https://github.com/me/course", branch="main",
                           docs_url="https://me.github.io/course/")
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
SIDEBAR = """website:
  sidebar:
    contents:
      - index.ipynb
      - section: "Part 0 · Basics"
        contents:
          - 01_first.ipynb
"""


def processed_notebook(title, output_file, cells):
    "A notebook as nbdev's processing leaves it: the frontmatter raw cell first."
    nb = new_notebook()                       # (new_notebook(cells=...) would validate, and refuse execnb's timing)
    nb.cells = [new_raw_cell(f"---\ntitle: '{title}'\ndescription: 'The `{title}` page'\noutput-file: {output_file}\n---\n"),
                *cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    return nb


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    proc, out = tmp_path_factory.mktemp("proc"), tmp_path_factory.mktemp("site") / "_site"
    timed = new_code_cell("x = 1", execution_count=1)
    timed.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00+00:00", "total": 0.0004}  # as execnb writes it
    box = new_code_cell('#| echo: false\n#| exec_doc: true\nshow_box()', execution_count=2,
                        outputs=[new_output("execute_result", {"text/html": '<div class="box">BOX</div>', "text/plain": "box"},
                                            execution_count=2)])
    first = processed_notebook("First", "first.html", [
        new_markdown_cell(f"[![Open In Colab]({build_site.COLAB_BADGE})](https://colab.research.google.com/x)\n\n"
                          "## The math\n\nInline $p_{ij} = q_i k_j$ and display $$\\sum_j w_{ij} = 1.$$\n\n"
                          "See [the index](index.ipynb), [`helper`](https://me.github.io/course/first.html#helper), "
                          "[`_private_kernel`](https://me.github.io/course/first.html#_private_kernel) and [above](#The-math)."),
        new_code_cell("", execution_count=None),                                    # an exported cell, source removed by nbdev
        timed, box,
        new_code_cell("#| hide\nsecret()", execution_count=3),
        new_code_cell("#| echo: false\n#| output: asis\nshow_doc(helper)", execution_count=4, outputs=[new_output(
            "execute_result", {"text/markdown": "---\n\n[source](https://github.com/me/course/blob/main/x.py#L1)"
                               "{target=\"_blank\" style=\"float:right; font-size:smaller\"}\n\n### helper\n\n> helper (x)",
                               "text/plain": "helper"}, execution_count=4)]),
        new_code_cell("plot()", execution_count=5, outputs=[new_output("display_data", {"image/png": PNG, "text/plain": "<Figure>"})]),
    ])
    index = processed_notebook("course", "index.html", [new_markdown_cell("Chapters: [First](01_first.ipynb).")])
    (proc / "01_first.ipynb").write_text(json.dumps(first))      # nbformat.write would refuse the timing
    (proc / "index.ipynb").write_text(json.dumps(index))
    (proc / "sidebar.yml").write_text(SIDEBAR)
    pages = build_site.build_site(proc, out, INFO)
    return out, {p.name: p.read_text() for p in pages}


def test_pages_are_named_like_quartos(site):
    out, pages = site
    assert sorted(pages) == ["first.html", "index.html"]
    assert (out / "mathjax" / "MathJax.js").exists() and (out / "assets" / "colab-badge.svg").exists()


def test_nothing_is_loaded_from_the_network(site):
    for name, page in site[1].items():
        assert not re.search(r'<script[^>]+src="(https?:)?//', page), name
        assert not re.search(r'<link[^>]+href="(https?:)?//', page), name
        assert not re.search(r'<img[^>]+src="(https?:)?//', page), name
        assert '<script src="mathjax/MathJax.js' in page


def test_math_is_left_to_mathjax_and_figures_are_embedded(site):
    page = site[1]["first.html"]
    assert "$p_{ij} = q_i k_j$" in page and "$$\\sum_j w_{ij} = 1.$$" in page
    assert 'src="data:image/png;base64,' in page


def test_directives_prompts_and_hidden_code_are_gone(site):
    page = site[1]["first.html"].split("<body", 1)[1]               # (the inlined CSS mentions "Out[" prompts)
    assert "#|" not in page and "In&nbsp;[" not in page and "Out[" not in page
    assert "secret()" not in page and "show_box()" not in page and "show_doc(helper)" not in page
    assert '<div class="box">BOX</div>' in page                    # the echo: false cell keeps its output
    assert "{target=" not in page and 'class="lmc-source" href="https://github.com/me/course/blob/main/x.py#L1"' in page


def test_links_badge_sidebar_and_source(site):
    page = site[1]["first.html"]
    assert 'href="index.html"' in page
    assert 'href="first.html#helper"' in page                       # nbdev's docs link, now local
    assert "_private_kernel</code>" in page and "#_private_kernel" not in page   # no such anchor: code, not a link
    assert 'href="first.html#the-math"' in page and '<h2 id="the-math"' in page and 'href="#The-math"' not in page
    assert 'src="assets/colab-badge.svg"' in page and 'alt="Open In Colab"' in page
    nav = re.search(r"<nav.*?</nav>", page, re.S).group(0)
    assert "Part 0 · Basics" in nav and re.search(r'<a class="lmc-current" href="first.html">First</a>', nav)
    assert 'href="https://github.com/me/course/blob/main/nbs/01_first.ipynb">View source</a>' in page
    assert 'href="first.html"' in site[1]["index.html"]


def test_execution_timing_is_made_valid():
    nb = new_notebook()
    nb.cells = [new_code_cell("x")]
    nb.cells[0].metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00+00:00", "total": 0.1}
    with pytest.raises(nbformat.ValidationError):
        nbformat.validate(nb)
    build_site.valid_execution_metadata(nb)
    nbformat.validate(nb)
    assert nb.cells[0].metadata["execution"] == {"iopub.execute_input": "2026-01-01T00:00:00+00:00"}


def test_directives_and_ids(tmp_path):
    assert build_site.split_directives("#| echo: false\n#|hide\nx = 1\n#| not a directive") == (
        {"echo": "false", "hide": ""}, "x = 1\n#| not a directive")
    assert build_site.pandoc_id("Block sizes, launchers and autograd") == "block-sizes-launchers-and-autograd"
    assert build_site.pandoc_id("Transformer.flops_per_token") == "transformer.flops_per_token"
    with pytest.raises(ValueError, match="neither a notebook nor a section"):
        p = tmp_path / "sidebar.yml"
        p.write_text("website:\n  sidebar:\n    contents:\n      - {title: x}\n")
        build_site.read_sidebar(p)


def test_project_sidebar_names_every_notebook():
    "Every notebook in nbs/ is in nbs/sidebar.yml (the lead adds new chapters there), and every name there exists."
    named = build_site.sidebar_names(build_site.read_sidebar(ROOT / "nbs" / "sidebar.yml"))
    present = {p.name for p in (ROOT / "nbs").glob("*.ipynb")}
    assert set(named) == present, {"missing from sidebar.yml": sorted(present - set(named)),
                                   "not in nbs/": sorted(set(named) - present)}


def test_import_cells_hold_only_imports():
    """nbdev's docs step (`make docs`, Quarto or not) executes, out of context, every cell that contains an import:
    such a cell must hold only imports (the Colab install cell is self-contained), or `make course` fails there."""
    mixed = []
    for path in sorted((ROOT / "nbs").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            src = "".join(cell["source"])
            if cell["cell_type"] != "code" or "google.colab" in src or "nbdev_export()" in src:   # nbdev skips the latter
                continue
            if re.search(r"^#\|\s*(export|exports|exporti|exec_doc|eval:\s*false)", src, re.M):
                continue
            tree = ast.parse("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))))
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree)) and \
                    any(not isinstance(n, (ast.Import, ast.ImportFrom)) for n in tree.body):
                mixed.append(f"{path.name} cell {i}: {src.splitlines()[0][:60]}")
    assert not mixed, "put the imports in a cell of their own: " + "; ".join(mixed)
