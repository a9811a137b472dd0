"""nanoalign.engine: greedy generation against transformers' generate (dense layout, left padding), the cache's fork +
ragged chunk against transformers' logits, sampling (seeded, top-p, end ids, stop_fn), several responses per prompt,
and rollouts from an FSDP2-sharded policy on 2 gloo ranks == the unsharded policy in one process.
The tiny checkpoints are made by transformers (tests/test_model.py's fixture)."""
import json
import os

import pytest
import torch

from nanoalign.checkpoint import load_pretrained
from nanoalign.engine import forward_cached, generate, prefill, sample
from test_model import _hf_kw, _inputs, ckpts  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")
EOS = 2


def _batch(ids, mask, pv, sizes):
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pv, "image_sizes": sizes}


def _trim(row, end_ids):
    """transformers' padded output row -> up to and including the first end id."""
    for i, t in enumerate(row):
        if t in end_ids:
            return row[:i + 1]
    return row


@pytest.mark.parametrize("kind", ["llava", "llava_full", "llava_next"])
def test_greedy_generate_matches_transformers(ckpts, kind):
    path, hf = ckpts[kind]
    model, _ = load_pretrained(path)
    ids, mask, pv, sizes = _inputs(kind, hf, [0, 1])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=EOS,
                          pad_token_id=0, **_hf_kw(pv, sizes))[:, ids.shape[1]:]
    ours = generate(model, _batch(ids, mask, pv, sizes), max_new_tokens=16, end_ids=[EOS])
    assert ours.ids == [_trim(r, [EOS]) for r in ref.tolist()]
    assert ours.ended == [EOS in r for r in ref.tolist()]


def test_kv_cache_fork_then_ragged_chunk_matches_transformers(ckpts):
    """Prefill image+prompt once, fork the cache to two rows, append 3 and 2 tokens (a right-padded ragged chunk):
    the logits equal transformers' on the two full sequences."""
    path, hf = ckpts["llava"]
    model, _ = load_pretrained(path)
    ids, _, pv, _ = _inputs("llava", hf, [0])  # (1,T), no padding
    cont = torch.tensor([[5, 6, 7], [9, 10, 0]])
    n = torch.tensor([3, 2])
    with torch.no_grad():
        cache = prefill(model, ids, None, pv, extra=3).cache
        cache = cache.fork(torch.tensor([0, 0]))
        x = model.language_model.model.embed_tokens(cont)
        pos = cache.next_pos[:, None] + torch.arange(3)[None, :]
        ours = model.logits(forward_cached(model, cache, x, pos, n_new=n))
        full = torch.cat([ids.expand(2, -1), cont], 1)
        ref = hf(input_ids=full, pixel_values=pv.expand(2, -1, -1, -1)).logits[:, -3:]
    assert (ours[0] - ref[0]).abs().max() < 1e-4 and (ours[1, :2] - ref[1, :2]).abs().max() < 1e-4
    assert cache.lens.tolist() == [ids.shape[1] + 3, ids.shape[1] + 2]
    with pytest.raises(ValueError, match="capacity"):
        forward_cached(model, cache, x, pos + 3)


def test_sampling_reproducible_top_p_end_ids_and_stop(ckpts):
    path, hf = ckpts["llava"]
    model, _ = load_pretrained(path)
    b = _batch(*_inputs("llava", hf, [0, 1]))
    draw = [generate(model, b, 8, temperature=1.5, generator=torch.Generator().manual_seed(s)).ids for s in (3, 3, 4)]
    assert draw[0] == draw[1] and draw[0] != draw[2]
    greedy = generate(model, b, 8).ids
    assert all(len(r) == 8 for r in greedy)
    # a nucleus this small keeps only the most likely token: greedy
    assert generate(model, b, 8, temperature=1.5, top_p=1e-6, generator=torch.Generator()).ids == greedy
    # several end ids: each row stops at the first of any of them, kept; rows without one run to the limit
    ends = [greedy[0][3], greedy[1][5]]
    out = generate(model, b, 8, end_ids=ends)
    for row, full in zip(out.ids, greedy):
        cut = next((i for i, t in enumerate(full) if t in ends), None)
        assert row == (full if cut is None else full[:cut + 1])
    assert out.ended == [any(t in ends for t in full) for full in greedy]
    stopped = generate(model, b, 8, stop_fn=lambda r, new: len(new) >= 3 + r)
    assert stopped.ids == [greedy[0][:3], greedy[1][:4]] and stopped.ended == [True, True]


