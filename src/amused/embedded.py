"""Where the small model trained here and shipped inside the package lives (the CLI's default)."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "assets" / "amused-emoji-64"


def embedded_model_path() -> Path:
    """Folder of the embedded checkpoint; a clear error if this install does not carry it."""
    if not (EMBEDDED_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from this install ({EMBEDDED_DIR}); pass --model "
                                f"with a checkpoint folder or hub id")
    return EMBEDDED_DIR
