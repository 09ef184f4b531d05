"""The Meissonic / Monetico masked-token transformer (Bai et al., arXiv 2410.08261; viiika/Meissonic
src/transformer.py, collovlabs/Monetico): aMUSEd's token embedding, conv resampling and MLM head around a
Flux-style (black-forest-labs/flux) stack of joint text-image blocks.

Layout, top to bottom:
    token ids (B, h, w) -> embedding + RMSNorm + 1x1 conv                          (as aMUSEd)
    -> [optional RMSNorm + 2x2 stride-2 conv]  -> RMSNorm + linear to tokens (B, h'w', d)
    -> num_layers x dual-stream block: text and image keep their own weights, attend jointly
    -> num_single_layers x single-stream block over [text | image]
    -> image part, RMSNorm + linear -> [optional RMSNorm + 2x2 transposed conv]
    -> MLM head: 1x1 conv + RMSNorm + 1x1 conv to codebook logits (B, codebook, h, w)  (as aMUSEd)
Conditioning: text states (penultimate CLIP-ViT-H layer) are the text stream; every block's AdaLN-Zero reads
`temb` = MLP(sinusoid(1000 * timestep)) + MLP(cond), where cond = MLP([pooled text | micro-conditioning
sinusoids]) as in aMUSEd. Queries and keys get 2-D rotary embeddings from per-token ids (0, row, col) over the
downsampled image grid; text tokens all have id (0, 0, 0), so rotation leaves them unchanged.

The timestep is what the reference pipeline passes: the scheduler's integer timestep, N - 1 - i at step i of
N (`reference_timesteps`), which the model multiplies by 1000 (the training script instead passes the mask
ratio times 1000; we follow the published pipeline, which produced the published images).

Parameter names equal the reference's state-dict keys and config fields equal the published
`transformer/config.json`, so `amused.loading.load_model(MeissonicTransformer, MeissonicConfig, folder)` loads
the published checkpoints unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, sinusoidal_embedding

CLASS_NAME = "Transformer2DModel"  # the `_class_name` of the published transformer/config.json
MICRO_COND_ENCODE_DIM = 256  # sinusoid width per micro-conditioning number (hard-coded in the reference)
MICRO_CONDS = 5  # [width, height, crop_top, crop_left, aesthetic_score]
TIME_ENCODE_DIM = 256  # sinusoid width of the timestep
ROPE_THETA = 10000.0
EPS = 1e-6  # every norm of the reference


@dataclass
class MeissonicConfig:
    """Transformer hyper-parameters; field names are exactly the keys of the published `transformer/config.json`.
    Defaults are MeissonFlow/Meissonic's (1024 px)."""

    patch_size: int = 1  # unused by the reference (tokens are never patched); only 1 is accepted
    in_channels: int = 64  # unused by the reference (a Flux leftover); kept so the published config loads
    num_layers: int = 14  # dual-stream (joint attention, separate text/image weights) blocks
    num_single_layers: int = 28  # single-stream blocks over [text | image]
    attention_head_dim: int = 128
    num_attention_heads: int = 8  # inner width d = heads x head_dim = 1024
    joint_attention_dim: int = 1024  # text hidden-state width (CLIP-ViT-H)
    pooled_projection_dim: int = 1024  # pooled text width; must equal d (the reference feeds d-wide cond to it)
    guidance_embeds: bool = False  # Flux's distilled-guidance input; no published checkpoint has it
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # rotary dims per id axis (0, row, col); sum = head_dim
    vocab_size: int = 8256  # codebook + mask token, padded
    codebook_size: int = 8192  # logits cover codes only, never the mask
    downsample: bool = True  # 2x down before the blocks (Meissonic: 64x64 -> 32x32 tokens; Monetico: no)
    upsample: bool = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1  # as the reference's training script and scheduler config

    @property
    def sample_size(self) -> int:
        """Native token-grid side. The published configs do not record it: Meissonic (downsampling) was trained
        at 1024 px (64x64 tokens), Monetico (none) at 512 px (32x32); the reference pipeline runs those only."""
        return 64 if self.downsample else 32

    def __post_init__(self):
        self.axes_dims_rope = tuple(self.axes_dims_rope)  # JSON gives a list
        for name in ("num_attention_heads", "attention_head_dim", "joint_attention_dim", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 0 or self.num_single_layers < 0:
            raise ValueError(f"num_layers and num_single_layers must be >= 0, got {self.num_layers}, "
                             f"{self.num_single_layers}")
        if self.patch_size != 1:
            raise ValueError(f"patch_size must be 1 (the reference never patches tokens), got {self.patch_size}")
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True (Flux's guidance embedding) is not supported: no published "
                             "Meissonic checkpoint uses it")
        if self.pooled_projection_dim != self.inner_dim:
            raise ValueError(f"pooled_projection_dim {self.pooled_projection_dim} must equal num_attention_heads x "
                             f"attention_head_dim = {self.inner_dim} (the reference's text embedder reads the "
                             f"d-wide conditioning)")
        if any(d < 2 or d % 2 for d in self.axes_dims_rope) or sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)} must be even numbers summing to "
                             f"attention_head_dim {self.attention_head_dim}")
        if self.downsample != self.upsample:
            raise ValueError(f"downsample ({self.downsample}) and upsample ({self.upsample}) must agree, or the "
                             f"output grid differs from the input grid")
        if self.codebook_size >= self.vocab_size:
            raise ValueError(f"codebook_size {self.codebook_size} must be smaller than vocab_size {self.vocab_size}")


