"""Building blocks shared by the U-ViT: norms, attention, gated MLP, sinusoidal features.

Parameter names follow the diffusers modules that the published aMUSEd checkpoints were saved from
(`to_q`/`to_k`/`to_v`/`to_out.0`, `ff.net.0.proj`, `norm.weight`, ...), so a checkpoint's state dict loads
into these modules without renaming.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (Zhang & Sennrich, 2019), statistics in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # promoted to float32 here
        if self.weight is None:
            return x.to(dtype)
        return x.to(self.weight.dtype) * self.weight


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response norm on channels-last input (B, H, W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` (flash / memory-efficient kernels).

    Self-attention when `context` is None, cross-attention otherwise. Q, K and V stay separate parameters so
    checkpoints load as saved; `fuse_projections()` lays them out as one matrix for inference speed.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None, bias: bool = False,
                 out_bias: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias)])
        # Set by fuse_projections(), for inference only; buffers, so that .to() moves them, but not saved.
        self.register_buffer("fused_qkv", None, persistent=False)
        self.register_buffer("fused_kv", None, persistent=False)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One matmul for Q/K/V (self-attention) or K/V (cross-attention): the weights laid out as one matrix
        (`share_rows`: the parameters become views of it, no extra memory).

        Call again after the weights are replaced (LoRA fusing), or `unfuse_projections()`.
        """
        if any(lin.bias is not None for lin in (self.to_q, self.to_k, self.to_v)):
            return  # the published model has no biases; keep the plain path for the rare biased config
        if self.to_q.in_features == self.to_k.in_features:  # self-attention: Q/K/V, whose K/V rows are the KV
            self.fused_qkv = share_rows([self.to_q, self.to_k, self.to_v])
            self.fused_kv = self.fused_qkv[self.to_q.out_features:]
        else:
            self.fused_kv = share_rows([self.to_k, self.to_v])

    def unfuse_projections(self) -> None:
        self.fused_qkv = self.fused_kv = None

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a cross-attention context; constant over decoding steps, so computed once."""
        if self.fused_kv is not None:
            k, v = F.linear(context, self.fused_kv).chunk(2, dim=-1)
            return k, v
        return self.to_k(context), self.to_v(context)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Self-attention (no context), or cross-attention to `context` or to its precomputed `kv`."""
        B, L, _ = x.shape
        if kv is not None:
            q, (k, v) = self.to_q(x), kv
        elif context is None and self.fused_qkv is not None:
            q, k, v = F.linear(x, self.fused_qkv).chunk(3, dim=-1)
        else:
            q, (k, v) = self.to_q(x), self.kv(x if context is None else context)
        q = q.view(B, L, self.heads, -1).transpose(1, 2)  # (B, h, L, d)
        k = k.view(B, k.shape[1], self.heads, -1).transpose(1, 2)  # (B, h, S, d)
        v = v.view(B, v.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d)
        return self.to_out[0](out.transpose(1, 2).reshape(B, L, -1))


@torch.no_grad()
def share_rows(linears: list[nn.Linear]) -> torch.Tensor:
    """The weights of bias-free linears that read the same input, concatenated into one (sum of outputs, in)
    matrix, each weight turned into a view of its rows: one matmul then computes all of them, and the
    parameters (names, state dict) are unchanged, with no second copy in memory."""
    if any(lin.bias is not None for lin in linears):
        raise ValueError("share_rows takes bias-free linears")
    matrix = torch.cat([lin.weight for lin in linears])
    row = 0
    for lin in linears:
        lin.weight.data = matrix[row:row + lin.out_features]
        row += lin.out_features
    return matrix


class GEGLU(nn.Module):
    """Linear projection to 2x width, half of it gating the other half through GELU."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = False):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward; `net` = [GEGLU, dropout, Linear] as in the checkpoints."""

    def __init__(self, dim: int, inner_dim: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, inner_dim, bias), nn.Dropout(dropout), nn.Linear(inner_dim, dim, bias=bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class AdaNorm(nn.Module):
    """Norm whose scale and shift come from a conditioning vector: norm(x) * (1 + scale) + shift.

    `kind` is "rms" or "layer"; the transformer layers use RMS before attention and LayerNorm (no bias)
    before the MLP, as the published model does.
    """

    def __init__(self, dim: int, cond_dim: int, kind: str, eps: float, elementwise_affine: bool = True,
                 bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(cond_dim, dim * 2, bias=bias)
        if kind == "rms":
            self.norm = RMSNorm(dim, eps, elementwise_affine)
        elif kind == "layer":
            self.norm = nn.LayerNorm(dim, eps, elementwise_affine, bias=bias)
        else:
            raise ValueError(f"AdaNorm kind must be 'rms' or 'layer', got {kind!r}")

    def modulation(self, cond: torch.Tensor, computed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), each (B, 1, C): constant over decoding steps, so computed once. `computed`: the
        (B, 2C) `[1 + scale | shift]` when computed already (with every other norm's, in one matmul)."""
        if computed is not None:
            scale1, shift = computed.chunk(2, dim=1)
            return scale1[:, None, :], shift[:, None, :]
        scale, shift = self.linear(F.silu(cond)).chunk(2, dim=1)  # (B, C) each
        return (1 + scale)[:, None, :], shift[:, None, :]

    def forward(self, x: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, shift = modulation
        return self.norm(x) * scale + shift


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] features of scalar values, as used for aMUSEd's micro-conditioning.

    Args:
        values: 1-D tensor of N numbers.
        dim: even output width.

    Returns:
        (N, dim) float32 tensor.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
