"""LoRA adapters (Hu et al., 2021) on the U-ViT and the text encoder, through peft, in a diffusers-like file.

Targets: the U-ViT's attention projections `to_q`/`to_k`/`to_v`/`to_out.0` (optionally the GEGLU MLP,
`ff.net.0.proj`/`ff.net.2`); the CLIP text tower's `q_proj`/`k_proj`/`v_proj`/`out_proj`, the names it really
has (diffusers' train_amused.py targets `to_q`... on CLIP, which matches nothing), or BERT's
`query`/`key`/`value` for BERT-like encoders.

File format, as diffusers writes LoRA weights: one safetensors file (`pytorch_lora_weights.safetensors`) whose
keys are peft state-dict keys prefixed with the component, e.g.
`transformer.transformer_layers.0.attn1.to_q.lora_A.weight` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight`; the adapter settings (r, alpha,
targets per component) are stored in the file's metadata under `lora_adapter_metadata` and, for people,
in `adapter_config.json` beside it. Only safetensors files are read; keys and shapes are checked against the
model, and every error names the file.

The pipeline-level functions take the pipeline object (they read `pipe.transformer` and `pipe.text_encoder`).
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .loading import CheckpointError, atomic_write, read_json, write_json

TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TRANSFORMER_FF_TARGETS = ("ff.net.0.proj", "ff.net.2")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
BERT_TARGETS = ("query", "key", "value")
LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "adapter_config.json"
COMPONENTS = ("transformer", "text_encoder")
MAX_LORA_SCALE = 100.0  # bound on |scale| and |lora_alpha / r|: beyond it fp16 logits overflow to inf/nan


def text_encoder_targets(model: nn.Module) -> tuple[str, ...]:
    """The attention projection names of a CLIP or BERT-like text model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for targets in (CLIP_TARGETS, BERT_TARGETS):
        if set(targets) <= names:
            return targets
    raise ValueError(f"{type(model).__name__}: no q_proj/k_proj/v_proj (CLIP) or query/key/value (BERT) modules; "
                     f"give the text encoder's LoRA target modules explicitly")


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise ValueError(f"LoRA target modules {missing} match no linear layer of {type(model).__name__} "
                         f"(it has e.g. {sorted({n.rsplit('.', 1)[-1] for n in linear})[:12]})")


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, target_modules: list[str] | tuple = TRANSFORMER_TARGETS,
             dropout: float = 0.0, adapter_name: str = "default") -> dict:
    """Inject trainable LoRA adapters in place; the base weights are frozen.

    Args:
        model: the U-ViT or a transformers text model.
        r: rank.
        alpha: scale numerator (the update is alpha / r * B @ A).
        target_modules: module-name suffixes to adapt (each must match a linear layer).
        dropout: dropout on the adapter input.
        adapter_name: peft adapter name.

    Returns:
        The adapter settings as saved in the LoRA file.
    """
    targets = list(target_modules)
    _check_targets(model, targets)
    if adapter_name in getattr(model, "peft_config", {}):
        raise ValueError(f"{type(model).__name__} already has a LoRA adapter named {adapter_name!r}; unload it first")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=adapter_name)
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(targets), "lora_dropout": dropout,
            "peft_type": "LORA"}


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter weights only, with peft's keys (`...to_q.lora_A.weight`)."""
    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def save_lora_weights(path: str | Path, transformer: nn.Module | None = None, text_encoder: nn.Module | None = None,
                      configs: dict[str, dict] | None = None, adapter_name: str = "default") -> Path:
    """Write the adapters of the given components into one safetensors file (+ adapter_config.json).

    Args:
        path: a `.safetensors` file, or a folder (the file is then `pytorch_lora_weights.safetensors`).
        transformer, text_encoder: components carrying the adapter.
        configs: {"transformer": settings, "text_encoder": settings} as `add_lora` returned them; read from the
            models' peft config when omitted.
        adapter_name: which adapter to save.

    Returns:
        The file written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / LORA_FILE
    state, meta = {}, {}
    for name, module in (("transformer", transformer), ("text_encoder", text_encoder)):
        if module is None:
            continue
        for key, value in lora_state_dict(module, adapter_name).items():
            state[f"{name}.{key}"] = value.detach().contiguous().cpu()
        meta[name] = (configs or {}).get(name) or _config_of(module, adapter_name)
    if not state:
        raise ValueError("no LoRA weights to save: pass a transformer and/or text_encoder carrying an adapter")
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    write_json(path.parent / CONFIG_FILE, meta)
    return path


def _config_of(module: nn.Module, adapter_name: str) -> dict:
    config = module.peft_config[adapter_name]
    return {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": sorted(config.target_modules),
            "lora_dropout": config.lora_dropout, "peft_type": "LORA"}


def check_lora_scale(scale, name: str = "LoRA scale (--lora-scale)") -> float:
    """`scale` as a float, if it is a finite number within +-MAX_LORA_SCALE (past that the logits overflow)."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) \
            or abs(scale) > MAX_LORA_SCALE:
        raise ValueError(f"{name} must be a finite number between -{MAX_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, "
                         f"got {scale!r}")
    return float(scale)


