"""Step time and peak memory of train.py's rloo / grpo against TRL's RLOOTrainer / GRPOTrainer, on CPU, the same tiny
llava checkpoint (tests/test_generate.tiny_checkpoint, see `make_world`), 16 prompts with images, k samples per
prompt, P prompts per step, the same response budget and a reward = the number of words of the response.

    python bench/bench_rl.py --peer-python PATH/TO/venv-with-trl/bin/python [--reps 5] [--steps 3] [--k 4]
        [--max-new 16] [--prompts 2] [--out bench/results/rl]

Equal work on both sides: the same prompt text (the checkpoint's chat template, which both train.py and TRL render),
the same images, k, P and max new tokens, and every response exactly --max-new tokens long: `make_world` edits the
random checkpoint so that EOS and the <image> token are never sampled (a constant coordinate in the residual stream
and a large negative weight on it in their rows of the LM head; without it TRL's responses ran longer than ours,
since ours also ends a response at a sampled <image>). Both sides report their mean response length.

Each repetition runs ours then TRL for each algorithm (interleaved, each in a fresh process); a step's time is the
wall time of one optimizer step including its rollout (ours: train.py's time_s, which includes opening the images
and collating; TRL: a callback's on_step_begin -> on_step_end, which excludes its data loader's fetch); the first
step of each run is dropped (warm-up); the figure is the median over the rest. Beside the wall time, the process's
CPU seconds per step (time.process_time between consecutive step ends, all threads; on a loaded machine it moves
less than wall time; it covers the whole loop on both sides: data, rollout, update, logging). Memory: the process's
peak RSS (ru_maxrss) at the end of the last step (ours: the metrics line's peak_mem_mb; TRL: read in on_step_end),
model load included, and the whole process's peak (ours then includes the end-of-run plot, matplotlib). TRL is never
imported here (its own venv runs bench/trl_rl_peer.py)."""
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from nanoalign.cli import Parser  # noqa: E402  (one-line argument errors, exit 2)

REWARD = "def length(images, prompts, responses):\n    return [float(len(r.split())) for r in responses]\n"
# ours in a fresh process: the process CPU time at each metrics line (one per step) is recorded beside train.py's
# own wall time_s, then the whole run's peak RSS
OURS = ("import json, resource, sys, time; sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r}); import train; "
        "from bench_rl import anon_mb; {patch}"
        "cpu, anon = [], []; w = train.runs.MetricsLog.write; "
        "train.runs.MetricsLog.write = lambda self, rec: ((cpu.append(time.process_time()), anon.append(anon_mb())) if "
        "'step' in rec else None, w(self, rec))[1]; "
        "train.main(train.parse_args(sys.argv[2:])); "
        "json.dump({{'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'cpu': cpu, "
        "'anon': anon}}, open(sys.argv[1], 'w'))")


