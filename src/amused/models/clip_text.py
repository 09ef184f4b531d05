"""CLIP's text tower (Radford et al., 2021), written here so that loading a published checkpoint does not import
transformers (1-2 s of imports before any weight is read).

The math and the parameter names follow transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`, so the
published `text_encoder/` folders (config.json + model[.fp16].safetensors) load with strict key checks and our
`save_pretrained` writes folders that transformers and diffusers read back:

    text_model.embeddings.{token,position}_embedding.weight
    text_model.encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}
    text_model.final_layer_norm
    text_projection.weight                              (WithProjection only, no bias)

A pre-norm transformer with a causal mask (CLIP's text tower is a GPT-style encoder). The pooled vector is the
final-norm state at the end-of-text token: the first position holding `eos_token_id`, or, for configs written
before transformers fixed that id (`eos_token_id == 2`), the position of the largest id (CLIP's end-of-text token
is the last of its vocabulary).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_at_least, check_fraction, check_types

ARCHITECTURES = ("CLIPTextModelWithProjection", "CLIPTextModel")
ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP-L/14's (OpenAI)
    "gelu": F.gelu,  # OpenCLIP's (CLIP-H/14)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings")
# config.json keys that say who wrote the file, not what the model is: dropped on reading, rewritten on saving
BOOKKEEPING = ("architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
               "_commit_hash", "_attn_implementation_autoset")


@dataclass
class CLIPTextConfig:
    """The text tower's shape, read from transformers' `CLIPTextConfig` keys (the defaults are transformers')."""

    vocab_size: int
    hidden_size: int  # per-token width
    intermediate_size: int  # MLP width
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int  # longest prompt, in tokens (77 for CLIP)
    projection_dim: int | None = None  # pooled output size (WithProjection); None without a projection
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0  # in training only
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407  # marks the pooled position; 2 means the legacy rule (see the module docstring)
    pad_token_id: int | None = 1
    architecture: str = "CLIPTextModelWithProjection"
    extra: dict = field(default_factory=dict, compare=False)  # config.json's other keys, written back as they were

    def __post_init__(self):
        check_types(self)
        check_at_least(self, 1, *REQUIRED)
        check_fraction(self, "attention_dropout")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported by amused's CLIP (choose one of "
                             f"{', '.join(ACTIVATIONS)}; AMUSED_TEXT_BACKEND=transformers loads it with transformers)")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.architecture == "CLIPTextModelWithProjection" and (self.projection_dim or 0) < 1:
            raise ValueError("projection_dim must be a positive integer for CLIPTextModelWithProjection")

    @property
    def model_class(self) -> type:
        return CLIPTextModelWithProjection if self.architecture == "CLIPTextModelWithProjection" else CLIPTextModel

    @classmethod
    def from_json(cls, data: dict, source: Path, architecture: str) -> "CLIPTextConfig":
        """The config of a text_encoder/config.json (`source`, named in errors) for `architecture`."""
        from ..loading import CheckpointError, check_sizes

        missing = [k for k in REQUIRED + (("projection_dim",) if architecture == ARCHITECTURES[0] else ())
                   if k not in data]
        if missing:
            raise CheckpointError(f"{source}: missing keys {missing} for {architecture}")
        names = {f.name for f in dataclasses.fields(cls)} - {"architecture", "extra"}
        values = {k: data[k] for k in names if k in data}
        check_sizes({k: v for k, v in values.items() if not k.endswith("_token_id")}, source)
        extra = {k: v for k, v in data.items() if k not in names and k not in BOOKKEEPING}
        try:
            return cls(**values, architecture=architecture, extra=extra)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from e

    def to_json(self, dtype: torch.dtype | None = None) -> dict:
        """config.json as transformers writes it (its `CLIPTextConfig` reads it back)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("architecture", "extra")}
        data = {**self.extra, **fields, "architectures": [self.architecture], "model_type": "clip_text_model"}
        if dtype is not None:
            data["torch_dtype"] = str(dtype).removeprefix("torch.")
        return data


@dataclass
class CLIPTextOutput:
    """What the tower returns (the fields of transformers' outputs that amused reads)."""

    last_hidden_state: torch.Tensor  # (B, S, D) after the final norm
    pooler_output: torch.Tensor  # (B, D) last_hidden_state at the end-of-text token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then every layer's output: L + 1 of (B, S, D)
    text_embeds: torch.Tensor | None = None  # (B, projection_dim): the projected pooler_output (WithProjection)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`, causal."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, D); mask: None (causal) or an additive (B, 1, S, S) mask that is causal already."""
        B, S, D = x.shape
        q, k, v = (proj(x).view(B, S, self.heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj,
                                                                                   self.v_proj))  # (B, H, S, Dh)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(B, S, D))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        S = ids.shape[1]
        if S > self.position_embedding.num_embeddings:
            raise ValueError(f"{S} tokens; the text encoder takes at most {self.position_embedding.num_embeddings}")
        return self.token_embedding(ids) + self.position_embedding.weight[:S]  # (B, S, D)


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, the layers and the final norm; pooled at the end-of-text token."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False) -> CLIPTextOutput:
        x = self.embeddings(ids)  # (B, S, D)
        mask = None if attention_mask is None else _causal_padding_mask(attention_mask, x.dtype)
        states = [x] if output_hidden_states else None
        for layer in self.encoder.layers:
            x = layer(x, mask)
            if states is not None:
                states.append(x)
        last = self.final_layer_norm(x)
        if self.eos_token_id == 2:  # legacy configs: end-of-text is the largest id
            where = ids.to(torch.int).argmax(-1)
        else:  # the first end-of-text (padding may repeat it)
            where = (ids == self.eos_token_id).int().argmax(-1)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), where]  # (B, D)
        return CLIPTextOutput(last, pooled, tuple(states) if states is not None else None)


