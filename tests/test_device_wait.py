"""scripts/embedded/device_wait.sh: a wait call of a background device run ends at once on a fresh machine, and
returns the run's files on every call, done or not."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts/embedded/device_wait.sh"


def wait(tmp_path: Path, log: Path, seconds: int, *files: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    return subprocess.run(["bash", str(SCRIPT), str(log), str(seconds), "go done", *files], env=env,
                          capture_output=True, text=True, timeout=60)


def test_fresh_machine_ends_at_once(tmp_path):
    run = wait(tmp_path, tmp_path / "gone.log", 30)
    assert run.returncode == 3 and "fresh machine" in run.stdout
    assert not (tmp_path / "out").exists()


def test_files_come_back_done_or_not(tmp_path):
    log, res = tmp_path / "emb.log", tmp_path / "res"
    res.mkdir()
    (res / "part0.safetensors").write_bytes(b"w")
    (res / "results.tgz").write_bytes(b"r")
    log.write_text("training\n")
    run = wait(tmp_path, log, 1, str(res / "*"), str(tmp_path / "missing.json"))
    assert run.returncode == 2  # not done yet, but what exists is copied
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part0.safetensors", "results.tgz"]
    log.write_text("training\ngo done 13:30\n")
    assert wait(tmp_path, log, 30, str(res / "*")).returncode == 0
