"""Step time and peak memory of train.py --algo online-dpo against TRL's OnlineDPOTrainer, on CPU: the same tiny llava
checkpoint, prompts, images and lengths as bench/bench_rl.py (its `make_world`: every response exactly --max-new
tokens long on both sides), P prompts per step, 2 samples per prompt at temperature 1.0, DPO (sigmoid) with beta
0.1, lr 1e-4, full fine-tuning with a frozen reference copy on both sides.

    python bench/bench_online.py --peer-python PATH/TO/venv-with-trl/bin/python [--reps 5] [--steps 6]
        [--max-new 16] [--prompts 2] [--out bench/results/online]

The judge is the same rule on both sides: the longer response in characters is chosen. Ours: an
nanoalign.annotate.Annotator whose score is len(text), installed in place of train.load_annotator in the benchmark's
process (as tests/test_online.py does; --annotator has no such rule); TRL: a reward function returning len(text).
Ties: ours drops the pair (counted), TRL keeps it with the first sample chosen; the table gives ours' pairs kept.
Each repetition runs ours then TRL (interleaved, fresh processes); times, CPU seconds and memory are measured as in
bench_rl.py (first step of each run dropped; medians; peak RSS at the last step and over the whole run). TRL is never
imported here (its venv runs bench/trl_online_peer.py)."""
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rl import (Parser, add, add_world_args, floor_mb, header, make_world, run_ours, run_peer,  # noqa: E402
                      use_world_args, write)

JUDGE = ("from nanoalign import annotate; import torch; "
         "train.load_annotator = lambda spec, *a, **k: annotate.Annotator(spec, score=lambda ex, im, resp: "
         "torch.tensor([float(len(r)) for r in resp])); ")


def ours(d: Path, a, tag, kept: list):
    argv = ["--model", str(d / "ckpt"), "--data", str(d / "prompts.jsonl"), "--image-root", str(d / "img"),
            "--algo", "online-dpo", "--annotator", "chars", "--max-steps", str(a.steps),
            "--max-new-tokens", str(a.max_new), "--batch-size", str(a.prompts), "--temperature", "1.0",
            "--top-p", "1.0", "--beta", "0.1", "--lr", "1e-4"]
    r = run_ours(d, f"online_{tag}", argv, patch=JUDGE)
    kept += [x.get("pairs", 0) for x in r["recs"]]
    lens = [(x["chosen_len"] + x["rejected_len"]) / 2 for x in r["recs"] if "chosen_len" in x]
    return r["t"], r["cpu"], r["mem"], r["mem_all"], r["anon"], statistics.mean(lens) if lens else float("nan")


def trl(d: Path, a, tag):
    r = run_peer(a.peer_python, "trl_online_peer.py", d, f"online_{tag}",
                 [d / "ckpt", d / "img", a.steps, a.max_new, a.prompts])
    return (r["step_s"][1:], [y - x for x, y in zip(r["step_cpu"], r["step_cpu"][1:])], r["step_end_rss_mb"],
            r["peak_rss_mb"], max(r["step_anon_mb"]), r["mean_length"])


def main(argv=None):
    p = Parser(prog="python bench/bench_online.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-python", required=True, help="python of a venv with trl installed")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--prompts", type=int, default=2)
    add_world_args(p)
    p.add_argument("--out", default=None, help="OUT.md / OUT.json (default bench/results/online, online_llava with "
                                               "--config llava)")
    a = p.parse_args(argv)
    use_world_args(p, a, "online")
    res = {(side, "online-dpo"): {"t": [], "cpu": [], "mem": [], "mem_all": [], "anon": [], "len": []}
           for side in ("ours", "trl")}
    kept = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_world(d, config=a.config)
        floor = floor_mb(a.peer_python)
        for rep in range(a.reps):
            add(res[("ours", "online-dpo")], f"rep {rep} ours", *ours(d, a, rep, kept))
            add(res[("trl", "online-dpo")], f"rep {rep} trl", *trl(d, a, rep))
    cmd = (f"python bench/bench_online.py --peer-python PEER --reps {a.reps} --steps {a.steps} --max-new {a.max_new} "
           f"--prompts {a.prompts} {a.world_flags}".strip())
    head = header(cmd, a.peer_python) + [
        f"Judge on both sides: the longer response in characters is chosen. Ours kept {int(sum(kept))} of "
        f"{a.prompts * len(kept)} pairs (ties dropped; TRL keeps every pair).", ""]
    write(a.out, head, res, ["online-dpo"], floor)


if __name__ == "__main__":
    main()
