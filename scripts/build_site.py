"""Build the course's site without Quarto: README.md, the processed notebooks (`_proc/`) and a static HTML site (`_site/`).

`make docs` renders the published site with Quarto (`nbdev-docs`) when `quarto` is on the PATH. Quarto cannot be
installed offline, so otherwise it runs this script, which builds a site for reading offline from the same
processed notebooks with `nbconvert`:

- pages in the order and parts of `nbs/sidebar.yml`, a sidebar on every page, `index.html` the chapter index;
- math typeset in the browser by a local MathJax (from the `jupyter-server-mathjax` package): no CDN, works from
  `file://` without a network;
- figures embedded (they are base64 outputs of the notebooks); nbdev directives (`#| export`, `#| echo: false`, ...)
  applied and removed, no `In [ ]:` prompts;
- links between chapters, and nbdev's links to the published docs, pointing at the local pages; the Colab badge
  drawn from a local image (the real one is remote); "View source" and "Report an issue" links on every page.

Usage: `python scripts/build_site.py [--out _site] [--no-stage]` (`--no-stage` reuses `_proc/` as it is).
Open `_site/index.html` in a browser.
"""
import argparse
import datetime
import html
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import yaml
from nbconvert.exporters import HTMLExporter
from nbconvert.filters.markdown_mistune import markdown2html_mistune
from nbconvert.preprocessors import TagRemovePreprocessor
from traitlets.config import Config

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "site"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


@dataclass
class SiteInfo:
    "What a page needs to know about the project: its title, repository, branch and published docs URL."
    title: str
    repo_url: str           # https://github.com/<user>/<repo>
    branch: str
    docs_url: str           # the published (Quarto) site, whose links nbdev writes into the notebooks
    nbs_dir: str = "nbs"    # the notebooks' folder in the repository, for "View source"


def site_info(cfg) -> SiteInfo:
    "The `SiteInfo` of an nbdev config (`nbdev.config.get_config()`)."
    return SiteInfo(title=cfg.title, repo_url=cfg.git_url.rstrip("/"), branch=cfg.branch,
                    docs_url=(cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/")).rstrip("/") + "/",
                    nbs_dir=cfg.nbs_path.relative_to(cfg.config_path).as_posix())


# ---- README and the processed notebooks (what nbdev-readme / nbdev-proc-nbs do, without installing Quarto) ----

def write_readme(cfg) -> Path:
    "README.md from nbs/index.ipynb's markdown cells, with links to chapters pointing into nbs/."
    nb = nbformat.read(cfg.nbs_path / cfg.readme_nb, as_version=4)
    text = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    text = re.sub(r"\]\((\w[\w.-]*\.ipynb)\)", r"](nbs/\1)", text)
    path = cfg.config_path / "README.md"
    path.write_text("<!-- generated from nbs/index.ipynb by scripts/build_site.py; edit the notebook -->\n" + text + "\n")
    return path


def stage(cfg) -> Path:
    """Process the notebooks into `_proc/` as `nbdev-docs` does before it calls Quarto.

    nbdev's CLI commands would try to download Quarto first; the functions they call do not. The processing runs
    the notebooks' imports, exported cells, `show_doc` and `#| exec_doc` cells (the verified boxes)."""
    from nbdev.doclinks import _build_modidx
    from nbdev.quarto import nbdev_sidebar, refresh_quarto_yml
    from nbdev.serve import proc_nbs
    refresh_quarto_yml()
    _build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    return proc_nbs(cfg.nbs_path)


# ---- one page ----

_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*(?::\s*(.*?))?\s*$")
_SIDE_TAGS = {("echo", "false"): "remove_input", ("output", "false"): "remove_output", ("include", "false"): "remove_cell"}


def split_directives(source: str) -> tuple[dict[str, str], str]:
    "The leading `#| key: value` lines of a code cell as a dict, and the source without them."
    lines, found = source.splitlines(), {}
    while lines and (m := _DIRECTIVE.match(lines[0])):
        found[m.group(1)] = (m.group(2) or "").strip().lower()
        lines.pop(0)
    return found, "\n".join(lines)


def valid_execution_metadata(nb) -> None:
    """Drop `metadata.execution.total` from every cell.

    execnb (which nbdev uses to run the `show_doc` cells) stores the run time there as a number; nbformat's schema
    allows only (date-time) strings in `execution`, so nbconvert refuses the processed notebooks ("...['execution']
    ['total']: 0.0004 is not of type 'string'"). Quarto does not validate, which is why nbdev never noticed."""
    for cell in nb.cells:
        execution = cell.get("metadata", {}).get("execution")
        if isinstance(execution, dict):
            for key in [k for k, v in execution.items() if not isinstance(v, str)]:
                del execution[key]


_PANDOC_LINK_ATTRS = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)\{[^}]*\}")


