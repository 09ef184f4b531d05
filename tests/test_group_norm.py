"""amused.group_norm: the chunked GroupNorm the fast path uses for the VQ decoder equals F.group_norm."""

import pytest
import torch
import torch.nn.functional as F

from amused.group_norm import ChunkedGroupNorm, group_norm_chunked, use_chunked_group_norm
from amused.models.vqgan import VQGAN, VQGANConfig


@pytest.mark.parametrize("shape,groups", [((2, 64, 16, 16), 32), ((1, 128, 8, 8), 32), ((3, 32, 5, 7), 8)])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_matches_group_norm(shape, groups, layout):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(memory_format=layout)
    weight, bias = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    out = group_norm_chunked(x, groups, weight, bias, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.group_norm(x, groups, weight, bias, 1e-6), rtol=1e-5, atol=2e-5)
    # bf16 input: float32 statistics and result, as autocast's group_norm
    xb = x.bfloat16()
    torch.testing.assert_close(group_norm_chunked(xb, groups, None, None, 1e-6),
                               F.group_norm(xb.float(), groups, None, None, 1e-6), rtol=1e-5, atol=2e-5)


def test_swap_keeps_weights_and_output():
    cfg = VQGANConfig(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4, num_vq_embeddings=16,
                      norm_num_groups=8)
    torch.manual_seed(0)
    vq = VQGAN(cfg).eval()
    ids = torch.randint(0, 16, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, keys = vq.decode(ids), list(vq.state_dict())
        assert use_chunked_group_norm(vq.decoder) > 0
        after = vq.decode(ids)
    assert all(type(m) is not torch.nn.GroupNorm for m in vq.decoder.modules())
    assert any(isinstance(m, ChunkedGroupNorm) for m in vq.decoder.modules())
    assert list(vq.state_dict()) == keys
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert use_chunked_group_norm(vq.decoder, on=False) > 0  # and back: the plain modules again
    assert all(type(m) is not ChunkedGroupNorm for m in vq.decoder.modules())
    with torch.no_grad():
        torch.testing.assert_close(vq.decode(ids), before, rtol=0, atol=0)
