"""Seam: every command line (train.py, python -m nanoalign.*): bad arguments, options that do nothing, missing paths."""
import json
import os
import subprocess
import sys

import pytest

import train
from common import REPO, argv

from nanoalign import bdhs_cli, eval as eval_cli, eval_rm, generate, plot
from nanoalign.lora import DEFAULT_TARGETS
from nanoalign.toy import base as toy_base


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


def _exit(capsys, fn, *args):
    """fn(*args) in-process -> (exit code, stderr); SystemExit or a returned code."""
    try:
        rc = fn(*args)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def test_bad_argument_is_one_line_on_train_py():
    """`python train.py --beta x` -> exactly one line, `error: argument --beta: invalid float value: 'x' (python
    train.py --help lists the options)`, exit 2; no usage block."""
    r = _run("train.py", "--beta", "x")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: argument --beta: invalid float value: 'x' (python train.py --help lists the options)\n"
    r = _run("-m", "nanoalign.toy.files", "--n-train", "many")
    assert r.returncode == 2 and r.stderr == ("error: argument --n-train: invalid int value: 'many' (python -m "
                                              "nanoalign.toy.files --help lists the options)\n"), r.stderr


@pytest.mark.parametrize("fn,args,line", [
    (train.parse_args, ["--algo", "nope"], "error: argument --algo: invalid choice: 'nope' (choose from 'sft', "
     "'dpo', 'ipo', 'slic', 'ddpo', 'povid', 'online-dpo', 'mixed-dpo', 'online-bdhs', 'rm', 'rloo', 'ppo', 'grpo') "
     "(python train.py --help lists the options)"),
    (train.parse_args, ["--model", "m", "--data", "d", "--batch-size", "0"],
     "error: --batch-size 0: must be >= 1 (python train.py --help lists the options)"),
    (train.parse_args, ["--no-such-option"], "error: unrecognized arguments: --no-such-option (python train.py --help "
     "lists the options)"),
    (eval_cli.main, ["--limit", "x"], "error: argument --limit: invalid int value: 'x' (python -m nanoalign.eval "
     "--help lists the options)"),
    (eval_rm.main, ["--batch-size", "1.5"], "error: argument --batch-size: invalid int value: '1.5' (python -m "
     "nanoalign.eval_rm --help lists the options)"),
    (generate.main, ["--top-p", "high"], "error: argument --top-p: invalid float value: 'high' (python -m "
     "nanoalign.generate --help lists the options)"),
    (bdhs_cli.main, ["--model", "m"], "error: the following arguments are required: --data, --out (python -m "
     "nanoalign.bdhs --help lists the options)"),
    (plot.main, ["m.jsonl", "--smooth", "0"], "error: --smooth must be >= 1 (python -m nanoalign.plot --help lists "
     "the options)"),
])
def test_bad_argument_is_one_line_everywhere(capsys, fn, args, line):
    """A bad value, an unknown option, a missing required option or a refused value, on any command line (train.py,
    eval, eval_rm, generate, bdhs, plot) -> one line `error: ... (PROG --help lists the options)`, exit 2."""
    rc, err = _exit(capsys, fn, args)
    assert rc == 2 and err == line + "\n", err