# Published configs. Meissonic: MeissonFlow/Meissonic transformer/config.json (HF commit a3c384a), which
# equals the from-scratch config in viiika/Meissonic train/train_meissonic.py. Monetico: Collov-Labs/Monetico
# transformer/config.json (HF commit 13db19e sets downsample/upsample false; the other keys shown there equal
# Meissonic's); its num_layers and num_attention_heads are not in that diff: we take 14 from Monetico's own
# training script and 8 from pooled_projection_dim = 1024 = heads x 128 (see the notes in the report).
MEISSONIC_PRESETS = {
    "meissonic": lambda: MeissonicConfig(),
    "monetico": lambda: MeissonicConfig(downsample=False, upsample=False),
    "tiny": lambda: MeissonicConfig(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                    joint_attention_dim=12, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4),
                                    vocab_size=24, codebook_size=16),
}


def meissonic_config(name: str, **overrides) -> MeissonicConfig:
    if name not in MEISSONIC_PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(MEISSONIC_PRESETS)}")
    return dataclasses.replace(MEISSONIC_PRESETS[name](), **overrides)


def reference_timesteps(num_steps: int, device=None) -> torch.Tensor:
    """The timestep the reference pipeline gives the transformer at each step: N - 1 - i at step i, as float32
    (N,). The decode loop passes `timesteps[i]` (a 0-d tensor, static index: no sync)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    return torch.arange(num_steps - 1, -1, -1, device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Rotary position embedding over (0, row, col) ids
# ----------------------------------------------------------------------------------------------------------


def rotary_table(ids: torch.Tensor, axes_dims: tuple[int, ...], theta: float = ROPE_THETA
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every token's rotation angles, each axis taking `axes_dims[i]` channels.

    Args:
        ids: (N, n_axes) positions.

    Returns:
        cos, sin: (N, sum(axes_dims)) float32, each angle repeated for the two channels of its pair. Angles
        are computed in float64, as the reference does (except on MPS, which has no float64).
    """
    f64 = torch.float32 if ids.device.type == "mps" else torch.float64
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=f64, device=ids.device) / dim))  # (dim/2,)
        angles = torch.outer(ids[:, axis].to(f64), freqs)  # (N, dim/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def joint_rotary(text_len: int, height: int, width: int, axes_dims: tuple[int, ...], device=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary table of the joint sequence [text | image]: text ids all (0, 0, 0), image ids (0, row, col)
    over the (height, width) grid the blocks see, row-major. Each (text_len + height*width, head_dim)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (HW,)
    cols = torch.arange(width, device=device).repeat(height)
    image = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)  # (HW, 3)
    ids = torch.cat([torch.zeros(text_len, 3, dtype=image.dtype, device=device), image])  # (S + HW, 3)
    return rotary_table(ids, axes_dims)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, heads, L, D) by the table's angles (L, D), in float32."""
    cos, sin = rope
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, L, D/2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)  # (B, heads, L, D)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Transformer blocks (Flux: MMDiT dual-stream, then single-stream with parallel attention and MLP)
# ----------------------------------------------------------------------------------------------------------


