"""Test configuration shared by the package tests (tests/) and the notebook tests (nbs/, through nbval).

- Environment first, before anything imports torch or triton: the Triton interpreter when no GPU is
  visible, the smoke profile, NaN-poisoned kernel outputs, and no Hugging Face network access.
- nbval does not know nbdev: notebooks cleaned by `nbdev-clean` keep their outputs but lose execution
  counts, which nbval reports as "Unrun reference cell has outputs" — so cells get a count here; and
  nbdev's `#| eval: false` cells are skipped, as are cells flagged `#| gpu` when no GPU is present.
- The `gpu` marker: kernel correctness tests that `make gpu` runs on the GPU (`pytest -m gpu`).
- The compile test's tables (tests/test_gpu_compile.py, recorded as `compile_table` properties) are printed
  at the end of the run, also from xdist workers.
"""
import os

os.environ.setdefault("LMCOURSE_PROFILE", "smoke")
os.environ.setdefault("LMCOURSE_POISON", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import re  # noqa: E402

import lmcourse  # noqa: E402,F401  (sets TRITON_INTERPRET=1 when no GPU is visible)
import pytest  # noqa: E402

# Records which kernels each test launched; a full run writes results/verified/<device-kind>.json (nbs/00i_verified).
pytest_plugins = ["lmcourse.verified"]

_EVAL_FALSE = re.compile(r"^#\|\s*eval:\s*false", re.M)
_GPU_FLAG = re.compile(r"^#\|\s*gpu\b", re.M)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: a kernel correctness test that `make gpu` runs on the GPU in every dtype "
                                       "(pytest -m gpu); without a GPU it runs in the interpreter like any test")


def pytest_collection_modifyitems(config, items):
    import torch
    for item in items:
        cell = getattr(item, "cell", None)
        if cell is None:
            continue
        if cell.get("execution_count") is None and cell.get("outputs"):
            cell["execution_count"] = 1
        if _EVAL_FALSE.search(cell.source):
            item.add_marker(pytest.mark.skip(reason="nbdev '#| eval: false' cell"))
        elif _GPU_FLAG.search(cell.source) and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="'#| gpu' cell and no GPU"))


def pytest_terminal_summary(terminalreporter):
    tables = [value for report in terminalreporter.stats.get("passed", [])
              for name, value in getattr(report, "user_properties", ()) if name == "compile_table"]
    if tables:
        terminalreporter.section("GPU compile test: registers, spills, shared memory, tensor cores per kernel")
        for table in tables:
            terminalreporter.write_line(table + "\n")