@pytest.mark.parametrize("algo,flag,value,users", [
    ("dpo", "--ppo-epochs", "8", "ppo"), ("dpo", "--annotator", "oracle", "online-dpo, mixed-dpo"),
    ("online-dpo", "--alpha", "0.3", "mixed-dpo"), ("dpo", "--reward", "oracle", "rloo, ppo, grpo"),
    ("dpo", "--k", "8", "rloo, ppo, grpo"), ("grpo", "--kl-estimator", "k3", "ppo"),
    ("rloo", "--clip-ratio", "0.3", "ppo, grpo"), ("ppo", "--reward-norm", "8", "rloo"),
    ("ppo", "--grpo-loss", "dapo", "grpo"), ("sft", "--beta", "0.2", "dpo, ipo, slic, ddpo, povid, online-dpo, "
                                                                        "mixed-dpo, online-bdhs, rloo, ppo, grpo"),
    ("dpo", "--gamma", "3", "ddpo"), ("dpo", "--noise-step", "10", "povid"),
    ("online-bdhs", "--temperature", "0.5", "online-dpo, mixed-dpo, rloo, ppo, grpo"),
    ("dpo", "--top-p", "0.9", "online-dpo, mixed-dpo, rloo, ppo, grpo"), ("online-dpo", "--bdhs-embedder", "e", "online-bdhs"),
    ("rm", "--sft-weight", "1", "dpo, ipo, slic, ddpo, povid, online-dpo, mixed-dpo, online-bdhs"),
    ("online-dpo", "--ref-cache", "c", "dpo, ipo, slic, ddpo, povid"),
    ("dpo", "--stop-on-collapse", None, "rloo, ppo, grpo"), ("rloo", "--no-whiten-rewards", None, "ppo"),
])
def test_option_the_algorithm_never_reads(world, tmp_path, capsys, algo, flag, value, users):
    """An option set away from its default that the chosen --algo never reads (--ppo-epochs with dpo, --annotator
    with offline dpo, --alpha without mixed-dpo, --reward / --k with dpo, --kl-estimator with grpo, --temperature
    with online-bdhs, ...) -> one line naming the option and the algorithms that use it, exit 2."""
    extra = ["--reward", "oracle"] if algo in ("rloo", "ppo", "grpo") and flag != "--reward" else []
    given = [flag] + ([value] if value is not None else [])
    rc, err = _exit(capsys, train.parse_args, argv(world, tmp_path, "--algo", algo, *extra, *given))
    shown = flag + (f" {value}" if value is not None else "")
    assert rc == 2 and err == (f"error: {shown}: used only by --algo {users}, not by {algo} (python train.py --help "
                               "lists the options)\n"), err


@pytest.mark.parametrize("given,line", [
    (["--lora-alpha", "16"], "--lora-alpha 16: does nothing without --lora-rank"),
    (["--lora-dropout", "0.1"], "--lora-dropout 0.1: does nothing without --lora-rank"),
    (["--lora-rank", "4", "--projector-lr", "0.001"],
     "--projector-lr 0.001: does nothing with --lora-rank (LoRA trains only its adapters)"),
    (["--lora-rank", "4", "--freeze-vision"], "--freeze-vision: does nothing with --lora-rank (LoRA trains only its "
                                              "adapters)"),
    (["--toy-seed", "3"], "--toy-seed 3: does nothing with --model/--data (only the toy-world run reads it)"),
    (["--eval-every", "2"], "--eval-every 2: does nothing without --eval-task"),
    (["--eval-task", "pope", "--eval-data", "e.jsonl", "--eval-synonyms", "s.json"],
     "--eval-synonyms s.json: does nothing without --eval-task chair"),
    (["--algo", "online-dpo", "--annotator", "oracle", "--annotator-both-orders"],
     "--annotator-both-orders: does nothing without --annotator vlm:"),
])
def test_option_that_needs_another(world, tmp_path, capsys, given, line):
    """An option read only with another one, given without it (--lora-alpha / --lora-dropout without --lora-rank,
    --projector-lr / --freeze-vision with LoRA, --toy-seed with --model/--data, --eval-every without --eval-task,
    --annotator-both-orders without a vlm: judge) -> one line saying why it does nothing, exit 2."""
    rc, err = _exit(capsys, train.parse_args, argv(world, tmp_path, *given))
    assert rc == 2 and err == f"error: {line} (python train.py --help lists the options)\n", err


