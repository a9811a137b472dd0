"""Step time and peak memory of train.py's rloo / grpo against TRL's RLOOTrainer / GRPOTrainer, on CPU, the same tiny
llava checkpoint (tests/test_generate.tiny_checkpoint), 16 prompts with images, k samples per prompt, P prompts per
step, the same response budget and a reward = the number of words of the response.

    python bench/bench_rl.py --peer-python PATH/TO/venv-with-trl/bin/python [--reps 3] [--steps 3] [--k 4]
        [--max-new 16] [--prompts 2] [--out bench/results/rl]

Each repetition runs ours then TRL for each algorithm (interleaved, each in a fresh process); a step's time is the
wall time of one optimizer step including its rollout (ours: train.py's time_s; TRL: a callback's on_step_begin ->
on_step_end); the first step of each run is dropped (warm-up); the figure is the median over the rest. Memory: the
process's peak RSS (ru_maxrss), model load included. Differences that remain: TRL builds the prompt with the
processor's chat template ("USER: <image>\\n... ASSISTANT:"), ours with vicuna_v1; the sampled lengths then differ, so
the table also gives the mean response length of each side. TRL is never imported here (its own venv runs
bench/trl_rl_peer.py)."""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REWARD = "def length(images, prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
OURS = ("import json, resource, sys; sys.path.insert(0, {repo!r}); import train; "
        "train.main(train.parse_args(sys.argv[2:])); "
        "json.dump({{'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}, open(sys.argv[1], 'w'))")


def make_world(d: Path):
    sys.path.insert(0, str(REPO / "tests"))
    import numpy as np
    from PIL import Image
    from test_generate import tiny_checkpoint
    _, proc = tiny_checkpoint(str(d / "ckpt"), "llava")
    proc.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                          "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                          "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    proc.save_pretrained(str(d / "ckpt"))
    (d / "img").mkdir()
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(16):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                d / "img" / f"{i}.png")
            f.write(json.dumps({"id": str(i), "image": f"{i}.png", "prompt": "<image>\nwhat is in the image ?",
                                "chosen": "cat", "rejected": "dog"}) + "\n")
    (d / "bench_reward.py").write_text(REWARD)


def ours(algo, d: Path, a, tag):
    out = d / f"ours_{algo}_{tag}"
    argv = ["--model", str(d / "ckpt"), "--data", str(d / "prompts.jsonl"), "--image-root", str(d / "img"),
            "--algo", algo, "--max-steps", str(a.steps), "--k", str(a.k), "--max-new-tokens", str(a.max_new),
            "--batch-size", str(a.prompts), "--reward", f"{d / 'bench_reward.py'}:length", "--lr", "1e-4",
            "--out", str(out), *(["--reward-norm", "0"] if algo == "rloo" else [])]
    code = OURS.format(repo=str(REPO))
    subprocess.run([sys.executable, "-c", code, str(out) + ".json", *argv], check=True, cwd=str(REPO),
                   capture_output=True)
    recs = [json.loads(x) for x in open(out / "metrics.jsonl")]
    recs = [r for r in recs if "step" in r]
    return ([r["time_s"] for r in recs][1:], json.load(open(str(out) + ".json"))["peak_rss_mb"],
            statistics.mean(r["resp_len"] for r in recs))


def trl(algo, d: Path, a, tag):
    out = d / f"trl_{algo}_{tag}.json"
    subprocess.run([a.peer_python, str(REPO / "bench" / "trl_rl_peer.py"), algo, str(d / "ckpt"), str(d / "img"),
                    str(a.steps), str(a.k), str(a.max_new), str(a.prompts), str(out)], check=True, cwd=str(d),
                   capture_output=True)
    r = json.load(open(out))
    return r["step_s"][1:], r["peak_rss_mb"], r.get("mean_length", float("nan"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-python", required=True, help="python of a venv with trl installed")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--algos", nargs="+", default=["grpo", "rloo"])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "rl"))
    a = p.parse_args(argv)
    res = {(side, algo): {"t": [], "mem": [], "len": []} for side in ("ours", "trl") for algo in a.algos}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_world(d)
        for rep in range(a.reps):
            for algo in a.algos:
                for side, fn in (("ours", ours), ("trl", trl)):
                    t, mem, ln = fn(algo, d, a, rep)
                    r = res[(side, algo)]
                    r["t"] += t
                    r["mem"].append(mem)
                    r["len"].append(ln)
                    print(f"rep {rep} {side} {algo}: steps {['%.2f' % x for x in t]} s, peak {mem:.0f} MB", flush=True)
    lines = [f"`python bench/bench_rl.py --reps {a.reps} --steps {a.steps} --k {a.k} --max-new {a.max_new} "
             f"--prompts {a.prompts}` (CPU, load {os.getloadavg()[0]:.1f})", "",
             "| algo | ours step s (median) | TRL step s (median) | time ratio | ours peak MB | TRL peak MB | "
             "memory ratio | n steps |", "|---|---|---|---|---|---|---|---|"]
    for algo in a.algos:
        o, t = res[("ours", algo)], res[("trl", algo)]
        mo, mt = statistics.median(o["t"]), statistics.median(t["t"])
        po, pt = max(o["mem"]), max(t["mem"])
        lines.append(f"| {algo} | {mo:.3f} | {mt:.3f} | {mo / mt:.3f} | {po:.0f} | {pt:.0f} | {po / pt:.2f} | "
                     f"{len(o['t'])} / {len(t['t'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".md").write_text(text)
    json.dump({f"{s}_{al}": v for (s, al), v in res.items()}, open(a.out + ".json", "w"), indent=1)


if __name__ == "__main__":
    main()