def anon_mb() -> float:
    """This process's resident anonymous memory now (RssAnon of /proc/self/status, MB): what it allocated, without
    the mapped pages of shared libraries, whose resident count depends on the page cache (peak RSS of the same
    program moved by 50-90 MB with what the parent process had done before)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
            "{% else %}ASSISTANT: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def never_end(ckpt: Path, token_ids):
    """Make `token_ids` (EOS, <image>) unsampleable in the saved random llava checkpoint, so every response is
    exactly max-new-tokens long on both sides: coordinate 0 of the residual stream is a constant c (the embeddings'
    and the projector's output set to c there, no attention / MLP output writes to it), so after the final RMSNorm
    h[0] > 0 on every position; their LM-head rows get -50 on coordinate 0 (a logit around -100 or lower)."""
    from safetensors.torch import load_file, save_file
    f = ckpt / "model.safetensors"
    w = load_file(str(f))
    lm = "language_model.model."
    w[lm + "embed_tokens.weight"][:, 0] = 1.0
    w["multi_modal_projector.linear_2.weight"][0, :] = 0.0
    w["multi_modal_projector.linear_2.bias"][0] = 1.0
    for k in w:
        if k.startswith(lm + "layers.") and k.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[k][0, :] = 0.0
    for t in token_ids:
        w["language_model.lm_head.weight"][t, :] = 0.0
        w["language_model.lm_head.weight"][t, 0] = -50.0
    save_file({k: v.contiguous() for k, v in w.items()}, str(f), metadata={"format": "pt"})



def make_world(d: Path, n: int = 16, config: str = "tiny"):
    """d/ckpt (chat template, EOS and <image> never sampled), d/img/{i}.png, d/prompts.jsonl (n rows of prefs with the
    same question), d/bench_reward.py (the word-count reward for train.py's --reward). config "tiny": the tests' tiny
    llava (hidden 32, 16 image tokens); "llava": bench_step.py's LLaVA-proportion model (576 image tokens, hidden
    512, 4 layers, vocabulary 32,064)."""
    sys.path.insert(0, str(REPO / "tests"))
    import numpy as np
    from PIL import Image
    if config == "llava":
        import bench_step
        from transformers import AutoProcessor
        bench_step.use_config("llava")
        bench_step.build_world(d / "llava")
        (d / "llava" / "ckpt").rename(d / "ckpt")
        proc = AutoProcessor.from_pretrained(str(d / "ckpt"))
    else:
        from test_generate import tiny_checkpoint
        _, proc = tiny_checkpoint(str(d / "ckpt"), "llava")
    proc.chat_template = TEMPLATE
    proc.save_pretrained(str(d / "ckpt"))
    never_end(d / "ckpt", [proc.tokenizer.eos_token_id, proc.tokenizer.convert_tokens_to_ids("<image>")])
    (d / "img").mkdir()
    with open(d / "prompts.jsonl", "w") as f:
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                d / "img" / f"{i}.png")
            f.write(json.dumps({"id": str(i), "image": f"{i}.png", "prompt": "<image>\nwhat is in the image ?",
                                "chosen": "cat", "rejected": "dog"}) + "\n")
    (d / "bench_reward.py").write_text(REWARD)


THREADS = {}  # --threads N: OMP_NUM_THREADS / MKL_NUM_THREADS of both sides' processes (empty: inherited)


def call(cmd, cwd):
    """Run one side in a fresh process; its stderr tail on failure."""
    r = subprocess.run(cmd, cwd=str(cwd), capture_output=True, text=True, env=dict(os.environ, **THREADS))
    if r.returncode:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} ... failed (exit {r.returncode}):\n{r.stderr[-3000:]}")


def run_ours(d: Path, tag: str, argv: list, patch: str = "") -> dict:
    """train.py in a fresh process -> {t: step seconds (first dropped), mem: peak RSS at the last step, mem_all,
    len: mean response length, recs}."""
    out = d / f"ours_{tag}"
    code = OURS.format(repo=str(REPO), bench=str(REPO / "bench"), patch=patch)
    call([sys.executable, "-c", code, str(out) + ".json", *argv, "--out", str(out)], REPO)
    recs = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "step" in r]
    side = json.load(open(str(out) + ".json"))
    return {"t": [r["time_s"] for r in recs][1:], "cpu": [b - a for a, b in zip(side["cpu"], side["cpu"][1:])],
            "mem": recs[-1]["peak_mem_mb"], "mem_all": side["peak_rss_mb"], "anon": max(side["anon"]), "recs": recs}


def run_peer(peer_python: str, script: str, d: Path, tag: str, args: list) -> dict:
    """A TRL peer script in its venv -> its json (step_s, peak_rss_mb, step_end_rss_mb, mean_length, ...)."""
    out = d / f"trl_{tag}.json"
    call([peer_python, str(REPO / "bench" / script), *map(str, args), str(out)], d)
    return json.load(open(out))


def ours(algo, d: Path, a, tag):
    argv = ["--model", str(d / "ckpt"), "--data", str(d / "prompts.jsonl"), "--image-root", str(d / "img"),
            "--algo", algo, "--max-steps", str(a.steps), "--k", str(a.k), "--max-new-tokens", str(a.max_new),
            "--batch-size", str(a.prompts), "--reward", f"{d / 'bench_reward.py'}:length",
            "--temperature", "1.0", "--lr", "1e-4", *(["--reward-norm", "0"] if algo == "rloo" else [])]
    r = run_ours(d, f"{algo}_{tag}", argv)
    return r["t"], r["cpu"], r["mem"], r["mem_all"], r["anon"], statistics.mean(x["resp_len"] for x in r["recs"])


def trl(algo, d: Path, a, tag):
    r = run_peer(a.peer_python, "trl_rl_peer.py", d, f"{algo}_{tag}",
                 [algo, d / "ckpt", d / "img", a.steps, a.k, a.max_new, a.prompts])
    return (r["step_s"][1:], [b - a for a, b in zip(r["step_cpu"], r["step_cpu"][1:])], r["step_end_rss_mb"],
            r["peak_rss_mb"], max(r["step_anon_mb"]), r.get("mean_length", float("nan")))


FLOOR = ("import resource, torch; p = torch.nn.Parameter(torch.zeros(1)); o = torch.optim.AdamW([p]); "
         "p.grad = torch.ones(1); o.step(); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
         "[int(x.split()[1]) / 1024 for x in open('/proc/self/status') if x.startswith('RssAnon:')][0])")


def floor_mb(peer_python: str, n: int = 3) -> list[float]:
    """The memory every torch trainer pays on this machine: the peak RSS of a process that imports torch and makes
    one AdamW step of a 1-element parameter (torch.optim imports torch._dynamo in add_param_group and step), n
    processes in our venv and n in the peer's, alternating -> 2n (peak RSS, anonymous RSS at the end) in MB. Call it
    in the benchmark's own process after make_world: the peak RSS of the same child moved from 371 to 463 MB with
    what the parent had done before (resident pages of the shared libraries; the anonymous part did not move)."""
    return [tuple(map(float, subprocess.run([py, "-c", FLOOR], capture_output=True, text=True).stdout.split()))
            for _ in range(n) for py in (sys.executable, peer_python)]


def header(cmd: str, peer_python: str) -> list[str]:
    """The md's first lines: the command, the load average, the TRL / torch / transformers versions, the memory
    floor."""
    v = subprocess.run([peer_python, "-c", "import trl, torch, transformers; "
                        "print(trl.__version__, torch.__version__, transformers.__version__)"],
                       capture_output=True, text=True).stdout.split()
    return [f"`{cmd}`", "", f"CPU, load average at the end {os.getloadavg()[0]:.1f} (1 min) / {os.getloadavg()[1]:.1f} "
            f"(5 min); TRL {v[0] if v else '?'}, torch {v[1] if v else '?'}, transformers {v[2] if v else '?'}", ""]


def main(argv=None):
    p = Parser(prog="python bench/bench_rl.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-python", required=True, help="python of a venv with trl installed")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--algos", nargs="+", default=["grpo", "rloo"])
    add_world_args(p)
    p.add_argument("--out", default=None, help="OUT.md / OUT.json (default bench/results/rl, rl_llava with "
                                               "--config llava)")
    a = p.parse_args(argv)
    if a.k < 2:
        p.error(f"--k {a.k}: must be >= 2 (grpo and rloo compare each sample with the others of its prompt)")
    use_world_args(p, a, "rl")
    res = {(side, algo): {"t": [], "cpu": [], "mem": [], "mem_all": [], "anon": [], "len": []}
           for side in ("ours", "trl")
           for algo in a.algos}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        make_world(d, config=a.config)
        floor = floor_mb(a.peer_python)
        for rep in range(a.reps):
            for algo in a.algos:
                for side, fn in (("ours", ours), ("trl", trl)):
                    add(res[(side, algo)], f"rep {rep} {side} {algo}", *fn(algo, d, a, rep))
    cmd = (f"python bench/bench_rl.py --peer-python PEER --reps {a.reps} --steps {a.steps} --k {a.k} {a.world_flags}"
           f"--max-new {a.max_new} --prompts {a.prompts}")
    write(a.out, header(cmd, a.peer_python), res, a.algos, floor)


def add_world_args(p):
    p.add_argument("--config", choices=["tiny", "llava"], default="tiny",
                   help="tiny (the tests' llava: hidden 32, 16 image tokens) or llava (bench_step.py's LLaVA "
                        "proportions: 576 image tokens, hidden 512, 4 layers, vocabulary 32,064)")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP / MKL threads of both sides' processes (0: inherited; 1 on a shared machine, where a "
                        "2-thread process waits at barriers for a descheduled sibling)")


def use_world_args(p, a, name: str):
    """Checks the arguments both benchmarks share (p.error: one line, exit 2, before the world is built), then sets
    the threads, the output path and the flags shown in the table's command."""
    for flag, v, least, why in (("--reps", a.reps, 1, ""), ("--steps", a.steps, 2, " (the first step is dropped)"),
                                ("--max-new", a.max_new, 1, ""), ("--prompts", a.prompts, 1, ""),
                                ("--threads", a.threads, 0, " (0: inherited)")):
        if v < least:
            p.error(f"{flag} {v}: must be >= {least}{why}")
    if not os.path.isfile(a.peer_python):
        p.error(f"no such file or folder: {a.peer_python} (--peer-python)")
    if a.threads:
        THREADS.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    a.out = a.out or str(REPO / "bench" / "results" / (name if a.config == "tiny" else f"{name}_{a.config}"))
    a.world_flags = (f"--config {a.config} " if a.config != "tiny" else "") + \
        (f"--threads {a.threads} " if a.threads else "")


def add(r: dict, tag: str, t, cpu, mem, mem_all, anon, ln):
    """One run's figures into r (lists over runs / steps) and one progress line."""
    r["t"] += t
    r["cpu"] += cpu
    r["mem"].append(mem)
    r["mem_all"].append(mem_all)
    r["anon"].append(anon)
    r["len"].append(ln)
    print(f"{tag}: steps {['%.3f' % x for x in t]} s wall, {['%.3f' % x for x in cpu]} s CPU, peak {mem:.0f} MB at the "
          f"last step ({mem_all:.0f} MB whole run), anonymous {anon:.0f} MB, mean response {ln:.2f} tokens", flush=True)


def write(out: str, head: list, res: dict, algos, floor: list[tuple[float, float]]):
    """OUT.md (the table, the memory above the floor) and OUT.json (every step's figures)."""
    lines = head + [
        "| algo | ours step s (median wall) | TRL step s | time ratio | ours CPU s/step (median) | TRL CPU s/step | "
        "CPU ratio | ours peak RSS MB | TRL peak RSS MB | RSS ratio | ours anon MB | TRL anon MB | anon ratio | "
        "whole-run peak RSS MB ours / TRL | mean response tokens ours / TRL | n steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for algo in algos:
        o, t = res[("ours", algo)], res[("trl", algo)]
        mo, mt = statistics.median(o["t"]), statistics.median(t["t"])
        co, ct = statistics.median(o["cpu"]), statistics.median(t["cpu"])
        po, pt = max(o["mem"]), max(t["mem"])
        ao, at = max(o["anon"]), max(t["anon"])
        lines.append(f"| {algo} | {mo:.3f} | {mt:.3f} | {mo / mt:.2f} | {co:.3f} | {ct:.3f} | {co / ct:.2f} | "
                     f"{po:.0f} | {pt:.0f} | {po / pt:.2f} | {ao:.0f} | {at:.0f} | {ao / at:.2f} | "
                     f"{max(o['mem_all']):.0f} / {max(t['mem_all']):.0f} | "
                     f"{statistics.mean(o['len']):.2f} / {statistics.mean(t['len']):.2f} | "
                     f"{len(o['t'])} / {len(t['t'])} |")
    rss, anon = [x[0] for x in floor], [x[1] for x in floor]
    lines += ["", f"Memory floor (`floor_mb`, {len(floor)} processes of both venvs, in this benchmark's process): "
              f"`import torch` + one torch.optim.AdamW step, which imports torch._dynamo: peak RSS {min(rss):.0f} to "
              f"{max(rss):.0f} MB, anonymous {min(anon):.0f} to {max(anon):.0f} MB; both sides pay it. Above it "
              "(max over runs, at step ends):"]
    for algo in algos:
        o, t = res[("ours", algo)], res[("trl", algo)]
        po, pt, ao, at = max(o["mem"]) - max(rss), max(t["mem"]) - max(rss), max(o["anon"]) - max(anon), \
            max(t["anon"]) - max(anon)
        lines.append(f"- {algo}: peak RSS ours {po:.0f} MB, TRL {pt:.0f} MB; anonymous ours {ao:.0f} MB, TRL "
                     f"{at:.0f} MB (ratio {ao / at:.2f})")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text(text)
    json.dump({f"{s}_{al}": v for (s, al), v in res.items()}, open(out + ".json", "w"), indent=1)


if __name__ == "__main__":
    main()
