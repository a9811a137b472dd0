"""nanoalign.engine's masked-image prefill (BDHS): the image-token mask (Eq. 6), the dense layout against transformers'
own forward with the same 4D mask (causal & kept key, plus the diagonal, written out here), and the compacted path (kept image tokens only, original RoPE positions, ragged rows, forked
branches) against the dense path, fp32 within 1e-4, for LLaVA-1.5 and LLaVA-1.6 layouts. Tiny checkpoints are made
with transformers' save_pretrained, as tests/test_model.py does."""
import pytest
import torch

from nanoalign.checkpoint import load_pretrained
from nanoalign.engine import decode, extend, forward_cached, generate, prefill, sample_image_mask

transformers = pytest.importorskip("transformers")
IMG = 120
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=28, patch_size=7)
TEXT = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
            rope_theta=500000.0)
SIZES = [(40, 40), (30, 70)]
KINDS = ["llava", "llava_next"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    T = transformers
    torch.manual_seed(0)
    out = {}
    for kind in KINDS:
        if kind == "llava":
            hf = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=VISION, text_config=TEXT,
                                                               image_token_index=IMG, image_seq_length=16))
        else:
            hf = T.LlavaNextForConditionalGeneration(T.LlavaNextConfig(
                vision_config=VISION, text_config=TEXT, image_token_index=IMG, image_seq_length=16,
                image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]))
        with torch.no_grad():  # larger weights so greedy decoding is not one constant token
            for p in hf.parameters():
                p.mul_(3.0) if p.dim() > 1 else None
        d = tmp_path_factory.mktemp(kind)
        hf.eval().save_pretrained(d)
        out[kind] = (load_pretrained(d)[0], hf)
    return out


def _inputs(kind, model, seed=0):
    """Two left-padded rows [bos, text, <image> * n, text]; row 1 keeps about 30% of its image tokens, row 2 none."""
    g = torch.Generator().manual_seed(seed)
    if kind == "llava":
        pv, sizes, counts = torch.randn(2, 3, 28, 28, generator=g), None, [16, 16]
    else:
        pv, sizes = torch.randn(2, 5, 3, 28, 28, generator=g), torch.tensor(SIZES)
        counts = [model.num_image_features(s) for s in SIZES]
    rows = [[1, 5, 6] + [IMG] * counts[0] + [7, 8, 9, 10, 11], [1, 5, 6, 7, 8, 9, 10, 12] + [IMG] * counts[1] + [7]]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    keeps = [sample_image_mask(counts[0], 0.7, g), torch.zeros(counts[1], dtype=torch.bool)]
    assert 0 < int(keeps[0].sum()) < counts[0]
    return ids, am, pv, sizes, keeps


