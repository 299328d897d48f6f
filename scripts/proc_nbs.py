"""Build what can be built of the site without Quarto: README.md and the processed notebooks in _proc/.

`nbdev-readme` and `nbdev-proc-nbs` would try to download and install Quarto first (it cannot be
installed offline); this calls nbdev's processing step directly and writes README.md from
nbs/index.ipynb's markdown cells (links to chapters point into nbs/)."""
import re
from pathlib import Path

import nbformat
from nbdev.config import get_config
from nbdev.doclinks import _build_modidx
from nbdev.quarto import nbdev_sidebar, proc_nbs, refresh_quarto_yml


def write_readme(cfg) -> Path:
    nb = nbformat.read(cfg.nbs_path / cfg.readme_nb, as_version=4)
    text = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    text = re.sub(r"\]\((\w[\w.-]*\.ipynb)\)", r"](nbs/\1)", text)
    path = cfg.config_path / "README.md"
    path.write_text("<!-- generated from nbs/index.ipynb by scripts/proc_nbs.py; edit the notebook -->\n" + text + "\n")
    return path


if __name__ == "__main__":
    cfg = get_config()
    print(f"wrote {write_readme(cfg)}")
    refresh_quarto_yml()
    _build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    print(f"processed notebooks staged in {proc_nbs(cfg.nbs_path)}")
