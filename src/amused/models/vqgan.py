"""VQGAN image tokenizer: conv encoder, nearest-codebook quantizer, conv decoder (Esser et al., 2021).

The aMUSEd tokenizer has no self-attention (`mid_block_add_attention: false`) and works on pixels in [0, 1].
Each of the `len(block_out_channels) - 1` down/up stages halves/doubles the resolution (16x for the published
5-stage model: 256 px <-> 16x16 tokens). Parameter names equal those of diffusers' `VQModel`, so the published
`vqvae/` weights load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_at_least, check_types


MAX_STAGES = 8  # resolution stages: 2 ** 7 = 128 pixels a token at most (the published tokenizer: 5, 16x)


@dataclass
class VQGANConfig:
    """Field names are those of the published `vqvae/config.json`."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 512, 768])
    layers_per_block: int = 2  # resnets per encoder stage (decoder stages have one more)
    latent_channels: int = 64
    num_vq_embeddings: int = 8192  # codebook size
    vq_embed_dim: int | None = None  # codebook vector width; defaults to latent_channels
    norm_num_groups: int = 32
    act_fn: str = "silu"
    sample_size: int = 32
    scaling_factor: float = 0.18215  # unused by aMUSEd; kept so configs round-trip
    norm_type: str = "group"
    mid_block_add_attention: bool = False
    lookup_from_codebook: bool = True
    force_upcast: bool = True  # decode in float32 when the weights are float16 (fp16 decoding overflows)
    down_block_types: list[str] | None = None  # informational (all "DownEncoderBlock2D")
    up_block_types: list[str] | None = None  # informational (all "UpDecoderBlock2D")

    def __post_init__(self):
        check_types(self)
        self.block_out_channels = list(self.block_out_channels)
        if self.vq_embed_dim is None:
            self.vq_embed_dim = self.latent_channels
        check_at_least(self, 1, "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                       "latent_channels", "num_vq_embeddings", "vq_embed_dim", "norm_num_groups", "sample_size")
        if not 1 <= len(self.block_out_channels) <= MAX_STAGES:
            raise ValueError(f"block_out_channels must have 1 to {MAX_STAGES} entries (a {2 ** (MAX_STAGES - 1)}x "
                             f"tokenizer at most), got {len(self.block_out_channels)}")
        if self.act_fn != "silu":
            raise ValueError(f"VQGAN act_fn {self.act_fn!r} is not supported (only 'silu')")
        if self.norm_type != "group":
            raise ValueError(f"VQGAN norm_type {self.norm_type!r} is not supported (only 'group')")
        if self.mid_block_add_attention:
            raise ValueError("VQGAN mid_block_add_attention=true is not supported: aMUSEd's tokenizer has none")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VQGAN block_out_channels {self.block_out_channels} must be multiples of "
                                 f"norm_num_groups {self.norm_num_groups}")
        n = len(self.block_out_channels)
        self.down_block_types = list(self.down_block_types or ["DownEncoderBlock2D"] * n)
        self.up_block_types = list(self.up_block_types or ["UpDecoderBlock2D"] * n)
        for name, known in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = getattr(self, name)
            if len(types) != n:
                raise ValueError(f"VQGAN {name} has {len(types)} entries but block_out_channels has {n}")
            if any(t != known for t in types):
                raise ValueError(f"VQGAN {name} {types} holds unknown block types: only {known!r} is supported")

    @property
    def scale_factor(self) -> int:
        """Pixels per token along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the checkpoints were trained


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """Resnets then an optional resampler; parameter names as diffusers' Down/UpDecoderBlock2D."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        if down:
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for sampler in getattr(self, "downsamplers", ()) or getattr(self, "upsamplers", ()):
            x = sampler(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.resnets[0](x))


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < len(ch) - 1) for i in range(len(ch))
        ])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([
            Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < len(ch) - 1) for i in range(len(ch))
        ])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Quantized(NamedTuple):
    """Result of `VectorQuantizer.forward`."""

    quantized: torch.Tensor  # (B, D, h, w) codebook vectors, straight-through gradient to the input
    ids: torch.Tensor  # (B, h, w) code indices
    codebook_loss: torch.Tensor  # scalar: pulls codes toward encoder outputs
    commitment_loss: torch.Tensor  # scalar: pulls encoder outputs toward codes (weight it by beta)


class VectorQuantizer(nn.Module):
    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_codes, dim)

    def forward(self, z: torch.Tensor) -> Quantized:
        B, D, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
        ids = torch.cdist(flat.float(), self.embedding.weight.float()).argmin(dim=1)
        q = self.embedding(ids).view(B, H, W, D).permute(0, 3, 1, 2).to(z.dtype)
        codebook_loss = F.mse_loss(q, z.detach())
        commitment_loss = F.mse_loss(z, q.detach())
        return Quantized(z + (q - z).detach(), ids.view(B, H, W), codebook_loss, commitment_loss)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> (B, D, h, w) codebook vectors."""
        return self.embedding(ids).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    """Encoder + quantizer + decoder. `encode` gives token ids, `decode` gives images in [0, 1]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.vq_embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.vq_embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.vq_embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def check_size(self, height: int, width: int, name: str = "image") -> None:
        f = self.config.scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"{name} size {width}x{height} (width x height) must be positive multiples of the "
                             f"VQ factor {f}")

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, D, H/f, W/f) continuous latents before quantization."""
        self.check_size(images.shape[-2], images.shape[-1])
        return self.quant_conv(self.encoder(images.to(self.dtype)))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, H/f, W/f) token ids."""
        return self.quantize(self.encode_latents(images)).ids

    def decode_latents(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) codebook vectors -> (B, 3, h*f, w*f) images, unclipped."""
        return self.decoder(self.post_quant_conv(quantized))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, h, w) token ids -> (B, 3, h*f, w*f) images clipped to [0, 1]."""
        return self.decode_latents(self.quantize.lookup(ids)).clamp(0, 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """Reconstruction for training: returns (reconstruction, quantizer result)."""
        q = self.quantize(self.encode_latents(images))
        return self.decode_latents(q.quantized), q
