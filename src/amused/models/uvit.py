"""The aMUSEd U-ViT: a masked-token transformer over VQ token grids (aMUSEd, arXiv 2401.01808).

Layout, top to bottom:
    token ids (B, h, w) -> embedding + RMSNorm + 1x1 conv            (conv "embed")
    -> down block: [optional 2x2 stride-2 downsample] + N x (ConvNeXt block, cross-attention block)
    -> project to hidden -> L x transformer layer (self-attn, cross-attn to text, GEGLU MLP, adaptive norms)
    -> project back -> up block: N x (ConvNeXt, cross-attention) + [optional 2x2 transposed-conv upsample]
    -> MLM head: 1x1 conv + RMSNorm + 1x1 conv to codebook logits (B, codebook, h, w).
Conditioning: text states (penultimate CLIP layer) feed every cross-attention; the pooled text embedding
concatenated with sinusoidal micro-conditioning feeds every adaptive norm. No positional embeddings.

Parameter names equal those of diffusers' `UVit2DModel`, so the published checkpoints load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import check_at_least, check_fraction, check_types
from .layers import AdaNorm, Attention, FeedForward, GlobalResponseNorm, RMSNorm, share_rows, sinusoidal_embedding


MAX_SAMPLE_SIZE = 256  # tokens a side: 4096 px with a 16x VQ-GAN (published models: 16 and 32)
MICRO_CONDS = 5  # [width, height, crop_top, crop_left, aesthetic_score]


@dataclass
class UViTConfig:
    """U-ViT hyper-parameters; field names are those of the published `transformer/config.json`."""

    hidden_size: int = 1024  # width of the transformer layers
    use_bias: bool = False  # biases in linear/conv layers (the published model has none)
    hidden_dropout: float = 0.0
    cond_embed_dim: int = 768  # pooled text embedding width
    micro_cond_encode_dim: int = 256  # sinusoidal width per micro-conditioning number
    micro_cond_embed_dim: int = 1280  # 5 numbers x micro_cond_encode_dim
    encoder_hidden_size: int = 768  # text hidden-state width
    vocab_size: int = 8256  # codebook + mask token, padded
    codebook_size: int = 8192  # logits are produced for codes only, never for the mask
    in_channels: int = 768  # token embedding width
    block_out_channels: int = 768  # width of the conv blocks
    num_res_blocks: int = 3  # (ConvNeXt, attention) pairs in each of the down and up blocks
    downsample: bool = False  # 2x down before the transformer (amused-512: 32x32 -> 16x16 tokens)
    upsample: bool = False
    block_num_heads: int = 12  # heads in the conv blocks' attention
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    attention_dropout: float = 0.0
    intermediate_size: int = 2816  # GEGLU inner width
    layer_norm_eps: float = 1e-6
    ln_elementwise_affine: bool = True
    sample_size: int = 64  # token grid side the model was trained on (16 for amused-256, 32 for amused-512)

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    def __post_init__(self):
        check_types(self)
        check_at_least(self, 1, "hidden_size", "cond_embed_dim", "micro_cond_encode_dim", "micro_cond_embed_dim",
                       "encoder_hidden_size", "vocab_size", "codebook_size", "in_channels", "block_out_channels",
                       "block_num_heads", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "sample_size")
        check_at_least(self, 0, "num_res_blocks")
        check_fraction(self, "hidden_dropout", "attention_dropout")
        if not 0 < self.layer_norm_eps < 1:
            raise ValueError(f"layer_norm_eps must be in (0, 1), got {self.layer_norm_eps!r}")
        if self.sample_size > MAX_SAMPLE_SIZE:  # generation defaults to this grid: 16384 would ask for 274 GB
            raise ValueError(f"sample_size {self.sample_size} is over {MAX_SAMPLE_SIZE} tokens a side")
        if self.downsample != self.upsample:
            raise ValueError(f"downsample ({self.downsample}) and upsample ({self.upsample}) must be equal, or the "
                             f"logits do not match the token grid")
        if self.downsample and self.sample_size % 2:
            raise ValueError(f"sample_size {self.sample_size} must be even when downsample is true")
        if self.micro_cond_encode_dim % 2:
            raise ValueError(f"micro_cond_encode_dim {self.micro_cond_encode_dim} must be even (cos and sin halves)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.block_out_channels % self.block_num_heads:
            raise ValueError(f"block_out_channels {self.block_out_channels} is not divisible by block_num_heads "
                             f"{self.block_num_heads}")
        if self.micro_cond_embed_dim != MICRO_CONDS * self.micro_cond_encode_dim:
            raise ValueError(f"micro_cond_embed_dim {self.micro_cond_embed_dim} must be {MICRO_CONDS} x "
                             f"micro_cond_encode_dim {self.micro_cond_encode_dim} (one encoding per number)")
        if self.codebook_size >= self.vocab_size:
            raise ValueError(f"codebook_size {self.codebook_size} must be smaller than vocab_size {self.vocab_size}")


# ----------------------------------------------------------------------------------------------------------
# Conv blocks (run at token-grid resolution, before and after the transformer)
# ----------------------------------------------------------------------------------------------------------


class ConvEmbed(nn.Module):
    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.in_channels)
        self.layer_norm = RMSNorm(cfg.in_channels, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.conv = nn.Conv2d(cfg.in_channels, cfg.block_out_channels, 1, bias=cfg.use_bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.embeddings(ids))  # (B, h, w, C_in)
        return self.conv(x.permute(0, 3, 1, 2))  # (B, C, h, w)


class ConvNextBlock(nn.Module):
    """Depthwise 3x3 conv, channel MLP with GRN, residual, then FiLM from the conditioning vector."""

    def __init__(self, cfg: UViTConfig, expansion: int = 4):
        super().__init__()
        c = cfg.block_out_channels
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=cfg.use_bias)
        self.norm = RMSNorm(c, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.channelwise_linear_1 = nn.Linear(c, c * expansion, bias=cfg.use_bias)
        self.channelwise_norm = GlobalResponseNorm(c * expansion)
        self.channelwise_linear_2 = nn.Linear(c * expansion, c, bias=cfg.use_bias)
        self.channelwise_dropout = nn.Dropout(cfg.hidden_dropout)
        self.cond_embeds_mapper = nn.Linear(cfg.hidden_size, c * 2, bias=cfg.use_bias)

    def film(self, cond: torch.Tensor, computed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), each (B, C, 1, 1), from the conditioning vector; computed once per call.
        `computed`: the (B, 2C) `[1 + scale | shift]` when computed already (`UViT.condition`, fused)."""
        if computed is not None:
            scale1, shift = computed.chunk(2, dim=1)
            return scale1[:, :, None, None], shift[:, :, None, None]
        scale, shift = self.cond_embeds_mapper(F.silu(cond)).chunk(2, dim=1)  # (B, C) each
        return 1 + scale[:, :, None, None], shift[:, :, None, None]

    def forward(self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self.norm(self.depthwise(x).permute(0, 2, 3, 1))  # (B, h, w, C)
        h = self.channelwise_linear_1(h)
        h = self.channelwise_norm(F.gelu(h))
        h = self.channelwise_dropout(self.channelwise_linear_2(h))
        x = x + h.permute(0, 3, 1, 2)
        return x * film[0] + film[1]


class BlockAttention(nn.Module):
    """Two cross-attentions from the grid to the (re-projected) text states, each pre-normed, residual."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        c = cfg.block_out_channels
        head_dim = c // cfg.block_num_heads
        self.kv_mapper = nn.Linear(cfg.hidden_size, c, bias=cfg.use_bias) if cfg.hidden_size != c else None
        self.norm1 = RMSNorm(c, 1e-6)
        self.attn1 = Attention(c, cfg.block_num_heads, head_dim, c, cfg.use_bias, cfg.use_bias)
        self.norm2 = RMSNorm(c, 1e-6)
        self.attn2 = Attention(c, cfg.block_num_heads, head_dim, c, cfg.use_bias, cfg.use_bias)
        self.register_buffer("fused_kv", None, persistent=False)  # both attentions' K/V: fuse_projections()

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Both attentions read the same text states: their keys and values in one matmul."""
        self.fused_kv = share_rows([self.attn1.to_k, self.attn1.to_v, self.attn2.to_k, self.attn2.to_v])
        half = self.fused_kv.shape[0] // 2
        self.attn1.fused_kv, self.attn2.fused_kv = self.fused_kv[:half], self.fused_kv[half:]

    def context(self, text: torch.Tensor, mapped: torch.Tensor | None = None) -> tuple:
        """Keys/values of both attentions over the text; computed once per call. `mapped`: the
        `kv_mapper(silu(text))` states when computed already."""
        if mapped is None:
            mapped = self.kv_mapper(F.silu(text)) if self.kv_mapper is not None else text  # (B, S, C)
        if self.fused_kv is not None:
            B, S, _ = mapped.shape
            kv = F.linear(mapped, self.fused_kv).view(B, S, 4, -1).permute(2, 0, 1, 3).contiguous()
            return (kv[0], kv[1]), (kv[2], kv[3])
        return self.attn1.kv(mapped), self.attn2.kv(mapped)

    def forward(self, x: torch.Tensor, context: tuple) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), kv=context[0])
        return x + self.attn2(self.norm2(x), kv=context[1])


