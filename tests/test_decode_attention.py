"""kernels/decode_attention.py: the Triton decode kernel (TRITON_INTERPRET=1, set by conftest) against its torch
reference and against an independent float64 SDPA computed row by row on the sliced cache, on ragged lengths
(including an empty row and a row whose sequence kept no image tokens), GQA and an odd head dim."""
import pytest
import torch
import torch.nn.functional as F

from nanoalign.kernels.decode_attention import decode_attention, decode_attention_ref


def _sdpa64(q, k, v, lens):
    """Independent reference: per row, float64 SDPA over the first lens[b] keys (GQA by repeating kv heads)."""
    B, Hq, D = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        kk = k[b, :, :n].double().repeat_interleave(g, 0)  # (Hq,n,D)
        vv = v[b, :, :n].double().repeat_interleave(g, 0)
        out[b] = F.scaled_dot_product_attention(q[b].double()[:, None], kk, vv)[:, 0]
    return out


@pytest.mark.parametrize("B,Hq,Hkv,T,D,lens", [
    (4, 4, 2, 40, 16, [0, 1, 17, 40]),     # empty row, one key, ragged, full
    (3, 6, 2, 70, 24, [9, 70, 33]),         # odd head dim (padded to 32), kv blocks of 16 with a ragged tail
    (2, 3, 3, 12, 8, [5, 12]),              # MHA
])
def test_kernel_matches_references(B, Hq, Hkv, T, D, lens):
    g = torch.Generator().manual_seed(B * 100 + T)
    q = torch.randn(B, Hq, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g) * 2
    v = torch.randn(B, Hkv, T, D, generator=g)
    lens = torch.tensor(lens)
    out = decode_attention(q, k, v, lens, block_n=16)
    ref = decode_attention_ref(q, k, v, lens)
    ind = _sdpa64(q, k, v, lens)
    assert out.shape == (B, Hq, D) and torch.isfinite(out).all()
    assert (out.double() - ind).abs().max() < 1e-5
    assert (ref.double() - ind).abs().max() < 1e-5
    assert (out[lens == 0] == 0).all()


def test_kernel_bdhs_layout_zero_kept_image_tokens_and_fp16():
    """Two sequences sharing a prompt: one kept 3 of its image tokens, the other none (cache = text only)."""
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D, C = 4, 2, 16, 32
    text, img = torch.randn(2, Hkv, 10, D, generator=g), torch.randn(Hkv, 3, D, generator=g)
    k = torch.zeros(2, Hkv, C, D)
    k[0, :, :13] = torch.cat([text[0, :, :4], img, text[0, :, 4:]], 1)
    k[1, :, :10] = text[1]
    k[1, :, 10:] = 1e4  # stale values beyond the row's length must be ignored
    v = k.flip(-1).clone()
    lens = torch.tensor([13, 10])
    q = torch.randn(2, Hq, D, generator=g)
    out = decode_attention(q, k, v, lens, block_n=8)
    assert (out.double() - _sdpa64(q, k, v, lens)).abs().max() < 1e-5
    out16 = decode_attention(q.half(), k.half(), v.half(), lens, block_n=8)
    assert out16.dtype == torch.float16
    assert (out16.double() - _sdpa64(q.half(), k.half(), v.half(), lens)).abs().max() < 5e-3


def test_bad_shapes_raise():
    q, k = torch.randn(2, 3, 8), torch.randn(2, 2, 5, 8)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(q, k, k, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lens"):
        decode_attention(torch.randn(2, 4, 8), k, k, torch.tensor([1, 2, 3]))