@pytest.mark.parametrize("given,line", [
    (["--lora-dropout", "0"], "--lora-dropout 0: does nothing without --lora-rank"),
    (["--lora-dropout=0.0"], "--lora-dropout 0: does nothing without --lora-rank"),
    (["--lora-targets", ",".join(DEFAULT_TARGETS)], f"--lora-targets {','.join(DEFAULT_TARGETS)}: does nothing "
                                                     "without --lora-rank"),
    (["--lora-rank", "4", "--projector-lr", "1e-5"], "--projector-lr 1e-05: does nothing with --lora-rank (LoRA "
                                                     "trains only its adapters)"),
    (["--algo", "dpo", "--temperature", "1.0"], "--temperature 1: used only by --algo online-dpo, mixed-dpo, rloo, "
                                                "ppo, grpo, not by dpo"),
    (["--algo", "dpo", "--k", "4"], "--k 4: used only by --algo rloo, ppo, grpo, not by dpo"),
    (["--algo", "dpo", "--noise-st", "500"], "--noise-step 500: used only by --algo povid, not by dpo"),  # abbreviated
    (["--algo", "sft", "--beta", "0.1"], "--beta 0.1: used only by --algo dpo, ipo, slic, ddpo, povid, online-dpo, "
                                         "mixed-dpo, online-bdhs, rloo, ppo, grpo, not by sft"),
    (["--algo", "grpo", "--reward", "oracle", "--ppo-epochs", "4"], "--ppo-epochs 4: used only by --algo ppo, not "
                                                                    "by grpo"),
    (["--algo", "dpo", "--alpha", "0.5"], "--alpha 0.5: used only by --algo mixed-dpo, not by dpo"),
    (["--eval-every", "0"], "--eval-every 0: does nothing without --eval-task"),
    (["--algo", "dpo", "--no-signal-limit", "64"], "--no-signal-limit 64: used only by --algo online-dpo, mixed-dpo, "
                                                   "online-bdhs, rloo, ppo, grpo, not by dpo"),
])
def test_option_given_at_its_default_value(world, tmp_path, capsys, given, line):
    """An option the run would not read, typed at its default value (--lora-dropout 0 without --lora-rank,
    --temperature 1.0 / --k 4 / --alpha 0.5 with dpo, --beta 0.1 with sft, an abbreviation --noise-st 500) -> refused as
    at any other value (the options typed are read from the command line, not guessed from their values), exit 2."""
    rc, err = _exit(capsys, train.parse_args, argv(world, tmp_path, *given))
    assert rc == 2 and err == f"error: {line} (python train.py --help lists the options)\n", err


def test_toy_run_refuses_options_given_at_defaults(monkeypatch, capsys):
    """The toy world's run (no --model/--data) with an option its algorithm never reads typed at its default value
    (--gamma 5 with dpo, --lora-dropout 0 without --lora-rank) -> refused at once, before the world is built, exit 2;
    an --eval-* option is not refused there (the toy sets --eval-task itself)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for given, line in ((["--gamma", "5"], "--gamma 5: used only by --algo ddpo, not by dpo"),
                        (["--lora-dropout", "0"], "--lora-dropout 0: does nothing without --lora-rank")):
        rc, err = _exit(capsys, train.parse_args, ["--algo", "dpo", *given])
        assert rc == 2 and err == f"error: {line} (python train.py --help lists the options)\n", err
    assert train.parse_args(["--algo", "dpo", "--eval-every", "3"]).eval_every == 3


@pytest.mark.parametrize("algo,extra", [
    ("ppo", ["--reward", "oracle", "--ppo-epochs", "8", "--kl-estimator", "k3", "--temperature", "0.5"]),
    ("mixed-dpo", ["--alpha", "0.3", "--annotator", "oracle", "--top-p", "0.9"]),
    ("grpo", ["--reward", "oracle", "--grpo-loss", "dapo", "--clip-ratio", "0.3"]),
    ("ddpo", ["--gamma", "3", "--ddpo-average", "--sft-weight", "1"]),
    ("sft", ["--eval-task", "prefs", "--eval-data", "e.jsonl", "--beta", "0.2"]),  # prefs evaluation reads beta
    ("dpo", ["--lr", "1e-5", "--batch-size", "4"]),  # read by every algorithm: accepted at their defaults too
])
def test_option_the_algorithm_reads(world, tmp_path, algo, extra):
    """Options the chosen --algo reads, or others left at their defaults -> accepted."""
    train.parse_args(argv(world, tmp_path, "--algo", algo, *extra))


@pytest.mark.parametrize("algo", list(train.ALGOS))
def test_toy_defaults_never_trip_the_check(monkeypatch, algo):
    """The toy world's run of any algorithm (its own defaults, train_defaults, and the alignment run's command line
    that default_run builds from them) -> parses without an unused-option error."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    a = train.parse_args(["--algo", algo])
    from nanoalign.toy.run import _TOY_OWNED, away_from_defaults
    aargs = away_from_defaults({k: v for k, v in vars(a).items() if k not in _TOY_OWNED}, train.parse_args, algo)
    if train.ALGOS[algo].reward == "annotator":  # as default_run does
        aargs["annotator"] = "oracle:scenes.jsonl"
    aargs.update(algo=algo, model="m", data="d", out="o", warmup_steps=1)
    train.parse_args(toy_base.to_argv(aargs))


