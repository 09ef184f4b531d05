"""scripts/embedded/add_styleless_captions.py: the caption copies the embedded model trains on."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts/embedded/add_styleless_captions.py"
ROWS = [{"file_name": "a.png", "text": "red apple, google style", "emoji": "red apple", "style": "google"},
        {"file_name": "b.png", "text": "waving hand, medium skin tone, twitter style", "emoji": "waving hand",
         "style": "twitter"},
        {"file_name": "c.png", "text": "no style here", "emoji": "x", "style": "openmoji"}]


def run(tmp_path: Path, *flags: str) -> list[dict]:
    path = tmp_path / "metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    subprocess.run([sys.executable, str(SCRIPT), str(path), *flags], check=True, capture_output=True)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_styleless_copies(tmp_path):
    rows = run(tmp_path)
    assert rows[:3] == ROWS  # the originals first, unchanged
    assert [(r["file_name"], r["text"]) for r in rows[3:]] == [("a.png", "red apple"),
                                                                ("b.png", "waving hand, medium skin tone")]


def test_style_only_copies(tmp_path):
    rows = run(tmp_path, "--style-only")
    assert [(r["file_name"], r["text"]) for r in rows[3:]] == [
        ("a.png", "red apple"), ("b.png", "waving hand, medium skin tone"),
        ("a.png", "google style"), ("b.png", "twitter style")]  # a caption without its style gets no copy
    assert all(r["style"] == o["style"] for r, o in zip(rows[5:], ROWS[:2]))
