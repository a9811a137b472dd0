"""Behaviour fingerprint of train.py: 3 steps of every algorithm on a tiny transformers checkpoint, in one process and
under `torchrun --standalone --nproc_per_node 2`, written as JSON (step records of metrics.jsonl without the timing
fields, and the header's config with the run folder replaced by OUT). Run it on two checkouts and diff the files:

    python bench/train_unchanged.py --repo /path/to/before --work /tmp/w --json before.json
    python bench/train_unchanged.py --repo . --work /tmp/w --json after.json && diff before.json after.json

--work is reused: the checkpoint and data are made once (tests/test_generate.tiny_checkpoint, the pairs of
tests/test_train.py) so both checkouts train on the same files.
"""
import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

TIMING = {"time_s", "tokens_per_s", "peak_mem_mb"}
ALGOS = ["sft", "dpo", "ipo", "slic", "ddpo", "povid"]
WORDS = ["cat", "dog", "red", "blue"] + [f"w{i}" for i in range(28)]
PROMPT = "<image>\nwhat is in the image ?"


def make_world(work: Path, repo: Path):
    if (work / "prefs.jsonl").is_file():
        return
    sys.path.insert(0, str(repo / "tests"))
    import numpy as np
    from PIL import Image
    from test_generate import tiny_checkpoint
    tiny_checkpoint(str(work / "ckpt"), "llava")
    (work / "img").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(work / "prefs.jsonl", "w") as f:
        for i in range(8):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (20 + 3 * i, 40, 3), dtype=np.uint8)).save(
                work / "img" / f"{i}.png")
            chosen = [rng.choice(WORDS) for _ in range(8)]
            rejected = list(chosen)
            rejected[2:5] = ["dog", "w7", "w8"] if chosen[2] != "dog" else ["cat", "w9", "w1"]
            f.write(json.dumps({"id": str(i), "image": f"{i}.png", "prompt": PROMPT, "chosen": " ".join(chosen),
                                "rejected": " ".join(rejected)}) + "\n")


def argv_of(work: Path, out: Path, algo: str, batch: int, extra=()):
    return ["--model", str(work / "ckpt"), "--data", str(work / "prefs.jsonl"), "--image-root", str(work / "img"),
            "--out", str(out), "--algo", algo, "--max-steps", "3", "--lr", "1e-3", "--batch-size", str(batch),
            *extra]


def read(out: Path):
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    header = recs[0]["header"]
    config = {k: (str(v).replace(str(out), "OUT") if isinstance(v, str) else v) for k, v in header["config"].items()}
    steps = [{k: v for k, v in r.items() if k not in TIMING} for r in recs[1:]]
    return {"config": config, "world": header["world"], "max_steps": header["max_steps"], "steps": steps,
            "step1_loss": steps[0]["loss"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repo", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--runs", default=None, help="folder for the runs (default WORK/runs-<repo name>)")
    a = p.parse_args()
    repo, work = Path(a.repo).resolve(), Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    make_world(work, repo)
    runs = Path(a.runs or work / f"runs-{repo.name}")
    os.chdir(repo)
    sys.path.insert(0, str(repo))
    import train
    result = {}
    variants = [(algo, []) for algo in ALGOS] + [("ddpo", ["--ddpo-average", "--grad-accum", "2"]),
                                                 ("povid", ["--sft-weight", "0.1", "--grad-accum", "2"])]
    for algo, extra in variants:
        name = "-".join([algo, *[x.lstrip("-") for x in extra]])
        out = runs / f"one-{name}"
        train.main(train.parse_args(argv_of(work, out, algo, 2, extra)))
        result[f"1rank/{name}"] = read(out)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for algo, extra in variants[:len(ALGOS)]:
        out = runs / f"two-{algo}"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(repo / "train.py"), *argv_of(work, out, algo, 1, extra)], capture_output=True,
                           text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise SystemExit(f"torchrun {algo} failed:\n{r.stderr[-3000:]}")
        result[f"2ranks/{algo}"] = read(out)
    Path(a.json).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    for k, v in result.items():
        print(f"{k:32s} step-1 loss {v['step1_loss']!r}")


if __name__ == "__main__":
    main()
