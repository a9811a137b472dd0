"""Seam: train.py's command line."""
import pytest

import train
from common import argv, cli, error_lines


@pytest.mark.parametrize("flag,value,reason", [
    ("--max-steps", "0", "must be >= 1"), ("--max-steps", "-1", "must be >= 1"), ("--epochs", "0", "> 0"),
    ("--lora-rank", "-1", ">= 0"), ("--lr", "-1", "> 0"), ("--lr", "nan", "finite"), ("--keep", "0", ">= 1"),
    ("--save-every", "-1", ">= 0"), ("--gamma", "nan", "finite"), ("--beta", "-1", ">= 0"), ("--beta", "nan", "finite"), ("--clip", "inf", "finite"),
    ("--lora-dropout", "1", "[0, 1)"), ("--min-lr-ratio", "2", "[0, 1]"), ("--warmup-steps", "-2", ">= 0"),
    ("--projector-lr", "0", "> 0"), ("--max-len", "0", ">= 1"), ("--noise-step", "1000", "[0, 999]"),
    ("--k", "0", ">= 1"), ("--temperature", "nan", "finite"), ("--max-new-tokens", "0", ">= 1"),
    ("--ppo-epochs", "0", ">= 1"), ("--lam", "1.5", "[0, 1]"), ("--clip-ratio", "0", "> 0"),
    ("--top-p", "1.5", "(0, 1]"), ("--top-p", "0", "(0, 1]"), ("--alpha", "1.5", "[0, 1]"), ("--alpha", "nan", "[0, 1]"),
    ("--guard-kl", "nan", "> 0"), ("--guard-entropy", "-1", ">= 0"), ("--eval-batch-size", "0", ">= 1"),
    ("--eval-every", "-1", ">= 0"),
])
def test_argument_that_makes_no_sense(world, tmp_path, capsys, flag, value, reason):
    """An argument that makes no sense (--max-steps 0 / -1, --epochs 0, --lora-rank -1, --lr -1 / nan, --keep 0,
    --save-every -1, --gamma nan, --top-p 1.5, --alpha 1.5 / nan, ...) -> refused by the parser with the reason,
    before anything loads, exit 2."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv(world, tmp_path, flag, value))
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} {value}" in last.replace("nan", value).replace("inf", value) and reason in last, last


@pytest.mark.parametrize("algo,extra,reason", [("ipo", ["--beta", "0"], "beta must be > 0"),
                                               ("grpo", ["--k", "1", "--reward", "oracle"], "k must be >= 2")])
def test_argument_that_makes_no_sense_for_the_algorithm(world, tmp_path, capsys, algo, extra, reason):
    """An argument that makes no sense for the algorithm only (--beta 0 with ipo, whose target 1/(2 beta) is
    infinite; --k 1 with rloo / grpo, which compare each sample with the others of its prompt) -> refused by the
    parser with the reason, exit 2."""
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv(world, tmp_path, "--algo", algo, *extra))
    assert e.value.code == 2 and reason in capsys.readouterr().err.strip().splitlines()[-1]


def test_missing_tokenizer_and_wrong_data_kind(world, tmp_path):
    """A checkpoint without tokenizer.json, or llava (single-response) data given to --algo dpo -> one line, exit 2."""
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(world / "ckpt", ck)
    (ck / "tokenizer.json").unlink()
    r = cli(world, tmp_path / "o", "--algo", "dpo", "--max-steps", 1, "--model", ck)
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "no tokenizer.json" in r.stderr, r.stderr
    r = cli(world, tmp_path / "o2", "--algo", "dpo", "--max-steps", 1, "--data", world / "llava.json",
            "--data-format", "llava")
    assert r.returncode == 2 and len(error_lines(r.stderr)) == 1 and "needs prompt, chosen, rejected" in r.stderr, \
        r.stderr


def test_every_numeric_option_has_a_rule():
    """A numeric option without a value rule (--alpha 1.5 and --top-p 1.5 trained, or failed after the model loaded)
    -> every int / float option of train.py is checked by runs.ARG_RULES, or listed in runs.ANY_VALUE."""
    import argparse

    from nanoalign import cli, runs
    seen = {}
    real = cli.Parser.parse_args

    def spy(self, *a, **kw):
        seen["parser"] = self
        return real(self, *a, **kw)
    cli.Parser.parse_args, saved = spy, cli.Parser.parse_args
    try:
        train.parse_args(["--model", "m", "--data", "d"])
    finally:
        cli.Parser.parse_args = saved
    numeric = [a.dest for a in seen["parser"]._actions if not isinstance(a, argparse._HelpAction)
               and a.type in (int, float)]
    assert len(numeric) > 30
    assert [d for d in numeric if d not in runs.ARG_RULES and d not in runs.ANY_VALUE] == []