def _markdown_output(text: str) -> str:
    "show_doc's markdown for Quarto -> plain markdown: `[source](url){target=... style=...}` loses the pandoc attributes."
    return _PANDOC_LINK_ATTRS.sub(r"[\1](\2)", text)


def prepare(nb) -> tuple[dict, object]:
    """Turn a processed notebook into what nbconvert renders; returns (frontmatter, notebook).

    The frontmatter raw cell (title, description, output-file) is removed; nbdev directives become nbconvert's
    removal tags (`echo: false` hides the code, `output: false` the outputs, `include: false` the cell) and
    are stripped from the shown code; code cells left without source or outputs (exported cells, whose source
    nbdev removes for the docs) are dropped."""
    valid_execution_metadata(nb)
    front = {}
    if nb.cells and nb.cells[0].cell_type == "raw" and nb.cells[0].source.lstrip().startswith("---"):
        front = yaml.safe_load(nb.cells[0].source.strip().strip("-")) or {}
        nb.cells = nb.cells[1:]
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            found, cell.source = split_directives(cell.source)
            tags = set(cell.metadata.get("tags", []))
            tags |= {tag for (k, v), tag in _SIDE_TAGS.items() if found.get(k) == v}
            if "hide" in found: tags.add("remove_cell")
            if not cell.source.strip(): tags.add("remove_input")
            if ("remove_input" in tags or not cell.source.strip()) and not cell.outputs: continue
            for out in cell.outputs:
                if "text/markdown" in out.get("data", {}):
                    out.data["text/markdown"] = _markdown_output(out.data["text/markdown"])
            cell.metadata["tags"] = sorted(tags)
        elif cell.cell_type == "markdown" and not cell.source.strip():
            continue
        cells.append(cell)
    nb.cells = cells
    return front, nb


def exporter() -> HTMLExporter:
    "nbconvert's HTML exporter with the course template: no prompts, nbdev directives applied, images embedded."
    c = Config()
    c.HTMLExporter.template_name = "lab"
    c.HTMLExporter.template_file = "page.html.j2"
    c.HTMLExporter.extra_template_paths = [str(ASSETS)]
    c.HTMLExporter.exclude_input_prompt = True
    c.HTMLExporter.exclude_output_prompt = True
    c.HTMLExporter.embed_images = True
    c.HTMLExporter.anchor_link_text = ""       # headings keep their ids; the (empty) self-links are hidden by the CSS
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_cell_tags = {"remove_cell"}
    c.TagRemovePreprocessor.remove_input_tags = {"remove_input"}
    c.TagRemovePreprocessor.remove_all_outputs_tags = {"remove_output"}
    exp = HTMLExporter(config=c)
    exp.register_preprocessor(TagRemovePreprocessor(config=c), enabled=True)
    return exp


# ---- the sidebar and links between pages ----

