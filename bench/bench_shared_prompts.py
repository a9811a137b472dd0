"""Benchmark: rows that share a prompt run it once (nanoalign.forward's packed shared prompts) vs the plain forward.

    python bench/bench_shared_prompts.py                 # both cases, 5 interleaved rounds, 1 thread
    python bench/bench_shared_prompts.py --reps 7 --threads 2

The model and data are bench/bench_step.py's `--config llava` world (LLaVA-1.6 proportions scaled to a CPU: CLIP 2
layers, hidden 128, 192 px images, patch 8 -> 576 image tokens; LLaMA 4 layers, hidden 512, vocabulary 32,064), made
once in a temporary folder. Cases, each timed as one forward + backward of the policy in train mode:
  dpo  the 4 preference pairs (40-80 response tokens) through the fused DPO loss (nanoalign.ops.preference_loss): the
       chosen and rejected rows of a pair share their prompt (576 image tokens + the question);
  rl   2 of the prompts, k = 4 sampled responses of 48 random tokens each, through token_logprobs (an RL update's
       shape): the 4 rows of a prompt share it.
Providers: shared (nanoalign.forward.forward, the default) and plain (share_prompts=False). Every sample is a fresh
subprocess (one untimed warm-up call, then the timed call), the two providers alternated, round r in the order
rotated by r. Times: median and p20 / p80 over the rounds. Memory: the timed call's peak RSS above the RSS before it
(Linux VmHWM, reset through /proc/self/clear_refs; a fresh process, so no earlier call's freed pages hide it), median
over rounds. Parity (in the parent, once): the loss and the summed log-probs of both providers, and the largest
gradient difference over all parameters relative to the largest gradient (a per-parameter ratio is noise where the
exact gradient is 0, e.g. the attention key biases, to which softmax is invariant).
Writes bench/results/shared_prompts.{csv,md} (--out to change the folder).
"""
import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def _rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measured(fn):
    """fn() -> (seconds, peak RSS growth MB, fn's result)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_kb("VmRSS")
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, (_rss_kb("VmHWM") - base) / 1024, out


def make_cases(d: Path):
    import bench_step
    from nanoalign.batch import collate, encode_all, open_image
    from nanoalign.checkpoint import load_pretrained
    from nanoalign.data import load_examples
    from dataclasses import replace
    bench_step.use_config("llava")
    if not (d / "ckpt").exists():  # the parent makes it; the children read it
        bench_step.build_world(d)
    model, processor = load_pretrained(d / "ckpt", dtype=torch.float32)
    root = str(d / "img")
    examples, _ = load_examples(str(d / "prefs.jsonl"), "prefs", root)
    enc, _ = encode_all(examples, processor, root, "raw", 4096, None, log=lambda *a: None)
    images = [open_image(examples[it.index], root) for it in enc]
    dpo = collate(enc, ["chosen", "rejected"], processor, images)
    g = torch.Generator().manual_seed(0)
    V = model.config.text_config.vocab_size
    rows, ims = [], []
    for it, im in zip(enc[:2], images[:2]):
        for _ in range(4):
            resp = torch.randint(10, V - 100, (48,), generator=g).tolist()
            resp = [t for t in resp if t != model.config.image_token_index]
            rows.append(replace(it, chosen_ids=resp, rejected_ids=None, chosen_w=None, rejected_w=None,
                                chosen_labelled=None))
            ims.append(im)
    rl = collate(rows, ["chosen"], processor, ims, vision_always=True)
    return model, {"dpo": dpo, "rl": rl}


def step_fn(model, case: str, b: dict, share: bool):
    from nanoalign import forward as fwd
    from nanoalign.ops import preference_loss, token_logprobs

    def run():
        model.zero_grad(set_to_none=True)
        h = fwd.forward(model, b, "cpu", share_prompts=share)
        if case == "dpo":
            loss, m = preference_loss(h, model.lm_head_weight, b["labels"], b["token_weights"],
                                      torch.zeros(b["labels"].shape), loss_type="dpo", beta=0.1)
            score = float(m["logp_chosen"].double().sum() + m["logp_rejected"].double().sum())
        else:
            logp = token_logprobs(h, model.lm_head_weight, b["labels"])
            loss, score = -logp.sum() / logp.shape[0], float(logp.double().sum())
        loss.backward()
        return float(loss), score
    return run


def child(world: Path, case: str, share: bool, threads: int) -> None:
    import json
    torch.set_num_threads(threads)
    model, cases = make_cases(world)
    model.train()
    fn = step_fn(model, case, cases[case], share)
    fn()  # warm-up, untimed
    t, mb, (loss, score) = measured(fn)
    print("RESULT " + json.dumps({"t": t, "mb": mb, "loss": loss}))


def spawn(world: Path, case: str, share: bool, threads: int) -> dict:
    import json
    import subprocess
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps([str(world), case, share, threads])],
                       capture_output=True, text=True, env=env)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not line:
        raise SystemExit(f"error: child {case} shared={share} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main(argv=None):
    from nanoalign.cli import Parser  # one-line argument errors, exit 2
    p = Parser(prog="python bench/bench_shared_prompts.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cases", default="dpo,rl")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        import json
        w, case, share, threads = json.loads(a.child)
        return child(Path(w), case, share, threads)
    if a.reps < 1:
        p.error(f"--reps {a.reps}: must be >= 1")
    if a.threads < 1:
        p.error(f"--threads {a.threads}: must be >= 1")
    unknown = [c for c in a.cases.split(",") if c not in ("dpo", "rl")]
    if unknown:
        p.error(f"--cases {a.cases}: unknown case {unknown[0]!r} (choose from dpo, rl, comma-separated)")
    torch.set_num_threads(a.threads)
    from nanoalign import forward as fwd
    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model, cases = make_cases(Path(tmp))
        model.train()
        for case in a.cases.split(","):
            b = cases[case]
            packed = fwd.pack(b, model.config.image_token_index)
            n_real, n_packed = int(b["attention_mask"].sum()), (packed.ids.shape[1] if packed is not None else None)
            parity = {}
            for s in ("shared", "plain"):
                loss, score = step_fn(model, case, b, s == "shared")()
                parity[s] = (loss, score, {n: q.grad.clone() for n, q in model.named_parameters()
                                           if q.grad is not None})
            gs, gp = parity["shared"][2], parity["plain"][2]
            grad_err = max(float((gs[n] - gp[n]).abs().max()) for n in gp) / max(float(g.abs().max()) for g in
                                                                                 gp.values())
            res = {s: {"t": [], "mb": []} for s in ("shared", "plain")}
            for r in range(a.reps):
                for s in (("shared", "plain") if r % 2 == 0 else ("plain", "shared")):
                    x = spawn(Path(tmp), case, s == "shared", a.threads)
                    res[s]["t"].append(x["t"])
                    res[s]["mb"].append(x["mb"])
                    print(f"{case} round {r + 1}/{a.reps} {s}: {x['t']:.2f} s, +{x['mb']:.0f} MB, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            for s in ("shared", "plain"):
                ts = sorted(res[s]["t"])
                rows.append({"case": case, "provider": s, "rows": b["input_ids"].shape[0], "real_tokens": n_real,
                             "tokens_run": n_packed if s == "shared" else n_real,
                             "p20_s": round(ts[int(0.2 * (len(ts) - 1))], 3),
                             "p50_s": round(statistics.median(ts), 3),
                             "p80_s": round(ts[int(round(0.8 * (len(ts) - 1)))], 3),
                             "peak_mb": round(statistics.median(res[s]["mb"])), "loss": parity[s][0],
                             "logp_sum": parity[s][1]})
            sh, pl = rows[-2], rows[-1]
            lines.append(f"- {case}: shared / plain time {sh['p50_s'] / pl['p50_s']:.2f}, memory "
                         f"{sh['peak_mb'] / max(pl['peak_mb'], 1):.2f}, tokens {sh['tokens_run']} / {pl['tokens_run']};"
                         f" loss {sh['loss']:.8f} vs {pl['loss']:.8f}, summed log-probs {sh['logp_sum']:.4f} vs "
                         f"{pl['logp_sum']:.4f}, largest gradient difference {grad_err:.1e} of the largest gradient")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "shared_prompts.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import platform
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    md = [f"# `python bench/bench_shared_prompts.py --reps {a.reps} --threads {a.threads}`", "",
          f"CPU {cpu}, {a.threads} thread(s), torch {torch.__version__}, load average at the end "
          f"{os.getloadavg()[0]:.1f}; bench_step's llava world (576 image tokens, hidden 512, 4 layers, V 32,064); "
          "one policy forward + backward in train mode.", "",
          "| case | provider | rows | real tokens | tokens run | p20 s | p50 s | p80 s | peak MB |",
          "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['case']} | {r['provider']} | {r['rows']} | {r['real_tokens']} | {r['tokens_run']} | {r['p20_s']} | "
           f"{r['p50_s']} | {r['p80_s']} | {r['peak_mb']} |" for r in rows]
    md += [""] + lines
    (out / "shared_prompts.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
