"""Online pairs over several ranks: the loss is the mean over the pairs kept on every rank (hand computation on 2 gloo
ranks with unequal counts, one rank with none), a prompt's samples do not depend on its batch (per-row generators),
and online-dpo on 2 ranks gives the 1-rank run's responses, pairs and losses."""
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from test_online import rm_dir  # noqa: E402,F401  (the fixture: a reward model on the tiny checkpoint)
from test_train import run, run_two_ranks, world  # noqa: E402,F401

from nanoalign.objective import pair_mean_over_ranks  # noqa: E402

# per rank: its pair losses (each rank's loss is their mean); case "empty": rank 1 kept no pair (a placeholder batch
# whose loss, 7, must not count)
CASES = {"unequal": ([1.0, 2.0, 3.0], [10.0]), "empty": ([1.0, 2.0, 3.0], [])}


def _worker(rank, init, case, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    pairs = CASES[case][rank]
    x = torch.tensor(1.0, requires_grad=True)  # the loss is x * mean: d(loss)/dx is the weight the rank carries
    mean = torch.tensor(sum(pairs) / len(pairs) if pairs else 7.0)
    loss, metrics = pair_mean_over_ranks(x * mean, {"accuracy": mean.clone()}, len(pairs))
    loss.backward()
    g = x.grad.clone()
    dist.all_reduce(g)  # what FSDP does with the gradients: the mean over ranks
    got = torch.stack([loss.detach(), metrics["accuracy"]])
    dist.all_reduce(got)
    torch.save({"loss": float(got[0]) / 2, "accuracy": float(got[1]) / 2, "grad": float(g) / 2}, f"{out}.{rank}")
    dist.barrier()  # gloo: a rank that tears down while its peer still reads the last collective aborts the peer
    dist.destroy_process_group()


@pytest.mark.parametrize("case,want", [
    ("unequal", (1 + 2 + 3 + 10) / 4),  # 4; the mean of the per-rank means would be (2 + 10) / 2 = 6
    ("empty", (1 + 2 + 3) / 3),  # 2; the placeholder's 7 is left out (a per-rank mean would give (2 + 7) / 2)
])
def test_pair_mean_over_ranks_is_the_global_mean(tmp_path, case, want):
    """2 gloo ranks keep 3 and 1 pairs (or 3 and 0): the loss averaged over ranks as FSDP averages gradients, its
    gradient and a metric all equal the mean over the 4 (3) pairs, by hand."""
    init = f"file://{tmp_path / 'init'}"
    mp.spawn(_worker, args=(init, case, str(tmp_path / "r")), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(f"{tmp_path / 'r'}.{rank}")
        assert got["loss"] == pytest.approx(want, rel=1e-6) and got["accuracy"] == pytest.approx(want, rel=1e-6)
        assert got["grad"] == pytest.approx(want, rel=1e-6)  # d/dx of the global mean of x * pair loss
    loss, metrics = pair_mean_over_ranks(torch.tensor(2.5), {"m": torch.tensor(1.0)}, 3)  # 1 process: unchanged
    assert float(loss) == 2.5 and float(metrics["m"]) == 1.0
    assert float(pair_mean_over_ranks(torch.tensor(2.5), {}, 0)[0]) == 0.0


def test_a_prompts_samples_do_not_depend_on_its_batch(world):  # noqa: F811
    """With one generator per prompt (rollout.prompt_generator) a prompt samples the same responses alone or in a
    batch with another prompt of a different length (left padding) and image."""
    from nanoalign import rollout
    from nanoalign.batch import encode_all, open_image
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.data import Example
    from nanoalign.engine import sample
    policy, processor = load_pretrained(world / "ckpt")
    exs = [Example("a", str(world / "img" / "0.png"), "<image>\nwhat is in the image ?", None),
           Example("b", str(world / "img" / "5.png"), "<image>\nred dog w1 w2 w3 w4 w5 w6 w7 ?", None)]
    items, _ = encode_all(exs, processor, None, "vicuna_v1", 512, log=lambda *a: None)
    assert len(items[0].prompt_ids) != len(items[1].prompt_ids)
    images = [open_image(e, None) for e in exs]

    def responses(which):
        gens = [rollout.prompt_generator(0, 3, exs[i].id) for i in which]
        b = rollout.prompt_batch([items[i] for i in which], [images[i] for i in which], processor)
        return sample(policy, b, n_per_prompt=2, temperature=1.0, max_new_tokens=12, end_ids=processor.end_ids,
                      generator=[g for g in gens for _ in range(2)], pad_id=processor.pad_id).ids
    both = responses([1, 0])
    assert responses([0]) == both[2:] and responses([1]) == both[:2]
    assert both[0] != both[1] or both[2] != both[3]  # sampled, not greedy


def test_online_dpo_two_ranks_equal_one_rank(world, tmp_path, rm_dir):  # noqa: F811
    """online-dpo, 3 steps, global batch 2: 1 rank x 2 prompts vs 2 gloo ranks (FSDP2) x 1 prompt, a reward model as
    annotator. Same pairs (counts, lengths) and the same losses and gradient norms. Tolerance 1e-5 relative: the
    1-rank forwards run both pairs in one right-padded batch and the 2-rank ones each alone, and FSDP reduces the
    gradients in another order, which moves fp32 sums by a few ulps (~1e-7 relative per op, ~1e-6 after 3 steps)."""
    args = ["--algo", "online-dpo", "--annotator", f"rm:{rm_dir}", "--max-steps", 3, "--lr", 1e-3,
            "--max-new-tokens", 6, "--temperature", 1.0]
    one = run(world, tmp_path / "one", *args)  # --batch-size 2
    two = run_two_ranks(["--model", world / "ckpt", "--data", world / "prefs.jsonl", "--image-root", world / "img",
                         *args], tmp_path / "two")  # --batch-size 1 per rank
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        drops = {k: v for k, v in a.items() if k.startswith("dropped_")}
        assert (a["pairs"], drops) == (b["pairs"], {k: b[k] for k in drops})
        assert a["pairs"] > 0
        for k in ("chosen_len", "rejected_len"):
            assert a[k] == b[k], k
        for k in ("loss", "accuracy", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
        # the implicit rewards beta * (policy - reference log-prob sum) are differences of sums of about -30 nats whose
        # fp32 rounding (~1e-6 relative, more with the shared-prompt packing, which packs 2 pairs on 1 rank and 1 on
        # each of 2) is ~3e-6 absolute before beta: bound them by that scale, not by their own (4e-3)
        for k in ("reward_chosen", "reward_rejected"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
    json.dump({"one": one, "two": two}, open(tmp_path / "both.json", "w"))
