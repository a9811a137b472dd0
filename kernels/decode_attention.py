"""Triton decode attention over a ragged KV cache (one new query token per sequence), for BDHS sampling.

BDHS (paper 000, Section 3.4.1) masks most image tokens out of attention. nanoalign/engine.py drops the masked image
tokens from the sequence instead (identical result, shared/notes/performance.md item 4), so every sequence of a batch
has its own cache length: row b holds `lens[b]` valid keys in k_cache[b, :, :lens[b]], the rest is padding.

    o[b, h] = sum_{j < lens[b]} softmax_j(q[b, h] . k[b, h // G, j] * scale) v[b, h // G, j]      G = Hq / Hkv (GQA)
    lens[b] == 0 -> o[b, h] = 0 (nothing to attend to; never NaN)

RoPE is NOT applied here: keys are rotated at their true (original, uncompacted) positions when they are written to
the cache, and the query is rotated at its true position by the caller, so q.k already carries the relative position.

Kernel: one program per (sequence, kv head); it holds the G query heads of that kv head as a (BLOCK_G, BLOCK_D) tile
(padded to 16 for tl.dot), streams the keys in BLOCK_N blocks up to lens[b] and keeps an online softmax (running
max m, running sum l, rescaled accumulator) in fp32. Each block has at least one valid key, so the running max is
finite after the first block and no -inf - -inf arises. Inputs of any float dtype are cast to fp32 right after the
load (the interpreter's bf16 arithmetic is broken, shared/notes/environment.md); fp32 dots use input_precision="ieee".
FLOPs per call: 4 * B * Hq * mean(lens) * D; bytes: the valid part of the cache once per kv head.
GPU-only in production (nanoalign.engine calls it only for CUDA tensors); tests run it under TRITON_INTERPRET=1.
"""
import math

import torch
import triton
import triton.language as tl


def decode_attention_ref(q, k_cache, v_cache, lens, scale=None):
    """Plain torch: q (B,Hq,D), k_cache/v_cache (B,Hkv,T,D), lens (B,) int -> (B,Hq,D) in q.dtype (fp32 math)."""
    B, Hq, D = q.shape
    Hkv, T = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    g = Hq // Hkv
    k = k_cache.float().repeat_interleave(g, dim=1)  # (B,Hq,T,D)
    v = v_cache.float().repeat_interleave(g, dim=1)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale  # (B,Hq,T)
    valid = torch.arange(T, device=q.device)[None, :] < lens.to(q.device).long()[:, None]  # (B,T)
    s = s.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # a row with no valid key -> all zeros
    return torch.einsum("bht,bhtd->bhd", p, v).to(q.dtype)


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lens_ptr, scale,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                        stride_ob, stride_oh, G, D,
                        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    L = tl.load(lens_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    qh = kvh * G + offs_g  # (BLOCK_G,) query heads of this kv head
    q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale  # (BLOCK_G, BLOCK_D)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    for n0 in range(0, L, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_G, BLOCK_N)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: the block holds >= 1 valid key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # lens == 0 -> acc == 0 -> zeros
    tl.store(o_ptr + b * stride_ob + qh[:, None] * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def decode_attention(q, k_cache, v_cache, lens, scale=None, block_n=64):
    """Triton decode attention. q (B,Hq,D), k_cache/v_cache (B,Hkv,T,D) (last dim contiguous), lens (B,) int
    (valid keys per row, <= T) -> (B,Hq,D) in q.dtype. See the module docstring for the formula."""
    B, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)} do not fit (B,Hq,D) / (B,Hkv,T,D)")
    Hkv = k_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"decode_attention: {Hq} query heads is not a multiple of {Hkv} kv heads")
    if lens.shape != (B,):
        raise ValueError(f"decode_attention: lens is {tuple(lens.shape)}, expected ({B},)")
    q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    lens = lens.to(device=q.device, dtype=torch.int32).contiguous()
    G = Hq // Hkv
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    _decode_attn_kernel[(B, Hkv)](
        q, k_cache, v_cache, out, lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), G, D,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n)
    return out