def test_n_per_prompt_and_train_mode_restored(ckpts):
    path, hf = ckpts["llava_next"]
    model, _ = load_pretrained(path)
    b = _batch(*_inputs("llava_next", hf, [0, 1]))
    one = generate(model, b, 6).ids
    model.train()
    three = sample(model, b, n_per_prompt=3, temperature=0.0, max_new_tokens=6)
    assert model.training  # restored
    assert three.ids == [one[0]] * 3 + [one[1]] * 3
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    s1 = sample(model, b, n_per_prompt=3, temperature=2.0, max_new_tokens=6, generator=g())
    s2 = sample(model, b, n_per_prompt=3, temperature=2.0, max_new_tokens=6, generator=g())
    assert s1 == s2 and len(set(map(tuple, s1.ids[:3]))) > 1  # the forked rows draw their own tokens
    # the same draws as prefilling every row on its own (rows repeated in the batch)
    rep = {k: (v.repeat_interleave(3, 0) if k != "pixel_values" else v.repeat_interleave(3, 0)) for k, v in b.items()}
    assert generate(model, rep, 6, temperature=2.0, generator=g()).ids == s1.ids


# ---------------------------------------------------------------------------------------------------- FSDP2
def _fsdp_worker(rank, world, store, ckpt_dir, inputs_path, out_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, _ = load_pretrained(ckpt_dir)
        fully_shard(model.vision_tower)  # the units of train.py
        for layer in model.language_model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        b = torch.load(inputs_path)
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as pg
        gather, n_gathers = pg.foreach_all_gather, []

        def counted(*a, **k):  # every all-gather FSDP issues
            n_gathers.append(1)
            return gather(*a, **k)
        pg.foreach_all_gather = counted
        res = {}
        for whole in (True, False):  # whole model gathered once / each block gathered in its own forward
            n_gathers.clear()
            res[f"greedy_{whole}"] = sample(model, b, n_per_prompt=2, temperature=0.0, max_new_tokens=8,
                                            gather_whole=whole).ids
            res[f"gathers_{whole}"] = len(n_gathers)
            res[f"sampled_{whole}"] = sample(model, b, n_per_prompt=2, temperature=1.0, top_p=0.9, max_new_tokens=8,
                                             end_ids=[EOS], generator=torch.Generator().manual_seed(0),
                                             gather_whole=whole).ids
        # resharded after the rollout, and training still works: a forward + backward
        w = model.language_model.model.layers[0].mlp.up_proj.weight
        res["sharded"] = isinstance(w, DTensor) and w.to_local().shape[0] < w.shape[0]
        model.train()
        model(b["input_ids"], b["pixel_values"], b["image_sizes"], b["attention_mask"]).sum().backward()
        res["grad"] = w.grad is not None
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(res, f)
        dist.barrier()  # gloo: a rank that tears down while its peer still reads the last collective aborts the peer
    finally:
        dist.destroy_process_group()


def test_fsdp_sharded_policy_samples_like_the_unsharded_one(ckpts, tmp_path):
    """2 gloo ranks, fully_shard-ed as train.py does: greedy and seeded sampled rollouts equal the unsharded model's
    in one process, in both gather modes, with the number of all-gathers the engine's docstring states."""
    import torch.multiprocessing as mp
    path, hf = ckpts["llava_next"]
    model, _ = load_pretrained(path)
    b = _batch(*_inputs("llava_next", hf, [0, 1]))
    torch.save(b, tmp_path / "inputs.pt")
    greedy = sample(model, b, n_per_prompt=2, temperature=0.0, max_new_tokens=8).ids
    sampled = sample(model, b, n_per_prompt=2, temperature=1.0, top_p=0.9, max_new_tokens=8, end_ids=[EOS],
                     generator=torch.Generator().manual_seed(0)).ids
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "store"), str(path), str(tmp_path / "inputs.pt"),
                                 str(tmp_path / "out.json")), nprocs=2, join=True)
    res = json.loads((tmp_path / "out.json").read_text())
    assert len({t for r in greedy for t in r}) > 2  # a meaningful comparison
    for whole in (True, False):
        assert res[f"greedy_{whole}"] == greedy
        assert res[f"sampled_{whole}"] == sampled
    assert res["sharded"] and res["grad"]
    # all-gathers per rollout: whole = one per unit (vision tower, 2 blocks, root); per block = the root and the
    # vision tower once, each block at the prefill and at each of the 7 decode steps after the first token
    assert all(len(r) == 8 for r in greedy)  # no end id: 8 tokens, 7 decode steps
    assert res["gathers_True"] == 4 and res["gathers_False"] == 2 + 2 * 8