@pytest.mark.parametrize("flag", ["--model", "--data", "--image-root", "--reward", "--annotator", "--eval-data"])
def test_missing_path_on_train_py(world, tmp_path, monkeypatch, flag):
    """A path argument of train.py that does not exist (--model, --data, --image-root, --reward rm:P, --annotator
    rm:P / vlm:P, --eval-data) -> `no such file or folder: P (--option)`, before any model loads or --out is made."""
    missing = str(tmp_path / "nope")
    args = {"--model": ["--model", missing], "--data": ["--data", missing], "--image-root": ["--image-root", missing],
            "--reward": ["--algo", "grpo", "--reward", f"rm:{missing}"],
            "--annotator": ["--algo", "online-dpo", "--annotator", f"vlm:{missing}"],
            "--eval-data": ["--eval-task", "prefs", "--eval-data", missing]}[flag]
    monkeypatch.setattr(train, "load_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError) as e:
        train.main(train.parse_args(argv(world, tmp_path / "out", *args)))
    assert str(e.value) == f"no such file or folder: {missing} ({flag})"
    assert not (tmp_path / "out").exists()


def test_missing_annotator_folder_from_the_command_line(world, tmp_path):
    """`--annotator rm:/nonexistent` -> `error: no such file or folder: /nonexistent (--annotator)`, exit 2 (not
    "not a reward model")."""
    r = _run("train.py", *argv(world, tmp_path / "out", "--algo", "online-dpo", "--annotator", "rm:/nonexistent"))
    assert r.returncode == 2 and r.stderr == "error: no such file or folder: /nonexistent (--annotator)\n", r.stderr


@pytest.mark.parametrize("spec,option", [("rm:{m}", "--annotator"), ("vlm:{m}", "--annotator"),
                                         ("oracle:{m}", "--annotator"), ("rm:{m}", "--reward"),
                                         ("oracle:{m}", "--reward"), ("{m}/rules.py:score", "--reward")])
def test_missing_spec_path_in_the_loaders(tmp_path, spec, option):
    """nanoalign.annotate.load_annotator / nanoalign.reward.load_reward (train.py's loaders, also called by other
    code) given a spec whose path does not exist (rm:P, vlm:P, oracle:P, FILE.py:fn) -> `no such file or folder: P
    (--annotator / --reward)`, not "not a reward model" or an import error."""
    from nanoalign.annotate import load_annotator
    from nanoalign.reward import load_reward
    m = str(tmp_path / "nope")
    spec = spec.format(m=m)
    path = spec.split(":", 1)[1] if not spec.endswith(":score") else spec[:-len(":score")]
    with pytest.raises(ValueError) as e:
        (load_annotator if option == "--annotator" else load_reward)(spec)
    assert str(e.value) == f"no such file or folder: {path} ({option})"


@pytest.mark.parametrize("spec,option", [("rm:", "--annotator"), ("vlm:", "--annotator"), ("oracle:", "--annotator"),
                                         ("rm:", "--reward"), ("oracle:", "--reward")])
def test_spec_without_its_path_in_the_loaders(spec, option):
    """A --reward / --annotator spec whose prefix has nothing after it (`rm:`, `vlm:`, `oracle:`) -> the loaders
    raise one line naming the option and the form it expects (`rm:PATH`), not a load of the current folder."""
    from nanoalign.annotate import load_annotator
    from nanoalign.reward import load_reward
    hint = "oracle or oracle:SCENES.jsonl" if spec == "oracle:" else f"{spec}PATH"
    with pytest.raises(ValueError) as e:
        (load_annotator if option == "--annotator" else load_reward)(spec)
    assert str(e.value) == f"{option} {spec} names no path (expected {hint})"


@pytest.mark.parametrize("flag,spec,algo", [("--reward", "rm:", "grpo"), ("--annotator", "vlm:", "online-dpo")])
def test_spec_without_its_path_on_the_toy_run(tmp_path, flag, spec, algo):
    """`train.py --algo grpo --reward rm:` (the toy run) -> one line, exit 2, before the toy world is built (it
    built the world for minutes, then failed at the load)."""
    r = _run("train.py", "--algo", algo, flag, spec, "--toy-cache", tmp_path / "cache", "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr == f"error: {flag} {spec} names no path (expected {spec}PATH)\n", r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,spec", [("--annotator", "rm:/nonexistent"), ("--reward", "rm:/nonexistent"),
                                       ("--eval-data", "/nonexistent.jsonl")])
def test_missing_path_on_the_toy_run(tmp_path, flag, spec):
    """The toy world's run (no --model/--data) with a path that does not exist (--annotator rm:P, --reward rm:P,
    --eval-data P) -> `error: no such file or folder: P (--option)`, exit 2, before the toy world is built (it was
    checked only after a cold build of ~12 minutes)."""
    algo = {"--annotator": "online-dpo", "--reward": "grpo", "--eval-data": "dpo"}[flag]
    extra = ["--eval-task", "pope"] if flag == "--eval-data" else []
    r = _run("train.py", "--algo", algo, flag, spec, *extra, "--toy-cache", tmp_path / "cache", "--out",
             tmp_path / "out")
    path = spec.removeprefix("rm:")
    assert r.returncode == 2 and r.stderr == f"error: no such file or folder: {path} ({flag})\n", r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool,flag", [("eval", "--model"), ("eval", "--data"), ("eval", "--image-root"),
                                       ("eval", "--annotations"), ("eval_rm", "--model"), ("eval_rm", "--data"),
                                       ("eval_rm", "--image-root"), ("generate", "--model"), ("generate", "--image"),
                                       ("bdhs", "--data"), ("bdhs", "--image-root"), ("plot", "metrics")])
