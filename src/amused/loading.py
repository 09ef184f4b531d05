"""Checkpoint I/O in the published diffusers layout, with safetensors only unless told otherwise.

    model_index.json
    transformer/config.json + diffusion_pytorch_model[.fp16].safetensors   (UVit2DModel)
    vqvae/config.json       + diffusion_pytorch_model[.fp16].safetensors   (VQModel)
    text_encoder/config.json + model[.fp16].safetensors                    (transformers names; CLIP loads natively)
    tokenizer/vocab.json + merges.txt + tokenizer_config.json              (CLIP BPE; others via transformers)
    scheduler/scheduler_config.json                                        (AmusedScheduler)

A hub id ("amused/amused-256") downloads through huggingface_hub; a folder is read as it is. Every error
names the file it is about. Files are written atomically (temp file + rename), so an interrupted save never
leaves a half-written weight file behind.
"""

from __future__ import annotations

import contextlib

import dataclasses
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import int8

WEIGHTS_NAME = "diffusion_pytorch_model"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
DIFFUSERS_VERSION = "0.42.1"  # the version whose layout we write, so diffusers can read our saves

# Sizes past these are refused before anything is allocated (a config is untrusted input).
MAX_WIDTH = 16384
MAX_LAYERS = 256
MAX_VOCAB = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


# ----------------------------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------------------------


def resolve(path_or_id: str | os.PathLike, variant: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False) -> Path:
    """A local folder as is, or a hub id downloaded (only the files the layout needs) into the HF cache."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"{text} is a file; give the checkpoint folder (the one holding model_index.json)")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint folder {text} does not exist (and is not a hub id like 'amused/amused-256')")
    from huggingface_hub import snapshot_download

    weights = [f"*.{variant}.safetensors", f"*.{variant}-*.safetensors"] if variant else ["*.safetensors"]
    patterns = ["*.json", "*.txt", *weights]  # shards: NAME[.VARIANT]-0000k-of-0000n.safetensors + index json
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, cache_dir=cache_dir,
                                      local_files_only=local_files_only))
    except Exception as e:  # network, auth, missing repo: say which id failed and why
        raise CheckpointError(f"could not download {text} from the Hugging Face hub: {e}") from e


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt JSON in {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def weights_file(folder: Path, name: str = WEIGHTS_NAME, variant: str | None = None,
                 allow_pickle: bool = False) -> Path:
    """The weight file of a component folder, refusing pickles unless `allow_pickle`: one safetensors file, or
    the index of a sharded one (`NAME.safetensors.index.json`, as diffusers and transformers write them)."""
    stem = f"{name}.{variant}" if variant else name
    candidate = folder / f"{stem}.safetensors"
    if candidate.is_file():
        return candidate
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return index
    pickles = [folder / f"{stem}{s}" for s in PICKLE_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if pickles and allow_pickle:
        return pickles[0]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if pickles:
        raise CheckpointError(f"{pickles[0]} is a pickle file, which can run code when loaded; refusing it. Convert "
                              f"it to safetensors, or pass allow_pickle=True if you trust its source")
    raise CheckpointError(f"missing weight file {candidate} (folder holds: {', '.join(present) or 'nothing'})")


def shard_files(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names (`weight_map` values), each a plain file name beside
    the index: a name that leaves the folder, or a shard that is not safetensors, is refused."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index}: shard {name!r} must be a .safetensors file name in the same folder")
    return [index.parent / name for name in names]


def load_state_dict(path: Path, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    device = str(device or "cpu")
    if path.name.endswith(".safetensors.index.json"):  # sharded: every shard, merged
        state = {}
        for shard in shard_files(path):
            state.update(load_state_dict(shard, device))
        return state
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt", device=device) as f:  # one open: the tensors and the metadata
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}
            if metadata.get(int8.METADATA_KEY) == int8.METADATA_VALUE:  # a compact file (amused.int8)
                state = int8.dequantize(state, path)
            return state
        return torch.load(str(path), map_location=device, weights_only=True)  # only reached with allow_pickle
    except (SafetensorError, OSError, RuntimeError, Exception) as e:
        raise CheckpointError(f"corrupt or unreadable weight file {path}: {e}") from e


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def config_from_dict(cls, data: dict[str, Any], source: Path):
    """Build a config dataclass, ignoring diffusers' bookkeeping keys ("_class_name", ...) and refusing others."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if not k.startswith("_") and k not in fields)
    if unknown:
        raise CheckpointError(f"{source}: unknown config keys {unknown} for {cls.__name__}")
    values = {k: v for k, v in data.items() if k in fields}
    check_sizes(values, source)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from e


