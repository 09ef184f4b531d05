"""Bulk generation over several processes: `accelerate launch amused generate --prompts-file ... --out-dir ...`
deals the batches out over the processes (here 2 CPU processes, gloo); the files are the ones one process writes,
named and seeded alike, pixel for pixel; a rerun skips what is already written with the same settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from amused.cli import main


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_two_processes_write_the_single_process_files(ref_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na fish\na bird\na cow\n")
    common = ["generate", "--prompts-file", str(prompts), "--model", str(ref_dir), "--batch-size", "2", "--seed", "5",
              "--device", "cpu", "--quiet"]
    assert main([*common, "--out-dir", str(tmp_path / "one")]) == 0
    # --multi_gpu makes accelerate start the processes with torchrun; ACCELERATE_USE_CPU=1 makes each a gloo CPU
    # process (accelerate's own --cpu starts only one: it expects mpirun for several CPU processes)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(_free_port()), "-m", "amused.cli", *common, "--out-dir", str(tmp_path / "two"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["processes"] == 2 and len(report["images"]) == 5
    assert report["made_here"] == 3  # rank 0 made batches 0 and 2 (2 + 1 images); rank 1 made batch 1
    one, two = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 5
    assert all(np.array_equal(one[name], two[name]) for name in one)
    # a rerun keeps what is there with the same settings, and remakes what is missing
    (tmp_path / "two" / "0003_a-bird.png").unlink()
    assert main([*common[:-1], "--out-dir", str(tmp_path / "two"), "--json"]) == 0
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rerun["skipped_batches"] == 2 and rerun["made_here"] == 2  # only batch 1 (a bird, a cow) again
    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "0003_a-bird.png")), one["0003_a-bird.png"])
    # other settings: nothing is kept
    assert main([*common[:-1], "--out-dir", str(tmp_path / "two"), "--json", "--steps", "3"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped_batches"] == 0
