"""The compile test: every kernel of the course, at every GPU configuration its launcher may pick, compiled for
Hopper (sm_90: H100, H200) and Ampere (sm_80: A100) without a GPU — with this environment's Triton and with every
Triton in $LMCOURSE_COMPILE_TRITONS (`make test` installs Triton 3.6, torch 2.11's, into .venv/triton-3.6).

Each chapter module joins by defining `compile_cases()` (see chapter 0, nbs/00d_testing.ipynb, "The contract for a
chapter's kernels"); this file finds them through the package. One test per (Triton, target, distinct launch):
it must compile, spill no register, fit the target's shared memory and, for bf16 on sm_90, run its dots on wgmma.
A chapter's `KnownFailure`s are strict xfails: fixing one without deleting its entry turns the test red.
`test_tables` prints one table per kernel at the end of the run (through conftest.py's terminal summary)."""
import os
import re
import time
from pathlib import Path

import lmcourse  # noqa: F401  (first)

import pytest
import triton

from lmcourse.testing import case_launches, compile_cases_by_module, compile_launches, compile_report, compile_verdict

TARGETS = ("sm_90", "sm_80")
# A chapter's distinct launches cost 4 compiles each (2 targets x 2 Triton versions), about 1-2 CPU seconds apiece:
# this cap keeps 13 chapters inside the 6-8 minutes the whole compile test may take on 2 cores.
MAX_LAUNCHES_PER_MODULE = 64
REPO = Path(__file__).resolve().parents[1]


def _side_tritons() -> list[tuple[str, Path | None]]:
    "(version, directory) of each extra Triton: $LMCOURSE_COMPILE_TRITONS (':'-separated), default .venv/triton-3.6."
    setting = os.environ.get("LMCOURSE_COMPILE_TRITONS")
    paths = [Path(p) for p in setting.split(os.pathsep) if p] if setting else [REPO / ".venv" / "triton-3.6"]
    found = []
    for path in paths:
        dist = sorted(path.glob("triton-*.dist-info"))
        if dist:
            found.append((re.match(r"triton-(.+)\.dist-info", dist[0].name).group(1), path))
        elif setting:   # asked for explicitly (make test does): missing is an error, not a skip
            raise FileNotFoundError(f"LMCOURSE_COMPILE_TRITONS names {path}, which holds no Triton "
                                    f"(pip install --no-deps --target {path} triton==3.6.0)")
        else:
            found.append(("3.6 (not installed)", None))
    return found


TRITONS = [(triton.__version__, "venv")] + [(version, path) for version, path in _side_tritons()]
CASES = compile_cases_by_module()
JOBS = []                               # (module, case, launch), one per distinct launch
_seen = set()
for _module, _cases in CASES.items():
    for _case in _cases:
        for _launch in case_launches(_case):
            if _launch.key() not in _seen:
                _seen.add(_launch.key())
                JOBS.append((_module, _case, _launch))
_RECORDS: dict[str, dict] = {}           # Triton version -> {(job index, target): CompileRecord}
TIMES: dict[str, float] = {}             # Triton version -> wall seconds of its compile process


def _records(version: str, path) -> dict:
    "Compile every job for every target with one Triton (once per session, in parallel)."
    if version not in _RECORDS:
        start = time.perf_counter()
        records = compile_launches([launch for _, _, launch in JOBS], TARGETS,
                                   triton_path=None if path == "venv" else path)
        TIMES[version] = time.perf_counter() - start
        _RECORDS[version] = {(i // len(TARGETS), TARGETS[i % len(TARGETS)]): r for i, r in enumerate(records)}
    return _RECORDS[version]


def _params():
    for version, path in TRITONS:
        for target in TARGETS:
            for index, (module, case, launch) in enumerate(JOBS):
                marks = []
                if path is None:
                    marks.append(pytest.mark.skip(reason="Triton 3.6 is not installed in .venv/triton-3.6 (make test installs it)"))
                known = next((f for f in case.known_failures if f.matches(launch, target, version)), None)
                if known is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=f"issue {known.issue}: {known.reason}"))
                label = f"{version}-{target}-{module.removeprefix('lmcourse.')}:{launch.name}[{case.label} {case.dtype}]-{index}"
                yield pytest.param(version, path, target, index, marks=marks, id=label)


@pytest.mark.parametrize("version,path,target,index", list(_params()))
def test_compiles(version, path, target, index):
    module, case, launch = JOBS[index]
    record = _records(version, path)[(index, target)]
    problems, _ = compile_verdict(case, launch, record)
    assert not problems, (f"{module}:{launch.name} ({case.label}, {case.dtype}, {launch.constexprs}, "
                          f"num_warps={launch.num_warps}, num_stages={launch.num_stages}) with Triton {record.triton} "
                          f"for {target}: " + "; ".join(problems))


def test_every_kernel_module_is_covered():
    """Every lmcourse module that defines kernels (by the course's naming: @triton.jit functions called `*_kernel`;
    helpers called from kernels have other names) lists compile cases launching each, within its launch budget."""
    import importlib
    import pkgutil
    for info in pkgutil.walk_packages(lmcourse.__path__, "lmcourse."):
        module = importlib.import_module(info.name)
        kernels = {value.fn.__name__ for value in vars(module).values()
                   if type(value).__name__ in ("JITFunction", "InterpretedFunction")
                   and value.fn.__module__ == info.name and value.fn.__name__.endswith("_kernel")}
        if kernels and info.name != "lmcourse.testing":   # testing's dot_tile_kernel is the chapter-0 demo
            assert info.name in CASES, f"{info.name} defines kernels {kernels} but no compile_cases()"
            launched = {launch.name for module, _, launch in JOBS if module == info.name}
            assert kernels <= launched, f"{info.name}: kernels {sorted(kernels - launched)} are in no compile case"
    for module in CASES:
        count = sum(1 for m, _, _ in JOBS if m == module)
        assert count <= MAX_LAUNCHES_PER_MODULE, (f"{module} has {count} distinct launches (x 4 compiles each); the budget "
                                                  f"is {MAX_LAUNCHES_PER_MODULE}: choose representative shapes")


def test_tables(record_property):
    "One table per kernel (printed by conftest.py at the end of the run), and what the compiles cost."
    available = [(version, path) for version, path in TRITONS if path is not None]
    records = {version: _records(version, path) for version, path in available}
    by_kernel = {}
    for index, (_, case, launch) in enumerate(JOBS):
        row = [records[version][(index, target)] for version, _ in available for target in TARGETS]
        by_kernel.setdefault(launch.kernel, []).append((case, launch, row))
    for entries in by_kernel.values():
        record_property("compile_table", compile_report(entries))
    seconds = {kernel: sum(r.seconds for _, _, row in entries for r in row) for kernel, entries in by_kernel.items()}
    lines = [f"{kernel}: {len(entries)} launches, {len(entries) * len(TARGETS) * len(available)} compiles, "
             f"{seconds[kernel]:.0f} s of compile wall time" for kernel, entries in by_kernel.items()]
    lines += [f"Triton {version}: {len(JOBS) * len(TARGETS)} compiles in {TIMES[version]:.0f} s wall "
              f"({os.environ.get('LMCOURSE_COMPILE_JOBS', '2')} at a time)" for version in records]
    record_property("compile_table", "\n".join(lines))
