"""The compile test: every kernel of the course, at every GPU configuration its launcher may pick, compiled without a
GPU for Hopper (sm_90: H100, H200) and Ampere (sm_80: A100) with this environment's Triton, and for Hopper with each
Triton in $LMCOURSE_COMPILE_TRITONS — `make test` installs Triton 3.6 (torch 2.11's, what the H100/H200 machines run)
into .venv/triton-3.6. $LMCOURSE_COMPILE_SIDE_TARGETS=sm_90,sm_80 adds Ampere for those too (a third more compiles).

Each chapter module joins by defining `compile_cases()` (see chapter 0, nbs/00d_testing.ipynb, "The contract for a
chapter's kernels"); this file finds them through the package. One test per (Triton, target, distinct launch):
it must compile, spill no register, fit the target's shared memory and, for bf16 on sm_90, run its dots on wgmma.
A chapter's `KnownFailure`s are strict xfails: fixing one without deleting its entry turns the test red.
`test_tables` prints one table per kernel, and what the compiles cost, at the end of the run (conftest.py)."""
import os
import re
import time
from pathlib import Path

import lmcourse  # noqa: F401  (first)

import pytest
import torch
import triton

if torch.cuda.is_available():   # a GPU runs the kernels themselves (make gpu); this is the CPU machines' proxy
    pytest.skip("the compile test stands in for a GPU: it runs where there is none", allow_module_level=True)

from lmcourse.testing import case_launches, compile_cases_by_module, compile_launches, compile_report, compile_verdict  # noqa: E402

VENV_TARGETS = ("sm_90", "sm_80")
SIDE_TARGETS = tuple(os.environ.get("LMCOURSE_COMPILE_SIDE_TARGETS", "sm_90").split(","))
# Each distinct launch costs 3 compiles (2 targets with this Triton, 1 with 3.6), 0.5-2 CPU seconds apiece (measured
# cold, 2026-12-02: 270 launches, 810 compiles, 727 CPU s, about 6 minutes on 2 cores); a chapter should stay near 15
# launches so that 13 chapters fit the 6-8 minutes the compile test may take. This cap only stops a chapter from blowing
# the budget alone.
MAX_LAUNCHES_PER_MODULE = 40
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


TRITONS = [(triton.__version__, "venv", VENV_TARGETS)] + [(v, p, SIDE_TARGETS) for v, p in _side_tritons()]
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
WALL: dict[str, float] = {}              # Triton version -> wall seconds of its compile processes


def _records(version: str, path, targets, indices=None) -> dict:
    "Compile jobs `indices` (default: all) for `targets` with one Triton, in parallel, each job once a session."
    done = _RECORDS.setdefault(version, {})
    todo = [i for i in (range(len(JOBS)) if indices is None else sorted(indices)) if (i, targets[0]) not in done]
    if todo:
        start = time.perf_counter()
        records = compile_launches([JOBS[i][2] for i in todo], targets, triton_path=None if path == "venv" else path)
        WALL[version] = WALL.get(version, 0.0) + time.perf_counter() - start
        done.update({(todo[k // len(targets)], targets[k % len(targets)]): r for k, r in enumerate(records)})
    return done


def _selected(session, version: str) -> set[int]:
    "The jobs this session's (possibly -k filtered) compile tests need with this Triton: compiled together at once."
    return {item.callspec.params["index"] for item in session.items
            if getattr(item, "originalname", None) == "test_compiles" and item.callspec.params["version"] == version}


def _params():
    for version, path, targets in TRITONS:
        for target in targets:
            for index, (module, case, launch) in enumerate(JOBS):
                marks = []
                if path is None:
                    marks.append(pytest.mark.skip(reason="Triton 3.6 is not installed in .venv/triton-3.6 (make test installs it)"))
                known = next((f for f in case.known_failures if f.matches(launch, target, version)), None)
                if known is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=f"issue {known.issue}: {known.reason}"))
                label = f"{version}-{target}-{module.removeprefix('lmcourse.')}:{launch.name}[{case.label} {case.dtype}]-{index}"
                yield pytest.param(version, path, targets, target, index, marks=marks, id=label)


@pytest.mark.parametrize("version,path,targets,target,index", list(_params()))
def test_compiles(version, path, targets, target, index, request):
    module, case, launch = JOBS[index]
    record = _records(version, path, targets, _selected(request.session, version) | {index})[(index, target)]
    problems, _ = compile_verdict(case, launch, record)
    assert not problems, (f"{module}:{launch.name} ({case.label}, {case.dtype}, {launch.constexprs}, "
                          f"num_warps={launch.num_warps}, num_stages={launch.num_stages}) with Triton {record.triton} "
                          f"for {target}: " + "; ".join(problems))


def test_every_kernel_module_is_covered():
    """Every chapter module with kernels (as `lmcourse.verified` finds them: @triton.jit functions launched as
    `kernel[grid](...)`) lists compile cases that launch each of them, within its launch budget."""
    import pkgutil

    from lmcourse.verified import chapter_kernels
    for info in pkgutil.iter_modules(lmcourse.__path__):
        kernels = set(chapter_kernels(info.name))
        if kernels:
            module = f"lmcourse.{info.name}"
            assert module in CASES, f"{module} launches kernels {sorted(kernels)} but defines no compile_cases()"
            launched = {launch.name for m, _, launch in JOBS if m == module}
            assert kernels <= launched, f"{module}: kernels {sorted(kernels - launched)} are in no compile case"
    for module in CASES:
        count = sum(1 for m, _, _ in JOBS if m == module)
        assert count <= MAX_LAUNCHES_PER_MODULE, (f"{module} has {count} distinct launches; the budget is "
                                                  f"{MAX_LAUNCHES_PER_MODULE}: choose representative shapes and configs")


def test_tables(record_property):
    "One table per kernel (printed by conftest.py at the end of the run), and what the compiles cost."
    available = [(version, path, targets) for version, path, targets in TRITONS if path is not None]
    records = {version: _records(version, path, targets) for version, path, targets in available}
    columns = [(version, target) for version, _, targets in available for target in targets]
    by_kernel = {}
    for index, (_, case, launch) in enumerate(JOBS):
        row = [records[version][(index, target)] for version, target in columns]
        by_kernel.setdefault(launch.kernel, []).append((case, launch, row))
    for entries in by_kernel.values():
        record_property("compile_table", compile_report(entries))
    cost = [f"{kernel}: {len(entries)} launches x {len(columns)} = {len(entries) * len(columns)} compiles, "
            f"{sum(r.cpu_seconds for _, _, row in entries for r in row):.0f} CPU s" for kernel, entries in by_kernel.items()]
    cost += [f"Triton {version}: {sum(1 for key in records[version])} compiles, "
             f"{sum(r.cpu_seconds for r in records[version].values()):.0f} CPU s, {WALL.get(version, 0):.0f} s wall "
             f"({os.environ.get('LMCOURSE_COMPILE_JOBS', '2')} at a time; Triton's cache makes unchanged kernels free)"
             for version in records]
    record_property("compile_table", "compile cost (CPU seconds exclude cache hits):\n" + "\n".join(cost))