def test_sample_image_mask():
    g = torch.Generator().manual_seed(0)
    keep = sample_image_mask(20000, 0.99, g)
    assert keep.dtype == torch.bool and abs(keep.float().mean().item() - 0.01) < 0.003
    assert sample_image_mask(50, 1.0).sum() == 0 and sample_image_mask(50, 0.0).all()
    a = sample_image_mask(100, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, sample_image_mask(100, 0.5, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="rho_th"):
        sample_image_mask(3, 1.5)


def dense_forward(model, ids, am, pv=None, sizes=None, keeps=None, image_features=None):
    """The dense layout's prefill -> (hidden (B,T,H), keep (B,T) attendable, positions (B,T))."""
    pre = prefill(model, ids, am, pv, sizes, image_keep=keeps, image_features=image_features)
    return pre.hidden, pre.cache.keys[:, :ids.shape[1]], pre.pos


def dense_mask(keep):
    """(B,T) attendable keys -> (B,1,T,T) bool: causal & kept key, plus each query's own key."""
    T = keep.shape[1]
    i = torch.arange(T)
    return (((i[None, :] <= i[:, None])[None] & keep[:, None, :]) | (i[None, :] == i[:, None])[None])[:, None]


def generate_dense(model, ids, am, pv=None, sizes=None, keeps=None, max_new_tokens=6, image_features=None):
    batch = {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_sizes": sizes}
    return generate(model, batch, max_new_tokens, image_keep=keeps, image_features=image_features).ids


def generate_compact(model, ids, am, pv=None, sizes=None, keeps=None, max_new_tokens=6):
    batch = {"input_ids": ids, "attention_mask": am, "pixel_values": pv, "image_sizes": sizes}
    return generate(model, batch, max_new_tokens, image_keep=keeps, compact=True).ids


@pytest.mark.parametrize("kind", KINDS)
def test_dense_path_matches_transformers_4d_mask(models, kind):
    model, hf = models[kind]
    ids, am, pv, sizes, keeps = _inputs(kind, model)
    with torch.no_grad():
        h, keep, pos = dense_forward(model, ids, am, pv, sizes, keeps)
        assert torch.equal(pos, (am.cumsum(-1) - 1).clamp(min=0))
        kw = {} if sizes is None else {"image_sizes": sizes}
        ref = hf(input_ids=ids, pixel_values=pv, attention_mask=dense_mask(keep), position_ids=pos, **kw).logits
        unmasked = hf(input_ids=ids, pixel_values=pv, attention_mask=am, position_ids=pos, **kw).logits
    ours = model.logits(h)
    assert (ours - ref)[keep].abs().max() < 1e-4
    assert (ours - unmasked)[keep].abs().max() > 1e-2  # the mask matters


@pytest.mark.parametrize("kind", KINDS)
def test_compacted_equals_dense(models, kind):
    model, _ = models[kind]
    ids, am, pv, sizes, keeps = _inputs(kind, model)
    with torch.no_grad():
        hd, keep, pos = dense_forward(model, ids, am, pv, sizes, keeps)
        cache, hc, last, posc = prefill(model, ids, am, pv, sizes, image_keep=keeps, compact=True)
    lens = cache.lens
    assert lens.tolist() == keep.sum(1).tolist()
    ld, lc = model.logits(hd), model.logits(hc)
    for b in range(2):
        assert posc[b, :lens[b]].tolist() == pos[b][keep[b]].tolist()  # survivors keep their positions
        assert (ld[b][keep[b]] - lc[b, :lens[b]]).abs().max() < 1e-4

    # fork: 3 branches (2 from row 0, 1 from row 1) extended with ragged token lists, then greedy decoding
    rows, ctx = [0, 0, 1], [[20, 21, 22], [], [30, 31]]
    bc = cache.fork(torch.tensor(rows), capacity=int(lens.max()) + 3 + 6)
    hb = extend(model, bc, ctx, last[rows])
    new, _ = decode(model, bc, hb, 6, drop_finished=True)
    full = [[t for t, m in zip(ids[r].tolist(), am[r].tolist()) if m] + c for r, c in zip(rows, ctx)]
    T = max(map(len, full))
    ids2 = torch.tensor([[0] * (T - len(f)) + f for f in full])
    am2 = torch.tensor([[0] * (T - len(f)) + [1] * len(f) for f in full])
    feats = model.vision_features(pv, sizes)
    with torch.no_grad():
        hd2, _, _ = dense_forward(model, ids2, am2, keeps=[keeps[r] for r in rows],
                                  image_features=[feats[r] for r in rows])
    assert (model.logits(hb) - model.logits(hd2[:, -1])).abs().max() < 1e-4
    ref = generate_dense(model, ids2, am2, keeps=[keeps[r] for r in rows],
                         image_features=[feats[r] for r in rows], max_new_tokens=6)
    assert new == ref and len({t for r in ref for t in r}) > 2
    assert generate_compact(model, ids, am, pv, sizes, keeps, max_new_tokens=6) == \
        generate_dense(model, ids, am, pv, sizes, keeps, max_new_tokens=6)


def test_triton_decode_step_matches_sdpa(models):
    """forward_cached's kernel path (Triton interpreter on CPU tensors) == its SDPA path for one decode step."""
    model, _ = models["llava_next"]
    ids, am, pv, sizes, keeps = _inputs("llava_next", model, seed=1)
    cache = prefill(model, ids, am, pv, sizes, extra=4, image_keep=keeps, compact=True).cache
    lens = cache.lens
    tok = torch.tensor([[40], [41]])
    x = model.language_model.model.embed_tokens(tok)
    n = torch.ones(2, dtype=torch.long)
    with torch.no_grad():
        c1, c2 = cache.fork(torch.arange(2)), cache.fork(torch.arange(2))
        a = forward_cached(model, c1, x, c1.next_pos[:, None], n_new=n, use_kernel=False)
        b = forward_cached(model, c2, x, c2.next_pos[:, None], n_new=n, use_kernel=True)
    assert (a - b).abs().max() < 1e-5
    assert c1.lens.tolist() == (lens + 1).tolist()