def check_sizes(values: dict[str, Any], source: Path) -> None:
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        for v in items:
            if isinstance(v, bool) or not isinstance(v, int):
                continue
            limit = MAX_LAYERS if ("layers" in key or "blocks" in key) else (
                MAX_VOCAB if ("vocab" in key or "codebook" in key or "embeddings" in key) else MAX_WIDTH)
            if v < 0 or v > limit:
                raise CheckpointError(f"{source}: {key}={value} is outside the allowed range [0, {limit}]")


def config_to_dict(config, class_name: str) -> dict[str, Any]:
    return {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **dataclasses.asdict(config)}


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def skip_init():
    """Build modules without initialising their weights (the checkpoint overwrites them): torch.nn.init's
    functions become no-ops for the duration (initialising amused-512 took seconds)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def load_model(model_cls, config_cls, folder: Path, variant: str | None = None, dtype: torch.dtype | None = None,
               allow_pickle: bool = False, device: str | torch.device | None = None) -> nn.Module:
    """Build `model_cls(config)` from `folder/config.json` and load its weights strictly, straight onto
    `device` (default: the CPU)."""
    config = config_from_dict(config_cls, read_json(folder / "config.json"), folder / "config.json")
    path = weights_file(folder, variant=variant, allow_pickle=allow_pickle)
    state = load_state_dict(path, device)
    with skip_init(), torch.device("meta"):  # no memory and no init until the checkpoint's tensors are assigned
        model = model_cls(config)
    return assign_weights(model, state, path, dtype)


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Put a checkpoint's tensors into a model built on the meta device, refusing any missing or unexpected key,
    a shape the config does not give, or integer weights (`path`, the file, is named in errors). Floating-point
    tensors become `dtype` (float32 when None, whatever the file holds, as diffusers does)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if expected[key].is_floating_point() and not tensor.is_floating_point():  # ints/bools: not weights
            raise CheckpointError(f"{path}: {key} is a {tensor.dtype} tensor; weights must be floating point")
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, the config gives "
                                  f"{tuple(expected[key].shape)}")
    check_finite(state, path)
    for key, tensor in state.items():
        if tensor.is_floating_point():  # as diffusers: float32 unless torch_dtype says otherwise, whatever the file
            state[key] = tensor.to(dtype or torch.get_default_dtype())
    model.load_state_dict(state, assign=True)
    return model.eval()


def check_finite(state: dict[str, torch.Tensor], source) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor: they would only show up later, as NaN
    logits ("probability tensor contains inf/nan") or a NaN image. A tensor's min and max are finite exactly when
    all of it is (NaN propagates through both); `aminmax` reads it once and is ~30x faster than `isfinite` on a
    CPU (0.1 s for 315M fp16 values). One device sync."""
    keys = [k for k, t in state.items() if t.is_floating_point() and t.numel()]
    if not keys:
        return
    device = state[keys[0]].device
    extremes = torch.stack([torch.stack(torch.aminmax(state[k])).float().to(device) for k in keys])  # (N, 2)
    finite = torch.isfinite(extremes).all(dim=1)
    if not bool(finite.all()):
        key = keys[int((~finite).nonzero()[0])]
        raise CheckpointError(f"{source}: {key} holds NaN or infinite values (corrupt weights)")


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` then rename over `path`, so readers never see a partial file.

    The temp file beside `path`, `.NAME.amused-PID-RANDOM.tmp`, carries amused's marker and its writer's pid, so
    `clean_stale_temps` can remove it after a SIGKILL without touching a live writer's or anyone else's. It is
    created with mode 0666 and the kernel applies the umask, so the file gets the permissions any new file would
    (0644 under the usual 022), not mkstemp's 0600, and without changing the process umask to read it. A writer
    that replaces the file instead of writing into it (safetensors' `save_file` leaves 0600) gets that mode back.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        mode = tmp.stat().st_mode & 0o777  # 0666 less the umask
        write(tmp)
        if tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


TEMP_MARKER = "amused"
_TEMP_NAME = re.compile(rf"^\.(?P<name>.+)\.{TEMP_MARKER}-(?P<pid>\d+)-[0-9a-f]{{16}}\.tmp$")


def _create_temp(path: Path) -> Path:
    while True:
        tmp = path.with_name(f".{path.name}.{TEMP_MARKER}-{os.getpid()}-{secrets.token_hex(8)}.tmp")
        try:  # O_EXCL: never reuse or follow an existing name (a planted symlink included)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def clean_stale_temps(folder: Path) -> list[Path]:
    """Delete `atomic_write` temp files in `folder` whose writing process is gone (killed mid-write).

    Only what amused can show it wrote is touched: names with amused's marker and a random part of its exact
    shape, regular files (not links) owned by this user, whose pid is not running.

    Returns:
        The deleted paths.
    """
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*.{TEMP_MARKER}-*.tmp"):
        m = _TEMP_NAME.match(p.name)
        if m is None or _alive(int(m["pid"])):
            continue
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # exists (another user's), or no pid a process could have: keep the file
    return True


def save_sharded(state: dict[str, torch.Tensor], folder: Path, name: str = WEIGHTS_NAME,
                 max_shard_bytes: int = 15 * 2**20, int8_weights: bool = False) -> list[Path]:
    """`state` as diffusers' sharded safetensors (`NAME-0000k-of-0000n.safetensors` + `NAME.safetensors.index.json`)
    when it is over `max_shard_bytes`, else one `NAME.safetensors`; tensors kept in order, each file atomic.
    `int8_weights`: stored in `amused.int8`'s compact form, every matrix in the same shard as its scale (each
    shard is read back on its own). Returns the files written."""
    metadata = {"format": "pt"}
    if int8_weights:
        state, extra = int8.quantize(state)
        metadata.update(extra)
    shards, size = [{}], 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes and not key.endswith(int8.SCALE_SUFFIX):
            shards.append({})
            size = 0
        shards[-1][key] = value.contiguous()
        size += nbytes
    if len(shards) == 1:
        path = folder / f"{name}.safetensors"
        atomic_write(path, lambda tmp: save_file(shards[0], str(tmp), metadata=metadata))
        return [path]
    files, weight_map = [], {}
    for k, shard in enumerate(shards, 1):
        path = folder / f"{name}-{k:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(path, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata=metadata))
        weight_map.update({key: path.name for key in shard})
        files.append(path)
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = folder / f"{name}.safetensors.index.json"
    write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*files, index]


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_model(model: nn.Module, folder: Path, class_name: str, variant: str | None = None,
               int8_weights: bool = False) -> None:
    """config.json + safetensors weights, as diffusers writes them; `int8_weights`: the compact form of
    `amused.int8` (amused reads it, diffusers does not)."""
    write_json(folder / "config.json", config_to_dict(model.config, class_name))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": "pt"}
    if int8_weights:
        state, extra = int8.quantize(state)
        metadata.update(extra)
    stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
    atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file(state, str(tmp), metadata=metadata))
