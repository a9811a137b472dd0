"""The toy pipeline end to end at a tiny size (nanoalign/toy/run.py): world -> SFT base -> DDPO pairs -> DDPO -> eval,
and the cache (a second run reuses the world and the base model); the toy's settings as train.py's defaults; the
pieces of nanoalign/toy/base.py, pairs.py and evaluate.py; bench/toy_reproduce.py."""
import json
from pathlib import Path

import sys

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train.py lives at the repo root
import train  # noqa: E402
from nanoalign.toy import base, evaluate, files, pairs, run  # noqa: E402
from nanoalign.toy import oracle as O  # noqa: E402
from nanoalign.toy import world as W  # noqa: E402

TINY = dict(n_train=24, n_eval=4, vocab_size=320, ground_steps=3, sft_steps=6, sft_batch=4, eval_max_new_tokens=20,
            vision_steps=3)
ALIGN = {"steps": 2, "lr": 1e-4, "batch": 2, "pair_scenes": 4, "samples": 1, "temperature": 1.0,
         "rewrite_missing": True, "max_new_tokens": 20, "yesno": 4, "sft_weight": 1.0, "ranked": 3}


def _run(tmp_path, out, monkeypatch, algo="ddpo", extra=()):
    monkeypatch.setitem(run.ALIGN, "default", ALIGN)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = train.parse_args(["--algo", algo, "--out", str(tmp_path / out), "--toy-cache", str(tmp_path / "cache"),
                             *extra])
    return run.default_run(args, train.main, train.parse_args, train.ALGOS, settings=TINY)