def read_sidebar(path: Path) -> list:
    "nbs/sidebar.yml as a list of notebook names and (section title, [notebook names]) pairs."
    contents = (yaml.safe_load(path.read_text()) or {}).get("website", {}).get("sidebar", {}).get("contents", [])
    def entry(e):
        if isinstance(e, str): return e
        if isinstance(e, dict) and "section" in e: return (e["section"], [entry(x) for x in e.get("contents", [])])
        raise ValueError(f"{path}: sidebar entry {e!r} is neither a notebook nor a section")
    return [entry(e) for e in contents]


def sidebar_html(entries: list, pages: dict, current: str) -> str:
    "The sidebar as nested lists; `pages` maps notebook name -> (output file, title); missing pages are skipped."
    def item(e):
        if isinstance(e, tuple):
            inner = "".join(item(x) for x in e[1])
            return f'<li class="lmc-section">{html.escape(e[0])}<ul>{inner}</ul></li>' if inner else ""
        if e not in pages: return ""
        out, title = pages[e]
        cls = ' class="lmc-current"' if e == current else ""
        return f'<li><a href="{out}"{cls}>{html.escape(title)}</a></li>'
    return "<ul>" + "".join(item(e) for e in entries) + "</ul>"


def sidebar_names(entries: list) -> list[str]:
    "Every notebook named in the sidebar, in order."
    return [n for e in entries for n in (sidebar_names(e[1]) if isinstance(e, tuple) else [e])]


def pandoc_id(text: str) -> str:
    "The identifier Quarto (pandoc) gives a heading, which nbdev's links use: `Block sizes, launchers` -> `block-sizes-launchers`."
    ident = re.sub(r"[^\w.-]", "", re.sub(r"[\s-]+", "-", text.strip().lower()))
    return re.sub(r"^[^a-z]+", "", ident) or "section"


def heading_ids(page: str) -> str:
    "nbconvert's heading ids (`The-math`) and their self-links -> Quarto's (`the-math`), so the same links work on both sites."
    fix = lambda m: m.group(1) + pandoc_id(m.group(2).replace("-", " ")) + m.group(3)
    page = re.sub(r'(<h[1-6] id=")([^"]*)(")', fix, page)
    return re.sub(r'(<a class="anchor-link" href="#)([^"]*)(")', fix, page)


def page_anchors(page: str) -> set[str]:
    "Every id and name attribute of a page."
    return set(re.findall(r'\s(?:id|name)="([^"]+)"', page))


_A_HREF = re.compile(r'<a\b([^>]*?)\shref="([^"#]*)(#[^"]*)?"([^>]*)>(.*?)</a>', re.S)


def rewrite_links(page: str, here: str, pages: dict, anchors: dict, info: SiteInfo) -> str:
    """Links on page `here` to notebooks (`00a_model.ipynb#x`), to the published docs (`<docs_url>cog.html#x`) and to
    headings (`#The-math`, as Quarto names them: `#the-math`) -> local pages and anchors;
    the remote Colab badge image -> the local copy (same alt text).

    nbdev links every backticked name it knows, private kernels included, to an anchor that only a `show_doc`
    creates; where the local page has no such anchor the name stays as code without a link."""
    def local(m):
        before, target, anchor, after, inner = m.group(1), m.group(2), m.group(3) or "", m.group(4), m.group(5)
        if not target: out = here
        elif target.endswith(".ipynb") and target in pages: out = pages[target][0]
        elif target.startswith(info.docs_url): out = target[len(info.docs_url):] or "index.html"
        else: return m.group(0)
        if out not in anchors: return m.group(0)
        if anchor and anchor[1:] not in anchors[out]:
            if target.startswith(info.docs_url): return inner
            anchor = "#" + pandoc_id(anchor[1:].replace("-", " "))
        return f'<a{before} href="{out}{anchor}"{after}>{inner}</a>'
    page = _A_HREF.sub(local, page).replace(f'src="{COLAB_BADGE}"', 'src="assets/colab-badge.svg"')
    return re.sub(rf'<a href="({re.escape(info.repo_url)}/blob/[^"]*)">source</a>', r'<a class="lmc-source" href="\1">source</a>',
                  page)


