import os
import warnings
from pathlib import Path

# Before torch loads OpenMP: threads sleep at barriers, and one thread a process (the tiny test models gain nothing
# from more; several processes on two cores spin against each other otherwise: docs/reliability.md, CPU threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("AMUSED_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", os.environ["AMUSED_NUM_THREADS"])  # subprocesses too: a test that compares
# a subprocess's training with its own must run both on the same thread count (float sums differ otherwise)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["AMUSED_NUM_THREADS"]))

from tiny import load_reference, save_reference_checkpoint

warnings.filterwarnings("ignore", message=".*deprecated.*")


@pytest.fixture(scope="session")
def ref_dir(tmp_path_factory) -> Path:
    """A tiny random aMUSEd checkpoint written by diffusers in the published layout."""
    return save_reference_checkpoint(tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="session")
def ref_pipes(ref_dir):
    """diffusers' three pipelines, each loaded fresh (the inpaint one mutates its scheduler)."""
    return {name: load_reference(ref_dir, name)
            for name in ("AmusedPipeline", "AmusedImg2ImgPipeline", "AmusedInpaintPipeline")}


@pytest.fixture()
def ours(ref_dir):
    from amused import AmusedPipeline

    return AmusedPipeline.from_pretrained(ref_dir)


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- the GPU suite's report: AMUSED_GPU_REPORT=path writes each test's outcome, the date and the GPU ----------

_REPORT: list[dict] = []


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        _REPORT.append({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                        "seconds": round(report.duration, 3),
                        "message": str(report.longrepr)[-2000:] if report.failed else None})


def pytest_sessionfinish(session, exitstatus):
    import datetime
    import json
    import os
    import platform

    path = os.environ.get("AMUSED_GPU_REPORT")
    if not path:
        return
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    counts = {k: sum(r["outcome"] == k for r in _REPORT) for k in ("passed", "failed", "skipped")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "gpu": gpu,
        "torch": torch.__version__, "python": platform.python_version(), "exit_status": int(exitstatus),
        "counts": counts, "tests": _REPORT}, indent=1) + "\n")