def test_bad_arguments_raise_one_line():
    for kw in (dict(n_per_prompt=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
               dict(max_new_tokens=-1)):
        with pytest.raises(ValueError, match=r"^generate: ") as e:
            generate(None, {}, **kw)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
def test_row_chunked_prefill_equals_one_call(ckpts, monkeypatch, compact):
    """prefill in row chunks (PREFILL_TOKENS forced down to one row per chunk) == one call over the whole batch
    (the reference path): hidden states, last hidden, cache contents, lens, positions; and greedy tokens still equal
    transformers'. Left padding (rows of different lengths) and a masked image (image_keep) included."""
    import nanoalign.engine as E
    path, hf = ckpts["llava_next"]
    model, _ = load_pretrained(path)
    ids, mask, pv, sizes = _inputs("llava_next", hf, [0, 1])
    assert not mask.all()  # the rows are left padded
    n_img = [int(r.sum()) for r in ids == model.config.image_token_index]
    g = torch.Generator().manual_seed(0)
    keeps = [torch.rand(n, generator=g) > 0.5 for n in n_img]
    runs = {}
    for tokens in (10 ** 9, 1):
        monkeypatch.setattr(E, "PREFILL_TOKENS", tokens)
        runs[tokens] = prefill(model, ids, mask, pv, sizes, extra=2, image_keep=keeps, compact=compact)
    one, chunked = runs[10 ** 9], runs[1]
    written = torch.arange(one.cache.capacity)[None, :] < one.cache.lens[:, None]  # (B,C)
    assert torch.equal(one.cache.lens, chunked.cache.lens) and torch.equal(one.cache.next_pos, chunked.cache.next_pos)
    assert torch.equal(one.cache.keys, chunked.cache.keys) and torch.equal(one.pos, chunked.pos)
    for a, b in zip(one.cache.k + one.cache.v, chunked.cache.k + chunked.cache.v):
        assert torch.allclose(a.transpose(1, 2)[written], b.transpose(1, 2)[written], atol=1e-6, rtol=0)
    real = one.cache.keys[:, :one.hidden.shape[1]]  # attendable columns: their hidden states are meaningful
    assert torch.allclose(one.hidden[real], chunked.hidden[real], atol=1e-5, rtol=0)
    assert torch.allclose(one.last, chunked.last, atol=1e-5, rtol=0)

    if not compact:  # end to end with chunking forced: greedy tokens == transformers' generate
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              eos_token_id=EOS, pad_token_id=0, **_hf_kw(pv, sizes))[:, ids.shape[1]:]
        ours = generate(model, _batch(ids, mask, pv, sizes), max_new_tokens=8, end_ids=[EOS])
        assert ours.ids == [_trim(r, [EOS]) for r in ref.tolist()]


def test_dense_slice_write_equals_row_scatter(ckpts):
    """forward_cached writes a dense call (every row, same slots) as one slice copy and a ragged call by scattering
    rows: the same tokens through both routes (n_new=None vs n_new = all N) give the same hidden states and cache."""
    path, hf = ckpts["llava"]
    model, _ = load_pretrained(path)
    ids, mask, pv, _ = _inputs("llava", hf, [0, 1])
    with torch.no_grad():
        base = prefill(model, ids, mask, pv, extra=4).cache
        tok = torch.tensor([[5, 6, 7], [9, 10, 11]])
        x = model.language_model.model.embed_tokens(tok)
        out = {}
        for name, n_new in (("slice", None), ("scatter", torch.tensor([3, 3]))):
            c = base.fork(torch.arange(2))
            pos = c.next_pos[:, None] + torch.arange(3)[None, :]
            out[name] = (forward_cached(model, c, x, pos, n_new=n_new), c)
    (h1, c1), (h2, c2) = out["slice"], out["scatter"]
    assert torch.allclose(h1, h2, atol=1e-6, rtol=0)
    assert torch.equal(c1.lens, c2.lens) and torch.equal(c1.keys, c2.keys)
    assert all(torch.equal(a, b) for a, b in zip(c1.k + c1.v, c2.k + c2.v))