class AdaLayerNormZero(nn.Module):
    """LayerNorm (no affine) modulated by `temb`: chunks [shift, scale, gate] x `n_mods` / 3 of Linear(silu(temb))."""

    def __init__(self, dim: int, n_mods: int):
        super().__init__()
        self.linear = nn.Linear(dim, n_mods * dim)
        self.n_mods = n_mods

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mods = [m[:, None, :] for m in self.linear(F.silu(temb)).chunk(self.n_mods, dim=1)]  # each (B, 1, d)
        shift, scale = mods[0], mods[1]
        return F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale) + shift, mods[2:]


class JointAttention(nn.Module):
    """Multi-head attention with RMS-normed queries and keys and rotary positions. With `context_dim` it also
    projects a second stream (text) with its own weights and attends over [text | x] jointly (dual-stream);
    without, it is plain self-attention that returns the heads unprojected (single-stream: the block projects
    them together with its MLP)."""

    def __init__(self, dim: int, heads: int, head_dim: int, dual: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(head_dim, EPS), RMSNorm(head_dim, EPS)
        if dual:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, EPS), RMSNorm(head_dim, EPS)
            self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
            self.to_add_out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, L, inner) -> (B, heads, L, head_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                text: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        q = self.norm_q(self._heads(self.to_q(x)))  # (B, heads, L, head_dim)
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        if text is not None:
            q = torch.cat([self.norm_added_q(self._heads(self.add_q_proj(text))), q], dim=2)  # (B, heads, S+L, hd)
            k = torch.cat([self.norm_added_k(self._heads(self.add_k_proj(text))), k], dim=2)
            v = torch.cat([self._heads(self.add_v_proj(text)), v], dim=2)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, S+L, inner)
        if text is None:
            return out
        S = text.shape[1]
        # contiguous copies, as the reference: a linear on the strided slice takes another (CPU bf16) kernel
        return self.to_out[0](out[:, S:].contiguous()), self.to_add_out(out[:, :S].contiguous())  # image, text