def test_missing_path_on_the_other_tools(world, tmp_path, capsys, tool, flag):
    """A path argument of eval, eval_rm, generate, bdhs or plot that does not exist -> one line `error: no such file
    or folder: P (--option)`, exit 2."""
    missing = str(tmp_path / "nope")
    ok = {"--model": str(world / "ckpt"), "--data": str(world / "prefs.jsonl"), "--image-root": str(world / "img"),
          "--annotations": str(world / "prefs.jsonl"), "--image": str(world / "prefs.jsonl"),
          "metrics": str(world / "prefs.jsonl")}
    given = lambda f: missing if f == flag else ok[f]  # noqa: E731
    fn, args = {
        "eval": (eval_cli.main, ["--task", "chair", "--out", str(tmp_path / "o")] +
                 [a for f in ("--model", "--data", "--image-root", "--annotations") for a in (f, given(f))]),
        "eval_rm": (eval_rm.main, [a for f in ("--model", "--data", "--image-root") for a in (f, given(f))]),
        "generate": (generate.main, ["--prompt", "what?"] + [a for f in ("--model", "--image") for a in (f, given(f))]),
        "bdhs": (bdhs_cli.main, ["--out", str(tmp_path / "b.jsonl")] +
                 [a for f in ("--model", "--data", "--image-root") for a in (f, given(f))]),
        "plot": (plot.main, [given("metrics")]),
    }[tool]
    rc, err = _exit(capsys, fn, args)
    assert rc == 2 and err == f"error: no such file or folder: {missing} ({flag})\n", err


def test_eval_rm_names_the_rows_without_rejected(world, tmp_path, capsys):
    """eval_rm on a pairs file where some rows lack "rejected" -> one line naming the file, the first such row
    (counted from 1) and how many rows lack it, exit 2."""
    rows = [json.loads(line) for line in (world / "prefs.jsonl").read_text().splitlines()][:5]
    for i in (2, 4):  # the 3rd and the 5th line
        del rows[i]["rejected"]
    path = tmp_path / "some_unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, err = _exit(capsys, eval_rm.main, ["--model", str(world / "ckpt"), "--data", str(path), "--image-root",
                                           str(world / "img")])
    assert rc == 2 and err == (f"error: {path} (prefs): 2 row(s) without a rejected response, the first at line 3; "
                               "reward-model accuracy needs pairs\n"), err