@pytest.mark.parametrize("compact", [False, True], ids=["dense", "compact"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one_call", "row_chunks"])
def test_prefill_last_token_only_equals_all_hidden(ckpts, monkeypatch, compact, chunked):
    """prefill(all_hidden=False) (the last layer runs each row's last real token alone, what generate uses) == the
    full prefill (the reference path): the same cache bit for bit, the same last hidden state within fp32 rounding.
    Left padding and a masked image included."""
    import nanoalign.engine as E
    path, hf = ckpts["llava_next"]
    model, _ = load_pretrained(path)
    ids, mask, pv, sizes = _inputs("llava_next", hf, [0, 1])
    n_img = [int(r.sum()) for r in ids == model.config.image_token_index]
    g = torch.Generator().manual_seed(1)
    keeps = [torch.rand(n, generator=g) > 0.5 for n in n_img]
    ref = prefill(model, ids, mask, pv, sizes, extra=2, image_keep=keeps, compact=compact)
    if chunked:
        monkeypatch.setattr(E, "PREFILL_TOKENS", 1)
    ours = prefill(model, ids, mask, pv, sizes, extra=2, image_keep=keeps, compact=compact, all_hidden=False)
    assert ours.hidden.shape == (2, 1, ref.hidden.shape[2]) and torch.equal(ours.hidden[:, 0], ours.last)
    assert (ours.last - ref.last).abs().max() < 1e-5
    assert (model.logits(ours.last) - model.logits(ref.last)).abs().max() < 1e-4
    assert torch.equal(ours.cache.lens, ref.cache.lens) and torch.equal(ours.cache.keys, ref.cache.keys)
    written = torch.arange(ref.cache.capacity)[None, :] < ref.cache.lens[:, None]
    for a, b in zip(ours.cache.k + ours.cache.v, ref.cache.k + ref.cache.v):
        assert torch.allclose(a.transpose(1, 2)[written], b.transpose(1, 2)[written], atol=1e-6, rtol=0)


def test_left_padded_rollout_prefill_is_plain_causal(ckpts, monkeypatch):
    """generate on a left-padded batch prefills it in the ragged layout, where every prefill attention call is plain
    causal (no explicit (B,1,T,T) mask: SDPA skips the blocks above the diagonal); the greedy tokens still equal
    transformers' generate on the left-padded batch."""
    import nanoalign.engine as E
    path, hf = ckpts["llava"]
    model, _ = load_pretrained(path)
    ids, mask, pv, sizes = _inputs("llava", hf, [0, 1])
    assert not mask.all()
    calls = []
    real_attention = E.attention

    def spy(q, k, v, m, is_causal=False):
        calls.append((q.shape[2], m is None, is_causal))
        return real_attention(q, k, v, m, is_causal=is_causal)
    monkeypatch.setattr(E, "attention", spy)
    ours = generate(model, _batch(ids, mask, pv, sizes), max_new_tokens=6, end_ids=[EOS])
    prefill_calls = [c for c in calls if c[0] > 1]
    assert prefill_calls and all(no_mask and causal for _, no_mask, causal in prefill_calls)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=EOS,
                          pad_token_id=0, **_hf_kw(pv, sizes))[:, ids.shape[1]:]
    assert ours.ids == [_trim(r, [EOS]) for r in ref.tolist()]


def test_top_p_over_top_k_equals_full_sort():
    """sample_next's nucleus from the top 256 == the nucleus from a full sort of the vocabulary (the reference,
    written here as the definition: sort, cut where the mass of the strictly more likely tokens reaches top_p): the
    same draws from the same generator, for peaked rows (nucleus inside the first top-k) and flat ones (the
    full-vocabulary fallback)."""
    from nanoalign.engine import sample_next
    g = torch.Generator().manual_seed(0)
    V = 3000
    logits = torch.cat([torch.randn(3, V, generator=g) * 8, torch.randn(3, V, generator=g) * 0.01])  # peaked, flat
    for top_p in (0.5, 0.9, 0.999):
        probs = torch.softmax(logits / 0.7, dim=-1)
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        p_sorted = p_sorted.masked_fill(p_sorted.cumsum(-1) - p_sorted >= top_p, 0.0)
        ref_probs = torch.zeros_like(probs).scatter_(-1, idx, p_sorted)
        for seed in range(3):
            ref = torch.multinomial(ref_probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
            ours = sample_next(logits, 0.7, top_p, torch.Generator().manual_seed(seed))
            assert torch.equal(ours, ref), (top_p, seed)
    assert (ref_probs[:3] > 0).sum(1).max() < 256 and (ref_probs[3:] > 0).sum(1).min() > 256  # both routes taken
