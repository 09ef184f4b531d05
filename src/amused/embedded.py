"""Where the small model trained here and shipped inside the package lives (the default model everywhere)."""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "assets" / "amused-emoji-64"
EMBEDDED_NAME = "embedded"  # accepted wherever a model is named (--model embedded, from_pretrained("embedded"))


def embedded_model_path() -> Path:
    """Folder of the embedded checkpoint; a clear error if this install does not carry it."""
    if not (EMBEDDED_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from this install ({EMBEDDED_DIR}); pass --model "
                                f"with a checkpoint folder or hub id")
    return EMBEDDED_DIR


def resolve_model_name(model: str | None) -> str:
    """A model argument as the loaders take it: None or "embedded" -> the embedded checkpoint's folder;
    anything else (a folder or a hub id) unchanged."""
    if model is None or str(model) == EMBEDDED_NAME:
        return str(embedded_model_path())
    return str(model)