def _causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1/0 key mask -> additive (B, 1, S, S) mask, causal too; a fully masked row attends uniformly (as
    transformers' eager attention does) rather than giving NaN."""
    S = attention_mask.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=attention_mask.device).tril()
    keep = causal & attention_mask.bool()[:, None, None, :]
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------
# The two published classes
# ----------------------------------------------------------------------------------------------------------


class CLIPTextModel(nn.Module):
    """The tower alone (its pooled output unprojected). Called as transformers' model is:
    `model(ids, attention_mask=None, output_hidden_states=True)` -> `CLIPTextOutput`."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True) -> CLIPTextOutput:
        return self.text_model(input_ids, attention_mask, output_hidden_states)

    def save_pretrained(self, folder: str | Path, variant: str | None = None) -> None:
        """config.json + model[.variant].safetensors, as transformers writes them."""
        save_clip_text(self, Path(folder), variant)


class CLIPTextModelWithProjection(CLIPTextModel):
    """The tower and a bias-free projection of its pooled output (`text_embeds`): aMUSEd's and Meissonic's text
    encoder."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, return_dict: bool = True) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        out.text_embeds = self.text_projection(out.pooler_output)
        return out


# ----------------------------------------------------------------------------------------------------------
# Reading and writing the published folder
# ----------------------------------------------------------------------------------------------------------

WEIGHTS_NAME = "model"  # transformers' file name: model[.variant].safetensors
STALE_KEYS = ("text_model.embeddings.position_ids",)  # a buffer older transformers saved; derived, not learned


def load_clip_text(folder: Path, architecture: str, variant: str | None = None, dtype: torch.dtype | None = None,
                   device: str | torch.device | None = None) -> CLIPTextModel:
    """Build the tower of `folder/config.json` on the meta device and assign the safetensors weights (strict keys
    and shapes), in float32 unless `dtype` says otherwise, on `device` (default: the CPU).

    Args:
        folder: a text_encoder/ folder (config.json + model[.variant].safetensors, or a sharded index).
        architecture: "CLIPTextModelWithProjection" or "CLIPTextModel" (what the config names).
    """
    from ..loading import skip_init, assign_weights, read_json

    config_path = folder / "config.json"
    config = CLIPTextConfig.from_json(read_json(config_path), config_path, architecture)
    path, state = _read_weights(folder, variant, device)
    for key in STALE_KEYS:
        state.pop(key, None)
    if not any(k.startswith("text_model.") for k in state):  # transformers 5 saves CLIPTextModel unprefixed
        state = {(k if k.startswith("text_projection.") else f"text_model.{k}"): v for k, v in state.items()}
    with skip_init(), torch.device("meta"):
        model = config.model_class(config)
    return assign_weights(model, state, path, dtype)


def _read_weights(folder: Path, variant: str | None, device) -> tuple[Path, dict[str, torch.Tensor]]:
    from ..loading import CheckpointError, load_state_dict, read_json, weights_file

    stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
    index = folder / f"{stem}.safetensors.index.json"
    if not (folder / f"{stem}.safetensors").is_file() and index.is_file():  # sharded (transformers' >5 GB files)
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards or any(Path(s).name != s or not s.endswith(".safetensors") for s in shards):
            raise CheckpointError(f"{index}: weight_map must name .safetensors files in its folder")
        state = {}
        for shard in shards:
            state.update(load_state_dict(folder / shard, device))
        return index, state
    path = weights_file(folder, WEIGHTS_NAME, variant)
    return path, load_state_dict(path, device)


def save_clip_text(model: CLIPTextModel, folder: Path, variant: str | None = None) -> None:
    from safetensors.torch import save_file

    from ..loading import atomic_write, write_json

    write_json(folder / "config.json", model.config.to_json(model.dtype))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    stem = f"{WEIGHTS_NAME}.{variant}" if variant else WEIGHTS_NAME
    atomic_write(folder / f"{stem}.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def native_architecture(config: dict, default: str) -> str | None:
    """The class of ours that runs a text_encoder/config.json (`architectures`, else `default`; a config naming
    neither but with model_type clip_text_model is a `CLIPTextModel`, as transformers' AutoModel reads it), or
    None when it is not a CLIP text tower (BERT, T5, ...: transformers loads those)."""
    archs = config.get("architectures") or [default]
    arch = archs[0] if isinstance(archs, list) else archs
    if arch == "AutoModel" and config.get("model_type") == "clip_text_model":
        return "CLIPTextModel"
    return arch if arch in ARCHITECTURES else None
