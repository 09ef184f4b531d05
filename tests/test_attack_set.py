"""The attack set's quick in-process cases (scripts/attack_set.py, docs/reliability.md "Attack set"), under pytest.

The full set (command line, server, checkpoints) takes minutes and runs as a script; these are its quick cases that
need no checkpoint: image bombs, formats, 16-bit/alpha/EXIF images, `datasets` rows, tar shards, recorded PNG
settings and metadata paths, each through the function every face calls.
"""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def harness():
    spec = importlib.util.spec_from_file_location("attack_set", ROOT / "scripts" / "attack_set.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["attack_set"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_quick_in_process_attack_cases_are_handled(tmp_path, monkeypatch):
    attack = harness()
    arsenal = attack.Arsenal(tmp_path)
    monkeypatch.delenv("AMUSED_MAX_IMAGE_PIXELS", raising=False)
    monkeypatch.setenv("PATH", f"{arsenal.bin}{os.pathsep}{os.environ.get('PATH', '')}")  # a fake `gs` marks a start
    cases = [c for c in attack.build_cases(arsenal, attack.LIGHT_BUILDERS) if c.quick and c.face == "python"]
    results = {c.name: attack.run_python(c, arsenal) for c in cases}
    failed = {name: r["detail"] for name, r in results.items() if r["outcome"] != "handled"}
    assert len(cases) >= 30 and not failed, failed
    assert {c.category for c in cases} >= {attack.BOMBS, attack.FORMATS, attack.CONTENT, attack.REPLAY, attack.TRAIN}