def test_smoke_pipeline_and_cache(tmp_path, monkeypatch, capsys):
    calls, models, seen = [], [], []
    real = train.main

    def counting_main(args):
        calls.append(args.algo)
        models.append((str(args.model), str(args.out)))
        seen.append(args)
        return real(args)

    monkeypatch.setattr(train, "main", counting_main)
    s1 = _run(tmp_path, "a", monkeypatch)
    assert calls == ["sft", "sft", "ddpo"]  # SFT mix, grounding stage, alignment
    # the tiny base cannot be grounded after 9 steps: the run says so (AUC < 0.75) instead of leaving POPE unexplained
    warned = "warning: the SFT base is blind to yes/no questions" in capsys.readouterr().out
    assert warned == (s1["before"]["yesno_auc"] < 0.75)
    (m1, o1), (m2, o2), (m3, _) = models
    assert m1.endswith("init") and m2 == str(Path(o1) / "final") and m3 == str(Path(o2) / "final")
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    for side in ("before", "after"):
        for k in ("chair_i", "chair_s", "recall", "pope_adversarial_acc", "mean_length", "yesno_auc"):
            v = summary[side][k]
            if v is None:  # CHAIR_i over zero mentions (a base that names no object) is n/a, not 0 (metrics.py)
                assert k == "chair_i" and summary[side]["chair_s"] == 0.0, (side, k, v)
                continue
            assert isinstance(v, float) and (k == "mean_length" or 0.0 <= v <= 1.0), (side, k, v)
    assert summary["pairs"]["pairs"] >= 1
    # the pairs are RLHF-V corrections: every rejected caption differs from its chosen one, spans lie inside
    rows = [json.loads(l) for l in open(tmp_path / "a" / "pairs.jsonl")]
    yesno = [r for r in rows if r["prompt"].startswith("<image>\nIs there")]
    assert summary["pairs"].get("yesno_pairs", 0) == len(yesno) > 0
    scenes = files.load_scenes(str(Path(summary["cache"]) / "world" / "scenes_train.jsonl"))
    for r in yesno:  # ground-truth existence pairs: chosen the truth about the scene, rejected the other answer
        assert r["chosen"] == W.answer_question(r["prompt"], scenes[Path(r["image"]).name])
        assert {r["chosen"], r["rejected"]} == {"Yes.", "No."}
    assert {r["chosen"] for r in yesno} == {"Yes.", "No."}
    # the best against the worst of 3 sampled captions by the oracle, one per scene unless all 3 score the same
    # (and the ground-truth rewrites of rewrite_missing: the other caption rows without spans, also better-scored)
    no_spans = [r for r in rows if r not in yesno and not r.get("chosen_segments") and not r.get("rejected_segments")]
    n_ranked = summary["pairs"].get("ranked", 0)  # the tiny base's 3 captions often score the same
    assert len(no_spans) == n_ranked + summary["pairs"].get("rewritten", 0)
    assert n_ranked + summary["pairs"].get("ranked_tie", 0) == ALIGN["pair_scenes"]
    for r in no_spans:
        sc = scenes[Path(r["image"]).name]
        assert O.oracle_score(r["chosen"], sc)["score"] > O.oracle_score(r["rejected"], sc)["score"]
        assert "chosen_segments" not in r and r["prompt"].endswith(W.CAPTION_PROMPT)
    for r in rows:
        assert r["chosen"] != r["rejected"]
        for a, b in r.get("rejected_segments") or []:
            assert 0 <= a < b <= len(r["rejected"])
    cache = Path(s1["cache"])
    # bench/toy_vote_curve.py: its greedy point is the evaluation's Recall (both per kind); CHAIR_i counts each kind
    # once per caption there, so it is at least the evaluation's share of hallucinated kinds
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import toy_vote_curve
    v = toy_vote_curve.curve(cache / "base" / "final", cache / "world", samples=2, temperature=1.0,
                             template=TINY.get("template", base.SETTINGS["template"]))
    assert v["greedy"][0] == pytest.approx(100 * summary["before"]["recall"])
    assert [t for t, *_ in v["votes"]] == [1, 2] and v["votes"][0][1] >= v["votes"][1][1]  # Recall falls with t
    assert (cache / "base" / "DONE.json").is_file() and (cache / "init" / "model.safetensors").is_file()
    assert (cache / "sft_mix" / "DONE.json").is_file()  # the first SFT stage, the grounding stage's start
    # second run: world and base reused (no SFT call; the world manifest and base weights untouched)
    stamp = {p: p.stat().st_mtime_ns for p in [cache / "world" / "manifest.json", cache / "base" / "final" /
                                                 "model.safetensors", cache / "init" / "model.safetensors"]}
    calls.clear()
    s2 = _run(tmp_path, "b", monkeypatch)
    assert calls == ["ddpo"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    assert s2["before"] == s1["before"]  # same base, same held-out scenes, greedy
    assert s2["after"] == s1["after"]  # same seed -> same numbers
    # the fingerprint's base hash is the hash of the base weights file, the same for both runs
    import hashlib
    fp = s2["fingerprint"]
    weights = (cache / "base" / "final" / "model.safetensors").read_bytes()
    assert fp["base"] == hashlib.sha256(weights).hexdigest()[:16] == s1["fingerprint"]["base"]
    assert fp["init"] != fp["base"] and fp["cpu"] and fp["torch"] == torch.__version__
    # ALIGN's beta unless the user gives one; any other train.py option the user sets reaches the alignment run
    assert seen[-1].beta == run.ALIGN["ddpo"]["beta"] and not seen[-1].ddpo_average
    assert seen[-1].sft_weight == 1.0 and seen[-1].lr == {**ALIGN, **run.ALIGN["ddpo"]}["lr"]
    assert seen[-1].max_steps == ALIGN["steps"] and seen[-1].batch_size == ALIGN["batch"]  # one process: all of it
    assert seen[-1].warmup_steps == min(5, ALIGN["steps"] // 4)
    # ... even at train.py's default value (ddpo's beta 0.5, --sft-weight 0, --lr 1e-5), which ALIGN's would beat
    _run(tmp_path, "c", monkeypatch, extra=["--ddpo-average", "--beta", "0.5", "--warmup-steps", "1", "--gamma", "2",
                                            "--sft-weight", "0", "--lr=1e-5"])
    a = seen[-1]
    assert a.ddpo_average and a.beta == 0.5 and a.warmup_steps == 1 and a.gamma == 2.0
    assert a.sft_weight == 0.0 and a.lr == 1e-5
    assert a.template == "vicuna_nosys" and str(a.data) == str(tmp_path / "c" / "pairs.jsonl")  # the toy's own


PAIR_KW = dict(n_scenes=5, seed=3, samples=1, temperature=1.0, batch_size=2, max_new_tokens=12, ranked=3, yesno=2,
               template=base.SETTINGS["template"])  # 3 blocks of scenes: 2, 2 and 1


def _pairs_on_two_ranks(rank, port, args, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        pairs.build_pairs(*args, out_path=out, **PAIR_KW)
        dist.barrier()  # gloo: a rank that tears down while its peer still reads the last all_gather aborts the peer
    finally:
        dist.destroy_process_group()


def test_caption_pairs_split_over_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """build_pairs shares the caption sampling of the corrections / ranked pairs between the ranks; the file must be
    the one a single process writes (blocks of batch_size scenes sampled with seeds of their own)."""
    import socket
    import torch.multiprocessing as mp
    s = _run(tmp_path, "a", monkeypatch)
    cache = Path(s["cache"])
    world = {"scenes_train": str(cache / "world" / "scenes_train.jsonl"), "images": str(cache / "world" / "images")}
    args = ("ddpo", str(cache / "base" / "final"), world)
    one = tmp_path / "one.jsonl"
    stats = pairs.build_pairs(*args, out_path=one, **PAIR_KW)
    assert stats["pairs"] >= 10 and stats.get("ranked", 0) + stats.get("ranked_tie", 0) == 5
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = tmp_path / "two.jsonl"
    mp.spawn(_pairs_on_two_ranks, args=(port, args, two), nprocs=2, join=True)
    assert two.read_text() == one.read_text()


def test_init_checkpoint_std_and_layout(tmp_path):
    from nanoalign.checkpoint import load_pretrained
    world = files.build_world(str(tmp_path / "w"), 4, 2, 0, 1, 320)
    base.init_checkpoint(world, tmp_path / "init", {**base.SETTINGS, "init_std": 0.02}, 0)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "init" / f).is_file(), f
    model, proc = load_pretrained(tmp_path / "init")
    w = model.language_model.model.embed_tokens.weight
    assert abs(float(w.detach().std()) - 0.02) < 0.002
    assert torch.all(model.language_model.model.norm.weight == 1)
    assert proc.tokenizer.vocab_size == model.config.text_config.vocab_size


def test_train_alone_runs_train_py_as_one_process(tmp_path, monkeypatch):
    """Under torchrun the toy's SFT base is trained by rank 0 in a plain child process: torchrun's variables must not
    reach it (with RANK set it would wait for a process group that never forms) and a failure must raise."""
    world = files.build_world(str(tmp_path / "w"), 6, 2, 0, 2, 320, exist_per_image=1)
    base.init_checkpoint(world, tmp_path / "init", {**base.SETTINGS}, 0)
    torchrun_env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in torchrun_env.items():
        monkeypatch.setenv(k, v)
    argv = ["--algo", "sft", "--model", str(tmp_path / "init"), "--data", world["sft"], "--data-format", "llava",
            "--image-root", world["images"], "--out", str(tmp_path / "sft"), "--max-steps", "2", "--batch-size", "2",
            "--template", "vicuna_nosys"]
    base._train_alone(train.main, argv)
    header = json.loads(open(tmp_path / "sft" / "metrics.jsonl").readline())["header"]
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()
    assert header["world"] == 1 and header["config"]["template"] == "vicuna_nosys"
    with pytest.raises(RuntimeError, match="exited with"):
        base._train_alone(train.main, argv[:5] + [str(tmp_path / "missing.json")] + argv[6:])


def test_hallucination_kinds_and_table(tmp_path):
    p = tmp_path / "r.jsonl"
    rows = [{"gt_objects": ["fork", "cup"], "hallucinated": ["knife", "tree"],  # knife before the cup, tree after it
             "answer": "A red fork is on the left. A red knife is on the right. Two cups are at the top. A tree. "
                       "A knife."},
            {"gt_objects": ["cup"], "hallucinated": [], "answer": "A cup is at the top."},
            {"gt_objects": ["cup"], "hallucinated": ["star"], "answer": "There is a star. A cup is at the top."}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # knife is fork's companion, tree and star are unpaired; instead: knife, star; extra: tree
    assert evaluate.hallucination_kinds(p) == {"companion_fraction": 1 / 3, "halluc_instead": 2 / 3, "halluc_extra": 1 / 3}
    t = evaluate.table({"chair_i": 0.5, "mean_length": 10.0}, {"chair_i": 0.25, "mean_length": 9.0})
    assert "| chair_i | 50.0 | 25.0 | -25.0 |" in t and "| mean_length | 10.0 | 9.0 | -1.0 |" in t


def test_cache_key_depends_on_settings():
    a = base.cache_key(base.SETTINGS)
    assert a == base.cache_key(dict(base.SETTINGS))
    assert a != base.cache_key({**base.SETTINGS, "sft_steps": base.SETTINGS["sft_steps"] + 1})


def test_toy_settings_are_train_py_defaults(monkeypatch):
    """Without --model/--data, the toy's per-algorithm settings (ALIGN) are train.py's defaults; any option given
    overrides them, even at train.py's own default value (ddpo's beta 0.5, --sft-weight 0, --lr 1e-5); with
    --model/--data they are not applied."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    al = {**run.ALIGN["default"], **run.ALIGN["ddpo"]}
    a = train.parse_args(["--algo", "ddpo"])
    assert a.model is None and a.data is None and a.toy_seed == 0 and a.toy_cache is None
    assert (a.beta, a.lr, a.max_steps, a.batch_size, a.sft_weight) == (al["beta"], al["lr"], al["steps"], al["batch"],
                                                                        al["sft_weight"])
    assert a.warmup_steps is None and not hasattr(a, "given")  # None: default_run warms up min(5, steps // 4)
    a = train.parse_args(["--bet=0.5", "--lr", "1e-5", "--sft-weight", "0"])  # abbreviations, = forms
    assert (a.beta, a.lr, a.sft_weight, a.max_steps) == (0.5, 1e-5, 0.0, al["steps"])
    real = train.parse_args(["--algo", "ddpo", "--model", "m", "--data", "d"])  # not the toy: train.py's own
    assert (real.beta, real.lr, real.max_steps, real.batch_size, real.sft_weight, real.warmup_steps) == (
        train.ALGOS["ddpo"].beta, 1e-5, None, 4, 0.0, 0)
    # the global batch is split over torchrun's ranks; a toy-only algorithm takes its own settings, not --algo's
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.parse_args(["--algo", "dpo"]).batch_size == run.ALIGN["default"]["batch"] // 2
    assert train.parse_args(["--algo", "dpo"]).beta == run.ALIGN["dpo"]["beta"] != train.ALGOS["dpo"].beta
    assert train.parse_args(["--algo", "dpo"], toy_algo="bdhs").beta == train.ALGOS["dpo"].beta
    with pytest.raises(SystemExit):
        train.parse_args(["--algo", "ddpo", "--model", "x"])  # --model without --data


def test_every_train_option_survives_the_command_line_of_the_alignment_run(monkeypatch):
    """default_run hands the alignment run every option of the namespace as a command line (base.to_argv): each of
    train.py's options, at its default or at another value, parses back to the same value."""
    monkeypatch.setattr(train.runs, "check_args", lambda *a: None)  # every option at once, so some contradict:
    # which combinations make sense is tests/faults/test_command_lines.py's and test_arguments.py's
    others = ["--algo", "povid", "--model", "m", "--data", "d", "--data-format", "llava", "--image-root", "r",
              "--template", "raw", "--out", "o", "--max-steps", "3", "--epochs", "2.5", "--batch-size", "3",
              "--grad-accum", "2", "--lr", "3e-05", "--projector-lr", "0.001", "--weight-decay", "0.1",
              "--warmup-steps", "2", "--min-lr-ratio", "0.05", "--clip", "0", "--seed", "7", "--lora-rank", "8",
              "--lora-alpha", "4", "--lora-dropout", "0.1", "--lora-targets", "q_proj,v_proj", "--freeze-vision",
              "--grad-checkpointing", "--beta", "0.25", "--gamma", "2", "--ddpo-average", "--sft-weight", "0.5",
              "--noise-step", "100", "--ref-cache", "c", "--max-len", "64", "--strict", "--save-every", "2",
              "--keep", "1", "--resume", "--overwrite", "--allow-changed", "--skip-nonfinite", "--wandb", "w", "--toy-cache", "t", "--toy-seed", "3",
              "--reward", "oracle", "--k", "3", "--temperature", "0.7", "--max-new-tokens", "9", "--reward-norm", "5",
              "--grpo-loss", "dapo", "--clip-ratio", "0.3", "--ppo-epochs", "2", "--ppo-minibatches", "3", "--vf-coef", "0.5", "--clip-value",
              "0.5", "--gamma-ppo", "0.99", "--lam", "0.9", "--kl-estimator", "k3", "--no-whiten-rewards",
              "--guard-len-min", "2", "--guard-len-max", "50", "--guard-entropy", "0.1", "--guard-kl", "5",
              "--stop-on-collapse", "--no-signal-limit", "5", "--annotator", "oracle", "--annotator-both-orders",
              "--alpha", "0.25", "--top-p", "0.9", "--bdhs-embedder", "e", "--revision", "v1",
              "--dtype", "bf16", "--amp", "--eval-data", "e", "--eval-task", "chair", "--eval-every", "4",
              "--eval-limit", "9", "--eval-image-root", "ei", "--eval-annotations", "ea", "--eval-synonyms", "es",
              "--eval-data-format", "llava", "--eval-max-new-tokens", "7", "--eval-batch-size", "3",
              "--keep-best", "chair_s"]
    for argv in (["--model", "m", "--data", "d"], others):
        a = train.parse_args(argv)
        setting = lambda ns: {k: v for k, v in vars(ns).items() if k != "non_default"}  # a record, not an option
        assert setting(train.parse_args(base.to_argv(vars(a)))) == setting(a)
    at_default = train.parse_args(["--model", "m0", "--data", "d0"])
    given = {k for k, v in vars(train.parse_args(others)).items() if v != getattr(at_default, k)}
    assert given == set(vars(a))  # the second command line changes every option of train.py


def test_reproduce_table_and_plot(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import toy_reproduce
    monkeypatch.setattr(base, "SETTINGS", {**base.SETTINGS, **TINY})
    monkeypatch.setitem(run.ALIGN, "default", ALIGN)
    rc = toy_reproduce.main(["--algos", "ddpo", "povid", "--seeds", "0", "1", "--max-steps", "1", "--out",
                             str(tmp_path / "rep"), "--toy-cache", str(tmp_path / "cache")])
    assert rc == 0
    md = (tmp_path / "rep" / "results.md").read_text()
    assert md.startswith("`python bench/toy_reproduce.py --algos ddpo povid")
    rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == ["SFT base", "ddpo", "povid"]
    assert all(r.split("|")[2].strip() == "2" for r in rows)  # two seeds each
    assert (tmp_path / "rep" / "results.png").stat().st_size > 1000
    s = json.loads((tmp_path / "rep" / "povid-s1" / "summary.json").read_text())
    assert s["seed"] == 1 and s["algo"] == "povid" and s["steps"] == 1
    assert toy_reproduce.main(["--algos", "nope", "--out", str(tmp_path / "x")]) == 2


def test_yesno_auc_scores_present_against_absent_kinds(tmp_path):
    # a stand-in model whose logit(Yes) - logit(No) is +1 for a present kind and -1 for an absent one, except -1 ->
    # +2 for absent companions: AUC 1 over all kinds minus the companions' share, 0 against the companions alone
    from PIL import Image
    world = files.build_world(str(tmp_path / "w"), n_train=6, n_eval=8, seed=0, vocab_size=320)
    scenes = files.load_scenes(world["scenes_eval"])
    by_pixels = {Image.open(Path(world["images"]) / n).convert("RGB").tobytes(): sc for n, sc in scenes.items()}

    class Tok:
        def encode(self, text, add_bos=True):
            return {"Yes": [1], "No": [2]}[text]

    class Proc:
        tokenizer = Tok()

        def __call__(self, texts, images, padding_side="left"):
            score = []
            for t, im in zip(texts, images):
                k, gs = t.split("Is there a ")[1].split(" in the image?")[0], W.groups(by_pixels[im.tobytes()])
                score.append(1.0 if k in gs else 2.0 if any(W.PAIRED.get(p) == k for p in gs) else -1.0)
            return {"input_ids": torch.tensor(score)[:, None], "pixel_values": None, "attention_mask": None}

    class Model:
        def __call__(self, ids, pixels, attention_mask=None):
            return ids

        def logits(self, h):  # (B,) -> (B, 3): token 1 "Yes" carries the score
            return torch.stack([torch.zeros_like(h), h, torch.zeros_like(h)], 1)

    r = evaluate.yesno_auc(Model(), Proc(), world, "vicuna_nosys", n_scenes=8, batch_size=5)
    pos = sum(len(W.groups(sc)) for sc in scenes.values())
    comp = sum(sum(k not in W.groups(sc) and any(W.PAIRED.get(p) == k for p in W.groups(sc)) for k in W.KINDS)
               for sc in scenes.values())
    assert comp > 0 and r["yesno_auc_companion"] == 0.0
    assert r["yesno_auc"] == pytest.approx(1 - comp / (8 * len(W.KINDS) - pos))
