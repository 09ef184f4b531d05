"""The settings a generated PNG records (its "amused" text chunk), read back as strictly as the command line
reads its flags: `amused generate --from-image` and `amused variations` take them from files that anyone may
have made, so every field is type- and range-checked, and a model or LoRA named only in the file is used only
when the user confirms it (`--use-recorded-model`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_RECORDED_SIDE = 1024  # pixels; a recorded height/width above it is refused (the command line can ask more)
MAX_RECORDED_STEPS = 200
MAX_RECORDED_BATCH = 64
MAX_PROMPT_CHARS = 10_000


@dataclass
class Recorded:
    """One image's recorded settings, checked."""

    prompts: list[str]  # the batch the image was made in
    batch_index: int  # which image of that batch
    seed: int
    steps: int | None
    guidance_scale: float | None
    temperature: float | tuple[float, float] | None
    negative_prompt: str | None
    height: int | None
    width: int | None
    model: str  # "embedded", a folder or a hub id
    lora: str | None
    lora_scale: float
    stream: str | None  # "reference" (CPU generator) or "device"; None in files from older versions
    sampler: str | None  # "confidence" or "halton"; None in files from older versions (the model's default)
    raw: dict[str, Any]  # the whole record, written again into the replayed image


def _fail(source: str, key: str, what: str, value) -> ValueError:
    return ValueError(f"{source}: recorded {key} {what}, got {value!r:.80}")


def _int(meta, key, source, lo, hi, default=None, required=False):
    value = meta.get(key, default)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _fail(source, key, f"must be a whole number in [{lo}, {hi}]", value)
    return value


def _number(meta, key, source, lo=-1e6, hi=1e6):
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise _fail(source, key, f"must be a finite number in [{lo:g}, {hi:g}]", value)
    return float(value)


def _text(meta, key, source, required=False):
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
        raise _fail(source, key, f"must be a string of at most {MAX_PROMPT_CHARS} characters", value)
    return value


def parse_recorded(text: str | None, source: str) -> Recorded:
    """Check a PNG's "amused" chunk. Errors are one line naming `source` and the field."""
    if not text:
        raise ValueError(f"{source} carries no amused metadata (not made by amused generate?)")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: the amused metadata is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: the amused metadata must be a JSON object, got {type(meta).__name__}")
    prompt = _text(meta, "prompt", source, required=True)
    prompts = meta.get("batch_prompts") or [prompt]
    if not isinstance(prompts, list) or not 1 <= len(prompts) <= MAX_RECORDED_BATCH or not all(
            isinstance(p, str) and len(p) <= MAX_PROMPT_CHARS for p in prompts):
        raise _fail(source, "batch_prompts", f"must be a list of 1 to {MAX_RECORDED_BATCH} strings", prompts)
    index = _int(meta, "batch_index", source, 0, len(prompts) - 1, default=0)
    temperature = meta.get("temperature")
    if isinstance(temperature, list):
        if len(temperature) != 2 or not all(_number({"temperature": t}, "temperature", source, 0, 100) is not None
                                            for t in temperature):
            raise _fail(source, "temperature", "must be a number or a [start, end] pair of numbers", temperature)
        temperature = (float(temperature[0]), float(temperature[1]))
    elif temperature is not None:
        temperature = _number(meta, "temperature", source, 0, 100)
    model = meta.get("model", "embedded")
    if not isinstance(model, str) or not model:
        raise _fail(source, "model", "must be a model name", model)
    stream = meta.get("stream")
    if stream not in (None, "reference", "device"):
        raise _fail(source, "stream", "must be 'reference' or 'device'", stream)
    sampler = meta.get("sampler")
    if sampler not in (None, "confidence", "halton"):
        raise _fail(source, "sampler", "must be 'confidence' or 'halton'", sampler)
    return Recorded(
        prompts=prompts, batch_index=index, seed=_int(meta, "seed", source, 0, 2**64 - 1, required=True),
        steps=_int(meta, "steps", source, 1, MAX_RECORDED_STEPS),
        guidance_scale=_number(meta, "guidance_scale", source, -100, 100), temperature=temperature,
        negative_prompt=_text(meta, "negative_prompt", source),
        height=_int(meta, "height", source, 1, MAX_RECORDED_SIDE),
        width=_int(meta, "width", source, 1, MAX_RECORDED_SIDE), model=model, lora=_text(meta, "lora", source),
        lora_scale=_number(meta, "lora_scale", source, -100, 100) or 1.0, stream=stream, sampler=sampler, raw=meta)


def confirm_model(recorded: Recorded, model: str | None, lora: str | None, trust: bool, source: str):
    """The model and LoRA a replay uses: the user's flags; the file's only with `trust` (--use-recorded-model)."""
    use_model = model or ("embedded" if recorded.model == "embedded" else None)
    if use_model is None:
        if not trust:
            raise ValueError(f"{source} was made with model {recorded.model!r:.200}; pass --model with it, or "
                             f"--use-recorded-model to load what the file names")
        use_model = recorded.model
    use_lora = lora
    if recorded.lora and not lora:
        if not trust:
            raise ValueError(f"{source} was made with LoRA {recorded.lora!r:.200}; pass --lora with it, or "
                             f"--use-recorded-model to load what the file names")
        use_lora = recorded.lora
    return use_model, use_lora
