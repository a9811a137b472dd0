"""What every command line of nanoalign shares (train.py and each `python -m nanoalign.*`):

    Parser(prog=...)               argparse.ArgumentParser whose errors are one line, exit code 2
    DefaultsHelp                   a --help formatter that shows every option's default (train.py's)
    missing_path(pairs)            the first (option, path) whose path does not exist -> its one line, else None
    spec_path(spec)                the file or folder a --reward / --annotator spec names (rm:P, vlm:P, oracle:P)
    run(fn, interrupted)           fn() with the command line's exits: one line and code 2 for bad input or a stop
"""
from __future__ import annotations

import argparse
import os
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (an unknown option, a bad value, a missing required one, parser.error) print
    one line on stderr, `error: MESSAGE (PROG --help lists the options)`, and exit with code 2, instead of the usage
    block (dozens of lines for train.py) followed by the error. --help is unchanged."""

    def error(self, message):
        self.exit(2, f"error: {message} ({self.prog} --help lists the options)\n")


class DefaultsHelp(argparse.RawTextHelpFormatter):
    """--help shows every option's default (those whose text does not already say it)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is argparse.SUPPRESS or action.option_strings == ["-h", "--help"]:
            return h
        return f"{h} (default: %(default)s)" if h else "(default: %(default)s)"


def spec_path(spec: str | None, option: str = "--reward") -> str | None:
    """The file or folder a --reward / --annotator spec reads: rm:PATH, vlm:PATH, oracle:SCENES -> that path; a bare
    `oracle`, module:function or None -> None (a module is found by import), FILE.py:function -> FILE.py.
    ValueError `OPTION SPEC names no path (expected PREFIX:PATH)` for a prefix with nothing after it (`rm:` was read
    as no path: nothing checked it before the model loaded, a toy run built its world first; option: the
    command-line option, for the line)."""
    if not spec:
        return None
    for prefix in ("rm:", "vlm:", "oracle:"):
        if spec.startswith(prefix):
            if not spec[len(prefix):]:
                hint = "oracle or oracle:SCENES.jsonl" if prefix == "oracle:" else f"{prefix}PATH"
                raise ValueError(f"{option} {spec} names no path (expected {hint})")
            return spec[len(prefix):]
    module = spec.rpartition(":")[0]
    return module if module.endswith(".py") else None


def missing_path(pairs, hub_ok: tuple[str, ...] = ()) -> str | None:
    """pairs: (option, path or None) in the order the command line should be checked -> `no such file or folder: P
    (--option)` for the first path that does not exist, else None. Options in hub_ok also take a Hugging Face hub id
    org/name (nanoalign.checkpoint.is_hub_id): such a name is fetched later, not refused here."""
    for option, path in pairs:
        if path is None or os.path.exists(path):
            continue
        if option in hub_ok:
            from nanoalign.checkpoint import is_hub_id
            if is_hub_id(path):
                continue
        return f"no such file or folder: {path} ({option})"
    return None


def run(fn, interrupted=None):
    """fn() as a command line's body -> its result. Bad input (ValueError, FileNotFoundError, ImportError): `error:
    MESSAGE` on stderr, exit 2 (NANOALIGN_DEBUG=1: the traceback instead). A stop with its line (a SystemExit whose
    code is a message: nanoalign.trainutil.Stop for a non-finite step, the collapse guard, a failed save): that line,
    exit 2. Ctrl-C: `interrupted()`'s line after a line break (past a progress bar), exit 130."""
    try:
        return fn()
    except (ValueError, FileNotFoundError, ImportError) as e:
        if os.environ.get("NANOALIGN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print("\n" + interrupted(), file=sys.stderr)
        sys.exit(130)