# ---- the whole site ----

def copy_assets(out: Path, styles: Path | None) -> None:
    "MathJax (from the jupyter-server-mathjax package), the course's styles and the local Colab badge."
    import jupyter_server_mathjax
    shutil.copytree(Path(jupyter_server_mathjax.__file__).parent / "static", out / "mathjax", dirs_exist_ok=True)
    (out / "assets").mkdir(parents=True, exist_ok=True)
    for f in ("site.css", "colab-badge.svg"): shutil.copy2(ASSETS / f, out / "assets" / f)
    if styles and styles.exists(): shutil.copy2(styles, out / "assets" / "styles.css")
    else: (out / "assets" / "styles.css").write_text("")


def build_site(proc: Path, out: Path, info: SiteInfo, sidebar: Path | None = None) -> list[Path]:
    """Render every notebook in `proc` (the processed notebooks) into `out`; return the pages written.

    Pages are named by the notebooks' `output-file` (as Quarto names them: `03_cog.ipynb` -> `cog.html`)."""
    sidebar = sidebar or proc / "sidebar.yml"
    entries = read_sidebar(sidebar) if sidebar.exists() else []
    notebooks = sorted(proc.glob("*.ipynb"))
    loaded = {}
    for path in notebooks:
        # (the invalid timing would be logged as an error; prepare() makes the notebook valid)
        front, nb = prepare(nbformat.read(path, as_version=4, capture_validation_error={}))
        loaded[path.name] = (front, nb)
    pages = {name: (front.get("output-file") or Path(name).with_suffix(".html").name, front.get("title") or Path(name).stem)
             for name, (front, nb) in loaded.items()}
    unlisted = sorted(set(pages) - set(sidebar_names(entries)))
    if entries and unlisted:
        print(f"warning: not in {sidebar.name}, so not in the sidebar: {', '.join(unlisted)}", file=sys.stderr)
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    copy_assets(out, proc / "styles.css")
    exp, built = exporter(), datetime.date.today().isoformat()
    rendered = {}
    for name, (front, nb) in loaded.items():
        target, title = pages[name]
        nb.metadata["title"] = title
        resources = {"metadata": {"name": Path(name).stem, "path": str(proc)}, "site": {
            "root": "", "title": info.title, "built": built, "page_title": title, "slug": Path(target).stem,
            "description": markdown2html_mistune(str(front.get("description", ""))).strip()
                           .removeprefix("<p>").removesuffix("</p>"),
            "sidebar": sidebar_html(entries, pages, name),
            "source_url": f"{info.repo_url}/blob/{info.branch}/{info.nbs_dir}/{name}",
            "issue_url": f"{info.repo_url}/issues/new"}}
        body, _ = exp.from_notebook_node(nb, resources=resources)
        rendered[target] = heading_ids(body)
    anchors = {target: page_anchors(body) for target, body in rendered.items()}
    for target, body in rendered.items():
        (out / target).write_text(rewrite_links(body, target, pages, anchors, info))
    return [out / target for target in rendered]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="_site", help="output folder, relative to the project root (default _site)")
    parser.add_argument("--no-stage", action="store_true", help="use _proc/ as it is (skip README and nbdev processing)")
    args = parser.parse_args(argv)
    from nbdev.config import get_config
    cfg = get_config()
    proc = cfg.config_path / "_proc"
    if not args.no_stage:
        print(f"wrote {write_readme(cfg)}")
        proc = stage(cfg)
    pages = build_site(proc, cfg.config_path / args.out, site_info(cfg))
    print(f"offline site: {len(pages)} pages in {cfg.config_path / args.out}; open {cfg.config_path / args.out / 'index.html'}")


if __name__ == "__main__":
    main()
