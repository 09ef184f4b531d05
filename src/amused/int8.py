"""Compact weight files: int8 matrices with one scale per output channel, still plain safetensors.

For the models we ship in the repository, whose size is budgeted (the embedded model: 32 MiB): a weight matrix
(2-D or more, at least `MIN_NUMEL` values) is stored as int8 `round(W / s)` with `s = max|W[i]| / 127` for each
output channel i (symmetric, per row: LLM.int8's vector-wise scheme without its outlier split), its scale as
`KEY.int8_scale`; everything else (biases, norms, small tensors) stays as it was. The file's metadata says so,
and `loading.load_state_dict` turns such a file back into floating-point tensors, so every loader reads both kinds
and the models never see int8. Half the bytes of fp16; the error is at most half a step of each row's scale.
"""

from __future__ import annotations

import torch

METADATA_KEY = "amused_weights"
METADATA_VALUE = "int8-per-channel"
SCALE_SUFFIX = ".int8_scale"
MIN_NUMEL = 4096  # smaller tensors are not worth their scale


def quantize(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """int8 + per-row scales for the weight matrices of `state`; returns (tensors, safetensors metadata)."""
    out = {}
    for key, tensor in state.items():
        if tensor.is_floating_point() and tensor.ndim >= 2 and tensor.numel() >= MIN_NUMEL:
            rows = tensor.float().reshape(tensor.shape[0], -1)  # (out channels, everything else)
            scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127
            out[key] = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(tensor.shape)
            out[key + SCALE_SUFFIX] = scale.to(torch.float32)
        else:
            out[key] = tensor.contiguous()
    return out, {METADATA_KEY: METADATA_VALUE}


def dequantize(state: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """The floating-point state of a file written by `quantize` (float32 matrices); `source` names it in errors.

    Raises:
        ValueError: an int8 tensor without its scale, a scale without its tensor, or a scale of the wrong shape.
    """
    scales = {k[:-len(SCALE_SUFFIX)]: v for k, v in state.items() if k.endswith(SCALE_SUFFIX)}
    out = {}
    for key, tensor in state.items():
        if key.endswith(SCALE_SUFFIX):
            if key[:-len(SCALE_SUFFIX)] not in state:
                raise ValueError(f"{source}: {key} scales no tensor")
            continue
        if tensor.dtype != torch.int8:
            out[key] = tensor
            continue
        scale = scales.get(key)
        if scale is None:
            raise ValueError(f"{source}: {key} is int8 without {key}{SCALE_SUFFIX}")
        if tensor.ndim < 2 or tuple(scale.shape) != (tensor.shape[0],) or not scale.is_floating_point():
            raise ValueError(f"{source}: {key}{SCALE_SUFFIX} has shape {tuple(scale.shape)}, {key} needs "
                             f"({tensor.shape[0]},)")
        out[key] = tensor.float() * scale.float().view(-1, *([1] * (tensor.ndim - 1)))
    return out