class Resample(nn.Module):
    """RMSNorm then a 2x2 stride-2 conv (down) or transposed conv (up)."""

    def __init__(self, cfg: UViTConfig, up: bool):
        super().__init__()
        c = cfg.block_out_channels
        self.norm = RMSNorm(c, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        conv = nn.ConvTranspose2d if up else nn.Conv2d
        self.conv = conv(c, c, kernel_size=2, stride=2, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class UViTBlock(nn.Module):
    def __init__(self, cfg: UViTConfig, downsample: bool, upsample: bool):
        super().__init__()
        self.downsample = Resample(cfg, up=False) if downsample else None
        self.res_blocks = nn.ModuleList([ConvNextBlock(cfg) for _ in range(cfg.num_res_blocks)])
        self.attention_blocks = nn.ModuleList([BlockAttention(cfg) for _ in range(cfg.num_res_blocks)])
        self.upsample = Resample(cfg, up=True) if upsample else None

    def context(self, cond: torch.Tensor, text: torch.Tensor) -> list:
        return [(res.film(cond), attn.context(text)) for res, attn in zip(self.res_blocks, self.attention_blocks)]

    def forward(self, x: torch.Tensor, context: list) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        for res_block, attention_block, (film, kv) in zip(self.res_blocks, self.attention_blocks, context):
            x = res_block(x, film)
            B, C, H, W = x.shape
            x = attention_block(x.flatten(2).transpose(1, 2), kv)  # (B, H*W, C)
            x = x.transpose(1, 2).reshape(B, C, H, W)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


# ----------------------------------------------------------------------------------------------------------
# Transformer layers (run on the flattened, possibly downsampled grid)
# ----------------------------------------------------------------------------------------------------------


class TransformerLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to text, GEGLU MLP; every norm is adaptive."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        d, eps, affine, bias = cfg.hidden_size, cfg.layer_norm_eps, cfg.ln_elementwise_affine, cfg.use_bias
        head_dim = d // cfg.num_attention_heads
        self.norm1 = AdaNorm(d, d, "rms", eps, affine, bias)
        self.attn1 = Attention(d, cfg.num_attention_heads, head_dim, None, bias, bias)
        self.norm2 = AdaNorm(d, d, "rms", eps, affine, bias)
        self.attn2 = Attention(d, cfg.num_attention_heads, head_dim, d, bias, bias)
        self.norm3 = AdaNorm(d, d, "layer", eps, affine, bias)
        self.ff = FeedForward(d, cfg.intermediate_size, cfg.hidden_dropout, bias)

    def context(self, cond: torch.Tensor, text: torch.Tensor) -> tuple:
        """Everything that depends only on the conditioning: norm modulations, cross-attention keys/values."""
        return (self.norm1.modulation(cond), self.norm2.modulation(cond), self.norm3.modulation(cond),
                self.attn2.kv(text))

    def forward(self, x: torch.Tensor, context: tuple) -> torch.Tensor:
        mod1, mod2, mod3, kv = context
        x = x + self.attn1(self.norm1(x, mod1))
        x = x + self.attn2(self.norm2(x, mod2), kv=kv)
        return x + self.ff(self.norm3(x, mod3))


class CondEmbedding(nn.Module):
    """MLP from [pooled text | micro-conditioning features] to the hidden width."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class UViT(nn.Module):
    """The aMUSEd masked-token transformer. See the module docstring for the layout."""

    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.config = cfg
        d, eps, affine, bias = cfg.hidden_size, cfg.layer_norm_eps, cfg.ln_elementwise_affine, cfg.use_bias
        self.encoder_proj = nn.Linear(cfg.encoder_hidden_size, d, bias=bias)
        self.encoder_proj_layer_norm = RMSNorm(d, eps, affine)
        self.embed = ConvEmbed(cfg)
        self.cond_embed = CondEmbedding(cfg.micro_cond_embed_dim + cfg.cond_embed_dim, d, bias)
        self.down_block = UViTBlock(cfg, downsample=cfg.downsample, upsample=False)
        self.project_to_hidden_norm = RMSNorm(cfg.block_out_channels, eps, affine)
        self.project_to_hidden = nn.Linear(cfg.block_out_channels, d, bias=bias)
        self.transformer_layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.project_from_hidden_norm = RMSNorm(d, eps, affine)
        self.project_from_hidden = nn.Linear(d, cfg.block_out_channels, bias=bias)
        self.up_block = UViTBlock(cfg, downsample=False, upsample=cfg.upsample)
        self.mlm_layer = MlmHead(cfg)
        self.gradient_checkpointing = False
        # fuse_projections(): the per-call projections that share an input, as one matrix each (not saved)
        self.register_buffer("fused_modulation", None, persistent=False)  # every FiLM / adaptive norm, on cond
        self.register_buffer("fused_modulation_offset", None, persistent=False)
        self.register_buffer("fused_text_kv", None, persistent=False)  # every layer's cross-attention K/V
        self.register_buffer("fused_kv_mapper", None, persistent=False)  # every block attention's text mapper

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder_proj.weight.dtype

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_text_emb: torch.Tensor,
                micro_conds: torch.Tensor) -> torch.Tensor:
        """Logits over the codebook for every grid position.

        Args:
            input_ids: (B, h, w) token ids; the mask token is `config.mask_token_id`.
            encoder_hidden_states: (B, S, encoder_hidden_size) text states.
            pooled_text_emb: (B, cond_embed_dim) pooled text embedding.
            micro_conds: (B, 5) [width, height, crop_top, crop_left, aesthetic_score].

        Returns:
            (B, codebook_size, h, w) logits.
        """
        return self.forward_tokens(input_ids, self.condition(encoder_hidden_states, pooled_text_emb, micro_conds))

    def compile_blocks(self, **options) -> None:
        """`torch.compile` the repeated blocks in place, one by one (the transformer layers share one compiled
        graph, so compiling takes seconds, not minutes); parameter names and state-dict keys are unchanged.
        Used by the fast inference path and by `amused train --compile`."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in [*self.transformer_layers, self.down_block, self.up_block, self.mlm_layer, self.embed]:
            block.compile(dynamic=False, **options)

    def _modulated(self) -> list[nn.Linear]:
        """The projections of the conditioning vector (FiLM and adaptive norms), in `condition`'s order."""
        down, up = [r.cond_embeds_mapper for r in self.down_block.res_blocks], [r.cond_embeds_mapper for r in
                                                                               self.up_block.res_blocks]
        return down + [n.linear for layer in self.transformer_layers for n in (layer.norm1, layer.norm2, layer.norm3)] + up

    def _block_attentions(self) -> list[BlockAttention]:
        return [*self.down_block.attention_blocks, *self.up_block.attention_blocks]

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Inference layout: fused Q/K/V per attention, and the ~100 small projections of `condition` (every
        norm modulation, every cross-attention key/value) as one matmul per shared input. The parameters
        become views of the fused matrices (`share_rows`): no extra memory, state dict unchanged. Call again
        after the weights are replaced; the published model has no biases (with biases: Q/K/V only)."""
        modulated, blocks = self._modulated(), self._block_attentions()
        layer_kv = [lin for layer in self.transformer_layers for lin in (layer.attn2.to_k, layer.attn2.to_v)]
        if any(lin.bias is not None for lin in modulated + layer_kv + [b.attn1.to_k for b in blocks]):
            for module in self.modules():
                if isinstance(module, Attention):
                    module.fuse_projections()
            return
        for layer in self.transformer_layers:  # the cross-attentions' K/V go into the matrices below
            layer.attn1.fuse_projections()
        self.fused_modulation = share_rows(modulated)
        self.fused_modulation_offset = torch.cat([  # the "1 +" of every (1 + scale), added in one kernel
            torch.arange(lin.out_features, device=lin.weight.device) < lin.out_features // 2 for lin in modulated
        ]).to(self.fused_modulation.dtype)
        self.fused_text_kv = share_rows(layer_kv)
        rows = self.transformer_layers[0].attn2.to_k.out_features * 2
        for i, layer in enumerate(self.transformer_layers):
            layer.attn2.fused_kv = self.fused_text_kv[i * rows:(i + 1) * rows]
        for block in blocks:
            block.fuse_projections()
        mappers = [b.kv_mapper for b in blocks]
        if mappers and all(m is not None and m.bias is None for m in mappers):
            self.fused_kv_mapper = share_rows(mappers)

    def unfuse_projections(self) -> None:
        """Back to one matmul per projection (the weights stay where they are)."""
        self.fused_modulation = self.fused_modulation_offset = self.fused_text_kv = self.fused_kv_mapper = None
        for module in self.modules():
            if isinstance(module, (Attention, BlockAttention)):
                module.fused_kv = None
            if isinstance(module, Attention):
                module.fused_qkv = None

    def condition(self, encoder_hidden_states: torch.Tensor, pooled_text_emb: torch.Tensor,
                  micro_conds: torch.Tensor, grid: tuple[int, int] | None = None) -> "Conditioning":
        """Everything of the forward pass that depends on the text and micro-conditioning only. (`grid`, the
        token grid of the coming steps, is unused: nothing here depends on it; Meissonic's transformer, which
        shares this interface, builds its rotary table from it.)

        It is the same for every decoding step of a call, so the sampler computes it once and runs
        `forward_tokens` per step: per step that saves ~150 small matmuls at the published size (after
        `fuse_projections`, `condition` itself runs them as a few large ones).
        """
        text = self.encoder_proj_layer_norm(self.encoder_proj(encoder_hidden_states))  # (B, S, d)
        B = pooled_text_emb.shape[0]
        micro = sinusoidal_embedding(micro_conds.flatten(), self.config.micro_cond_encode_dim).reshape(B, -1)
        cond = torch.cat([pooled_text_emb, micro], dim=1).to(self.dtype)
        cond = self.cond_embed(cond).to(text.dtype)  # (B, d)
        if self.fused_modulation is None:
            return Conditioning(down=self.down_block.context(cond, text),
                                layers=[layer.context(cond, text) for layer in self.transformer_layers],
                                up=self.up_block.context(cond, text))
        modulated = self._modulated()
        projected = F.linear(F.silu(cond), self.fused_modulation) + self.fused_modulation_offset  # [1 + scale | shift]
        projected = projected.split([m.out_features for m in modulated], dim=1)  # per module, views
        S, n = text.shape[1], len(self.transformer_layers)
        kvs = F.linear(text, self.fused_text_kv).view(B, S, n, 2, -1).permute(2, 3, 0, 1, 4).contiguous()  # one
        # copy, so that every layer's keys and values are contiguous (B, S, C) tensors, as unfused
        blocks = self._block_attentions()
        mapped = (F.linear(F.silu(text), self.fused_kv_mapper).chunk(len(blocks), dim=-1)
                  if self.fused_kv_mapper is not None else [None] * len(blocks))
        contexts = [b.context(text, m) for b, m in zip(blocks, mapped)]
        n_down, n_up = len(self.down_block.res_blocks), len(self.up_block.res_blocks)
        films = [r.film(cond, p) for r, p in zip([*self.down_block.res_blocks, *self.up_block.res_blocks],
                                                 [*projected[:n_down], *projected[len(projected) - n_up:]])]
        norms = projected[n_down:len(projected) - n_up]
        layers = [(layer.norm1.modulation(cond, norms[3 * i]), layer.norm2.modulation(cond, norms[3 * i + 1]),
                   layer.norm3.modulation(cond, norms[3 * i + 2]), (kvs[i, 0], kvs[i, 1]))
                  for i, layer in enumerate(self.transformer_layers)]
        return Conditioning(down=list(zip(films[:n_down], contexts[:n_down])), layers=layers,
                            up=list(zip(films[n_down:], contexts[n_down:])))

    def forward_tokens(self, input_ids: torch.Tensor, ctx: "Conditioning",
                       timestep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, h, w) token ids + precomputed conditioning -> (B, codebook_size, h, w) logits. `timestep` is
        ignored: aMUSEd is not conditioned on the step (the sampler passes it to every model alike)."""
        B = input_ids.shape[0]
        x = self.down_block(self.embed(input_ids), ctx.down)  # (B, C, h', w')
        _, C, H, W = x.shape
        x = self.project_to_hidden(self.project_to_hidden_norm(x.permute(0, 2, 3, 1).reshape(B, H * W, C)))
        for layer, layer_ctx in zip(self.transformer_layers, ctx.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, layer_ctx, use_reentrant=False)
            else:
                x = layer(x, layer_ctx)  # (B, H*W, d)
        x = self.project_from_hidden(self.project_from_hidden_norm(x))
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2)
        return self.mlm_layer(self.up_block(x, ctx.up))


@dataclass
class Conditioning:
    """Per-call constants of the U-ViT forward (see `UViT.condition`)."""

    down: list  # per (ConvNeXt, attention) pair: (FiLM scale/shift, attention keys/values)
    layers: list  # per transformer layer: (3 norm modulations, cross-attention keys/values)
    up: list


class MlmHead(nn.Module):
    def __init__(self, cfg: UViTConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(cfg.block_out_channels, cfg.in_channels, 1, bias=cfg.use_bias)
        self.layer_norm = RMSNorm(cfg.in_channels, cfg.layer_norm_eps, cfg.ln_elementwise_affine)
        self.conv2 = nn.Conv2d(cfg.in_channels, cfg.codebook_size, 1, bias=cfg.use_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_norm(self.conv1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv2(x)  # (B, codebook, h, w)