class TanhGELU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """4x MLP with tanh-GELU; `net` = [GELU(proj), dropout, Linear] as in the checkpoints."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([TanhGELU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x  # a dtype test: static, not data-dependent


class DualStreamBlock(nn.Module):
    """MMDiT block: text and image each get AdaLN-Zero, their own projections and MLP; attention is joint."""

    def __init__(self, cfg: MeissonicConfig):
        super().__init__()
        d = cfg.inner_dim
        self.norm1 = AdaLayerNormZero(d, 6)
        self.norm1_context = AdaLayerNormZero(d, 6)
        self.attn = JointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, dual=True)
        self.ff = FeedForward(d)
        self.ff_context = FeedForward(d)

    def forward(self, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        nx, (gate, shift2, scale2, gate2) = self.norm1(x, temb)  # (B, L, d), mods (B, 1, d)
        nt, (c_gate, c_shift2, c_scale2, c_gate2) = self.norm1_context(text, temb)  # (B, S, d)
        attn_x, attn_t = self.attn(nx, rope, text=nt)
        x = x + gate * attn_x
        x = x + gate2 * self.ff(F.layer_norm(x, x.shape[-1:], eps=EPS) * (1 + scale2) + shift2)
        text = text + c_gate * attn_t
        text = text + c_gate2 * self.ff_context(F.layer_norm(text, text.shape[-1:], eps=EPS) * (1 + c_scale2) + c_shift2)
        return x, _clip_fp16(text)


class SingleStreamBlock(nn.Module):
    """Flux single block: one AdaLN-Zero, attention and a 4x MLP in parallel, one output projection."""

    def __init__(self, cfg: MeissonicConfig):
        super().__init__()
        d = cfg.inner_dim
        self.norm = AdaLayerNormZero(d, 3)
        self.proj_mlp = nn.Linear(d, 4 * d)
        self.proj_out = nn.Linear(d + 4 * d, d)
        self.attn = JointAttention(d, cfg.num_attention_heads, cfg.attention_head_dim, dual=False)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nx, (gate,) = self.norm(x, temb)  # (B, S+L, d)
        mlp = F.gelu(self.proj_mlp(nx), approximate="tanh")  # (B, S+L, 4d)
        out = self.proj_out(torch.cat([self.attn(nx, rope), mlp], dim=2))  # (B, S+L, d)
        return _clip_fp16(x + gate * out)


# ----------------------------------------------------------------------------------------------------------
# aMUSEd's pieces around the blocks, and the conditioning MLPs
# ----------------------------------------------------------------------------------------------------------


class ConvEmbed(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, dim)
        self.layer_norm = RMSNorm(dim, EPS)
        self.conv = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.embeddings(ids))  # (B, h, w, d)
        return self.conv(x.permute(0, 3, 1, 2))  # (B, d, h, w)


class Resample(nn.Module):
    """RMSNorm then a 2x2 stride-2 conv (down) or transposed conv (up), no bias."""

    def __init__(self, dim: int, up: bool):
        super().__init__()
        self.norm = RMSNorm(dim, EPS)
        self.conv = (nn.ConvTranspose2d if up else nn.Conv2d)(dim, dim, kernel_size=2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class ResampleBlock(nn.Module):
    """Holds the optional resampler under the reference's names (`down_block.downsample`, `up_block.upsample`)."""

    def __init__(self, dim: int, downsample: bool, upsample: bool):
        super().__init__()
        self.downsample = Resample(dim, up=False) if downsample else None
        self.upsample = Resample(dim, up=True) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class MlmHead(nn.Module):
    def __init__(self, dim: int, codebook_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.layer_norm = RMSNorm(dim, EPS)
        self.conv2 = nn.Conv2d(dim, codebook_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(x)  # (B, codebook, h, w)


class MLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArtAlphaTextProjection layout)."""

    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out, bias=bias)
        self.linear_2 = nn.Linear(dim_out, dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """temb = timestep_embedder(sinusoid(t)) + text_embedder(cond)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLP(TIME_ENCODE_DIM, dim)
        self.text_embedder = MLP(pooled_dim, dim)


@dataclass
class MeissonicConditioning:
    """Per-call constants of the forward pass (see `MeissonicTransformer.condition`)."""

    text: torch.Tensor  # (B, S, d) projected text states, the text stream's input
    text_temb: torch.Tensor  # (B, d) the pooled-text + micro-conditioning half of temb
    rope: tuple[torch.Tensor, torch.Tensor]  # rotary table of [text | image] for `grid`, each (S + H*W, head_dim)
    grid: tuple[int, int]  # the input token grid (h, w) `rope` was built for


class MeissonicTransformer(nn.Module):
    """The Meissonic masked-token transformer. See the module docstring for the layout."""

    def __init__(self, cfg: MeissonicConfig):
        super().__init__()
        self.config = cfg
        d = cfg.inner_dim
        self.time_text_embed = TimeTextEmbed(d, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, d)
        self.transformer_blocks = nn.ModuleList([DualStreamBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)])
        self.embed = ConvEmbed(cfg.vocab_size, d)
        self.mlm_layer = MlmHead(d, cfg.codebook_size)
        self.cond_embed = MLP(MICRO_CONDS * MICRO_COND_ENCODE_DIM + cfg.pooled_projection_dim, d, bias=False)
        self.encoder_proj_layer_norm = RMSNorm(d, EPS)
        self.project_to_hidden_norm = RMSNorm(d, EPS)
        self.project_to_hidden = nn.Linear(d, d, bias=False)
        self.project_from_hidden_norm = RMSNorm(d, EPS)
        self.project_from_hidden = nn.Linear(d, d, bias=False)
        self.down_block = ResampleBlock(d, downsample=cfg.downsample, upsample=False)
        self.up_block = ResampleBlock(d, downsample=False, upsample=cfg.upsample)

    @property
    def dtype(self) -> torch.dtype:
        return self.context_embedder.weight.dtype

    def compile_blocks(self, **options) -> None:
        """`torch.compile` the repeated blocks in place, one by one (the blocks of each kind share one compiled
        graph: seconds of compilation, not minutes); state-dict keys are unchanged. The fast path's "blocks" mode."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in [*self.transformer_blocks, *self.single_transformer_blocks, self.embed, self.mlm_layer]:
            block.compile(dynamic=False, **options)

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_text_emb: torch.Tensor,
                micro_conds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Logits over the codebook for every grid position.

        Args:
            input_ids: (B, h, w) token ids; the mask token is `config.mask_token_id`.
            encoder_hidden_states: (B, S, joint_attention_dim) text states (penultimate CLIP layer).
            pooled_text_emb: (B, pooled_projection_dim) projected pooled text embedding (`text_embeds`).
            micro_conds: (B, 5) [width, height, crop_top, crop_left, aesthetic_score].
            timestep: 0-d or (B,) tensor, the reference pipeline's timestep (`reference_timesteps`).

        Returns:
            (B, codebook_size, h, w) logits.
        """
        ctx = self.condition(encoder_hidden_states, pooled_text_emb, micro_conds, grid=tuple(input_ids.shape[1:]))
        return self.forward_tokens(input_ids, ctx, timestep)

    def condition(self, encoder_hidden_states: torch.Tensor, pooled_text_emb: torch.Tensor, micro_conds: torch.Tensor,
                  grid: tuple[int, int] | None = None) -> MeissonicConditioning:
        """Everything of the forward pass that depends on the prompt and micro-conditioning only; the sampler
        computes it once per call. `grid`: the (h, w) token grid of the coming `forward_tokens` calls, to build
        the rotary table here once (default: the native `config.sample_size` square); a call on another grid
        builds its own table, with the same numbers."""
        B = pooled_text_emb.shape[0]
        micro = sinusoidal_embedding(micro_conds.flatten(), MICRO_COND_ENCODE_DIM).reshape(B, -1)  # (B, 1280) f32
        cond = torch.cat([pooled_text_emb, micro], dim=1).to(self.dtype)  # (B, pooled + 1280)
        cond = self.cond_embed(cond).to(encoder_hidden_states.dtype)  # (B, d)
        text = self.encoder_proj_layer_norm(self.context_embedder(encoder_hidden_states))  # (B, S, d)
        grid = grid or (self.config.sample_size, self.config.sample_size)
        h, w = self._block_grid(*grid)
        rope = joint_rotary(text.shape[1], h, w, self.config.axes_dims_rope, device=text.device)
        return MeissonicConditioning(text=text, text_temb=self.time_text_embed.text_embedder(cond), rope=rope,
                                     grid=tuple(grid))

    def _block_grid(self, h: int, w: int) -> tuple[int, int]:
        """The grid the blocks see: halved by the downsampler (which needs even sides)."""
        if not self.config.downsample:
            return h, w
        if h % 2 or w % 2:
            raise ValueError(f"a {h}x{w} token grid cannot be downsampled 2x; use even sides")
        return h // 2, w // 2

    def forward_tokens(self, input_ids: torch.Tensor, ctx: MeissonicConditioning, timestep: torch.Tensor) -> torch.Tensor:
        """(B, h, w) token ids + precomputed conditioning + this step's timestep -> (B, codebook_size, h, w) logits.

        `timestep` is the reference pipeline's value for the step, a 0-d or (B,) tensor on the model's device:
        N - 1 - i at step i of N (`reference_timesteps(N, device)[i]`; img2img and inpainting too, from their start
        step); the model scales it by 1000. No host syncs and no data-dependent branches: shapes alone choose paths.
        """
        B = input_ids.shape[0]
        H, W = self._block_grid(*input_ids.shape[1:])  # Python ints: checks the grid, no sync
        t = (timestep.to(self.dtype) * 1000).reshape(-1)  # (1,) or (B,), in the model dtype as the reference
        t_feat = sinusoidal_embedding(t, TIME_ENCODE_DIM).to(ctx.text_temb.dtype)  # (1|B, 256)
        temb = self.time_text_embed.timestep_embedder(t_feat) + ctx.text_temb  # (B, d)

        x = self.down_block(self.embed(input_ids))  # (B, d, H, W)
        C = x.shape[1]
        x = self.project_to_hidden(self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(B, H * W, C)))
        text = ctx.text  # (B, S, d)
        S = text.shape[1]
        rope = ctx.rope if tuple(input_ids.shape[1:]) == ctx.grid else joint_rotary(
            S, H, W, self.config.axes_dims_rope, device=x.device)  # each (S + H*W, head_dim)
        for block in self.transformer_blocks:
            x, text = block(x, text, temb, rope)  # (B, HW, d), (B, S, d)
        x = torch.cat([text, x], dim=1)  # (B, S + HW, d)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope)
        x = self.project_from_hidden(self.project_from_hidden_norm(x[:, S:]))  # (B, HW, d)
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, d, H, W)
        return self.mlm_layer(self.up_block(x))  # (B, codebook, h, w)