def _read_lora_file(path: Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    if path.is_dir():
        path = path / LORA_FILE
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: LoRA weights are read from .safetensors files only (pickle files can run "
                              f"code when loaded)")
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist")
    try:  # the tensors are as large as the file, no larger (safetensors checks the header against its length)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt or unreadable LoRA file {path}: {e}") from e
    if "lora_adapter_metadata" in metadata:
        try:
            configs = json.loads(metadata["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: metadata lora_adapter_metadata is not JSON: {e}") from None
        source = f"{path} (metadata lora_adapter_metadata)"
    elif (path.parent / CONFIG_FILE).is_file():
        configs, source = read_json(path.parent / CONFIG_FILE), str(path.parent / CONFIG_FILE)
    else:
        configs, source = {}, str(path)
    if not isinstance(configs, dict) or not all(isinstance(v, dict) for v in configs.values()):
        raise CheckpointError(f"{source}: adapter settings must map each component to an object of settings")
    return path, state, {"settings": configs, "source": source}


def _check_adapter(path: Path, component: str, model: nn.Module, sub: dict[str, torch.Tensor], settings: dict | None,
                   source: str) -> dict:
    """Everything about one component's adapter that can be checked before anything is allocated: key names,
    dtypes, finiteness, shapes against the model's layers, and the settings against the tensors.

    Returns:
        The settings (r, lora_alpha, lora_dropout), inferred as r = alpha = the tensors' rank when absent.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sub.items():
        module, _, tail = key.rpartition(".lora_")
        if tail not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{path}: {component}.{key} is not a LoRA A or B weight (only linear-layer LoRA "
                                  f"is supported)")
        if not value.is_floating_point() or value.ndim != 2:
            raise CheckpointError(f"{path}: {component}.{key} must be a 2-D floating-point tensor, got "
                                  f"{value.dtype} {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: {component}.{key} holds NaN or infinite values")
        pairs.setdefault(module, {})[tail[0]] = value
    ranks = set()
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: {component}.{module} has lora_{''.join(ab)} but not both A and B")
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise CheckpointError(f"{path}: {component}.{module} names no layer of the {component}") from None
        if isinstance(layer, BaseTunerLayer):
            layer = layer.get_base_layer()
        if not isinstance(layer, nn.Linear):
            raise CheckpointError(f"{path}: {component}.{module} is a {type(layer).__name__}, not a linear layer")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.shape[1] != layer.in_features or b.shape != (layer.out_features, r):
            raise CheckpointError(f"{path}: {component}.{module} LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} "
                                  f"do not fit the layer ({layer.in_features} in, {layer.out_features} out): "
                                  f"expected A (r, {layer.in_features}), B ({layer.out_features}, r)")
        ranks.add(r)
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: {component} LoRA ranks {sorted(ranks)} differ between layers")
    rank = ranks.pop()
    if settings is None:  # no settings saved: scale 1, as diffusers assumes
        return {"r": rank, "lora_alpha": rank, "lora_dropout": 0.0}
    r, dropout = settings.get("r"), settings.get("lora_dropout", 0.0)
    alpha = settings.get("lora_alpha", r)
    if isinstance(r, bool) or not isinstance(r, int) or r != rank:
        raise CheckpointError(f"{source}: {component} r={r!r}, but its weights have rank {rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or abs(alpha / r) > MAX_LORA_SCALE:
        raise CheckpointError(f"{source}: {component} lora_alpha={alpha!r} must be a finite number with "
                              f"|lora_alpha / r| <= {MAX_LORA_SCALE:g}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise CheckpointError(f"{source}: {component} lora_dropout={dropout!r} must be a number in [0, 1)")
    return {"r": r, "lora_alpha": alpha, "lora_dropout": dropout}


def load_lora_weights(pipe, path: str | Path, adapter_scale: float = 1.0, adapter_name: str = "default") -> None:
    """Add the adapters of a LoRA file to `pipe.transformer` / `pipe.text_encoder` and load their weights.

    Everything is checked before an adapter is allocated: key names, finite floating-point weights, shapes
    against the model's layers, the saved settings against the tensors (so a file cannot declare a rank larger
    than the weights it holds), and the scale.

    Args:
        pipe: an `AmusedPipeline` (anything with `.transformer` and `.text_encoder`).
        path: the `.safetensors` file or the folder holding `pytorch_lora_weights.safetensors`.
        adapter_scale: multiplier of the adapters' effect (1.0 as trained; 0 disables them), within
            +-MAX_LORA_SCALE.
        adapter_name: peft adapter name (load several files under different names).

    Raises:
        CheckpointError: not safetensors, unreadable, malformed settings, unknown components, non-finite
            weights, or keys/shapes that do not fit; the model is left without the half-loaded adapter.
        ValueError: `adapter_scale` is not a finite number within bounds.
    """
    adapter_scale = check_lora_scale(adapter_scale)
    _check_projections_unfused(pipe)
    path, state, found = _read_lora_file(Path(path))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or ".lora_" not in rest:
            raise CheckpointError(f"{path}: key {key!r} is not a LoRA weight of the transformer or text_encoder "
                                  f"(keys look like 'transformer.<module>.lora_A.weight')")
        groups.setdefault(component, {})[rest] = value
    if not groups:
        raise CheckpointError(f"{path} holds no LoRA weights")
    checked = {}
    for component, sub in groups.items():
        model = getattr(pipe, component)
        if adapter_name in getattr(model, "peft_config", {}):
            raise CheckpointError(f"{path}: the {component} already has a LoRA adapter named {adapter_name!r}; "
                                  f"unload it first or pass another adapter_name")
        checked[component] = _check_adapter(path, component, model, sub, found["settings"].get(component),
                                            found["source"])
    for component, sub in groups.items():
        model, settings = getattr(pipe, component), checked[component]
        modules = sorted({k.split(".lora_")[0] for k in sub})
        config = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=modules,
                            lora_dropout=settings["lora_dropout"])
        try:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
            expected = lora_state_dict(model, adapter_name)
            missing, unexpected = sorted(set(expected) - set(sub)), sorted(set(sub) - set(expected))
            if missing or unexpected:  # peft matched more or fewer layers than the keys name
                raise CheckpointError(f"{path}: {component} LoRA keys do not fit the model: missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}")
            set_peft_model_state_dict(model, sub, adapter_name=adapter_name)
        except (ValueError, RuntimeError) as e:
            for name in checked:  # also the component loaded before this one
                _remove_adapter(getattr(pipe, name), adapter_name)
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: cannot apply the {component} LoRA: {e}") from e
        model.requires_grad_(False)
    set_lora_scale(pipe, adapter_scale, adapter_name)
    _forget_prompt_cache(pipe)


def _check_projections_unfused(pipe) -> None:
    """The fast path's fused q/k/v weights are copies of the base weights: LoRA would bypass or desync them."""
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None and any(getattr(m, "fused_qkv", None) is not None or
                                     getattr(m, "fused_kv", None) is not None for m in model.modules()):
            raise ValueError(f"the {component}'s attention projections are fused (fast path); change LoRA weights "
                             f"before fusing them, or call unfuse_projections() first")


def _lora_layers(pipe_or_model) -> list[BaseTunerLayer]:
    models = [pipe_or_model] if isinstance(pipe_or_model, nn.Module) else [
        getattr(pipe_or_model, c, None) for c in COMPONENTS]
    return [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_lora_scale(pipe, scale: float, adapter_name: str | None = None) -> None:
    """Set every LoRA layer's scale to `scale` x alpha / r (for one adapter, or all).

    Raises:
        ValueError: the adapters are fused (unfuse first).
    """
    scale = check_lora_scale(scale)
    _check_projections_unfused(pipe)
    layers = _lora_layers(pipe)
    if any(layer.merged for layer in layers):
        raise ValueError("the LoRA weights are fused into the model; call unfuse_lora before changing the scale")
    for layer in layers:
        for name in list(layer.scaling):
            if adapter_name is None or name == adapter_name:
                layer.set_scale(name, scale)
    _forget_prompt_cache(pipe)


def fuse_lora(pipe, adapter_names: list[str] | None = None) -> None:
    """Merge the adapters (at their current scale) into the base weights: no LoRA cost at inference."""
    _check_projections_unfused(pipe)
    layers = _lora_layers(pipe)
    if not layers:
        raise ValueError("no LoRA adapters to fuse; load_lora_weights first")
    for layer in layers:
        layer.merge(adapter_names=adapter_names)
    _forget_prompt_cache(pipe)


def unfuse_lora(pipe) -> None:
    """Subtract merged adapters from the base weights again (restores the weights up to float rounding)."""
    _check_projections_unfused(pipe)
    for layer in _lora_layers(pipe):
        while layer.merged:
            layer.unmerge()
    _forget_prompt_cache(pipe)


def unload_lora_weights(pipe) -> None:
    """Remove every adapter (unfusing first): the components go back to their plain layers."""
    unfuse_lora(pipe)
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None:
            for name in list(getattr(model, "peft_config", {})):
                _remove_adapter(model, name)
    _forget_prompt_cache(pipe)


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Drop one adapter; layers left with none are replaced by their base layer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if adapter_name in module.lora_A:
                module.delete_adapter(adapter_name)
            if not module.lora_A:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    configs = getattr(model, "peft_config", None)
    if configs is not None:
        configs.pop(adapter_name, None)
        if not configs:
            del model.peft_config


def _forget_prompt_cache(pipe) -> None:
    cache = getattr(pipe, "_negative_cache", None)  # the pipeline caches the empty prompt's embedding
    if isinstance(cache, dict):
        cache.clear()
