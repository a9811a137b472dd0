"""Hallucination evaluation of nanoalign checkpoints: POPE, CHAIR/Recall (Object HalBench prompts), MMHal-style judging.

    python -m nanoalign.eval --model DIR [DIR ...] --task pope|chair|mmhal --data FILE [FILE ...] --image-root DIR \
        --out DIR [--limit N] [--batch-size B] [--annotations COCO_JSON] [--synonyms JSON] [--judge DIR] \
        [--max-new-tokens N] [--judge-max-new-tokens N] [--no-progress]

Per model, per-example results are appended to OUT/<name>/results-<key>.jsonl (flushed per batch; name: --name, else
the folder's name; key: the checkpoint's content fingerprint, the judge's and the generation settings, so a different
model under the same name never reuses another's answers); a rerun skips the question_ids already there (POPE ids are "<file stem>:<question_id>", the split files reuse ids), so an interrupted
run continues where it stopped. OUT/<model-name>/summary.json, and OUT/summary.json with one model, hold the metrics
at their top level; with several models OUT/summary.json is {task, models: {name: summary}, table}. The markdown
table (one line per model) is printed. Metric formulas: nanoalign/metrics.py.

run_task and everything above it is model-free: `generate_fn(images: list[PIL.Image], prompts: list[str]) ->
list[str]` and `judge_fn(image, prompt) -> str` are plain callables, so tests inject fakes. The model code
(nanoalign.checkpoint, nanoalign.generate) is imported by model_generate_fn on its first call.

Bad rows never stop the run: malformed rows, duplicate ids, image paths outside --image-root (`path_escape`, the
same check as training: nanoalign.data.resolve_image_path), missing / unreadable / oversized images (opened by
nanoalign.image.open_image, as training opens them), images absent from the annotations, generation / judge errors
are counted per kind in `bad_input` and printed. What the task needs is checked before any generation: some usable
example, CHAIR's --annotations file, MMHal's --judge ("error: ...", exit 2). After the run, a model for which nothing
was evaluated, or more than --max-failed (default 0.1) of its rows failed (FAILED_KINDS, and answers the metric cannot
parse: POPE's yes/no, MMHal's rating, `unparseable` in the table), makes the exit status 2,
with the counted reasons on stderr (the table and summaries are still written). A checkpoint that cannot be loaded
stops the run (exit 2).
"""
import json
import os
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

from nanoalign import metrics as M
from nanoalign.data import resolve_image_path
from nanoalign.image import ImageError, open_image
from nanoalign.tokenizer import TEMPLATE_CHOICES

TASKS = ("pope", "chair", "mmhal")
DEFAULT_MAX_NEW_TOKENS = {"pope": 16, "chair": 256, "mmhal": 256}
JUDGE_MAX_NEW_TOKENS = 256
TABLE_COLUMNS = {  # task -> summary keys shown in the markdown table (ratios shown in %)
    "pope": ["accuracy", "precision", "recall", "f1", "yes_ratio", "unparseable"],
    "chair": ["chair_s", "chair_i", "recall", "mean_length"],
    "mmhal": ["score", "hallucination_rate", "unparseable"],
}
# bad_input kinds that are rows of this run not evaluated (file-level notes and duplicates are not)
FAILED_KINDS = ("malformed_row", "path_escape", "missing_image", "unreadable_image", "image_too_large",
                "image_not_in_annotations", "generation_error", "judge_error")
DEFAULT_MAX_FAILED = 0.1
_PERCENT = {"accuracy", "precision", "recall", "f1", "yes_ratio", "chair_s", "chair_i", "hallucination_rate"}


# ------------------------------------------------------------------------------------------------- reading inputs
def image_path(image_root, name, bad):
    """`name` under image_root through training's path check; None (counted path_escape) when it leaves the root.
    A missing file is returned as is (counted missing_image when the run opens it)."""
    try:
        return resolve_image_path(str(name), image_root)
    except ImageError as e:
        if e.reason == "path_escape":
            bad["path_escape"] += 1
            return None
        return str(Path(os.path.realpath(image_root), str(name)))


def malformed(bad, path, label, why):
    """Count a malformed row; the first few are named on stderr ("line N" of a JSONL file, "item N" of a JSON list,
    from 1, as training's data loader names rows)."""
    if bad["malformed_row"] < 5:
        print(f"warning: {path}: {label}: {why} (malformed_row)", file=sys.stderr)
    bad["malformed_row"] += 1


def read_rows(path, bad):
    """JSON list or JSONL file -> list of (label, dict row), label "line N" / "item N" (from 1); undecodable lines /
    non-dict rows counted as malformed_row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"--data {path}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                         "re-save the file as UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            rows = [(f"item {i}", r) for i, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise ValueError(f"--data {path}: not valid JSON ({e})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    malformed(bad, path, f"line {n}", f"not JSON ({e.msg})")
    good = []
    for label, r in rows:
        if isinstance(r, dict):
            good.append((label, r))
        else:
            malformed(bad, path, label, f"a {type(r).__name__}, not an object")
    return good


def load_pope(paths, image_root, bad):
    """POPE question files (JSONL rows question_id, image, text, label yes/no) -> examples.
    question_id key = "<file stem>:<question_id>" (the three split files reuse the same ids)."""
    out = []
    for path in paths:
        for row, r in read_rows(path, bad):
            label = str(r.get("label", "")).strip().lower()
            if any(k not in r for k in ("question_id", "image", "text")) or label not in ("yes", "no"):
                malformed(bad, path, row, "needs question_id, image, text and a yes/no label")
                continue
            image = image_path(image_root, r["image"], bad)
            if image is None:
                continue
            out.append({"question_id": f"{Path(path).stem}:{r['question_id']}", "image": image,
                        "prompt": str(r["text"]), "label": label, "split": M.pope_split_of(r, Path(path).name)})
    return out


def chair_prompt(key):
    """Deterministic Object HalBench-style prompt for an example key (crc32, stable across runs and machines)."""
    return M.CHAIR_PROMPTS[zlib.crc32(str(key).encode()) % len(M.CHAIR_PROMPTS)]


def load_chair(paths, image_root, annotations, bad, synonyms=None):
    """Rows {image_id or image, prompt/text optional} + COCO annotations -> (examples with `gt_objects`, the
    annotation file's category names). gt_objects is None when the annotation file is unusable: captions are still
    generated and their length reported. A row without a prompt gets a CHAIR_PROMPTS entry (chair_prompt)."""
    objects, file_names, categories = None, {}, []
    if annotations is None:
        bad["no_annotation_file"] += 1
    else:
        try:
            objects, file_names = M.load_coco_objects(annotations, synonyms)
            categories = M.coco_category_names(annotations)
        except (ValueError, FileNotFoundError, OSError) as e:
            print(f"warning: {e}", file=sys.stderr)
            bad["bad_annotation_file"] += 1
    by_name = {Path(fn).name: i for i, fn in file_names.items()}
    out = []
    for path in paths:
        for row, r in read_rows(path, bad):
            image_id, image = r.get("image_id"), r.get("image")
            if image_id is None and image is None:
                malformed(bad, path, row, "needs image_id or image")
                continue
            if image_id is None:
                image_id = by_name.get(Path(str(image)).name)
            gt = None
            if objects is not None:
                if image_id not in objects:
                    bad["image_not_in_annotations"] += 1
                    continue
                gt = sorted(objects[image_id])
            if image is None:
                image = file_names.get(image_id)
                if image is None:
                    bad["missing_image"] += 1
                    continue
            key = str(r.get("question_id", image_id if image_id is not None else image))
            image = image_path(image_root, image, bad)
            if image is None:
                continue
            out.append({"question_id": key, "image": image, "image_id": image_id,
                        "prompt": str(r.get("prompt") or r.get("text") or chair_prompt(key)), "gt_objects": gt})
    return out, categories


def load_mmhal(paths, image_root, bad):
    """MMHal-Bench rows (question, gt_answer, image_content, image_src / image / image_path / image_id,
    question_type) -> examples. The image is the first candidate file that exists under image_root."""
    out = []
    for path in paths:
        for i, (row, r) in enumerate(read_rows(path, bad)):
            cands = [r.get("image"), r.get("image_path")]
            if r.get("image_src"):
                cands.append(str(r["image_src"]).rstrip("/").split("/")[-1])
            if r.get("image_id") is not None:
                cands.append(f"{r['image_id']}.jpg")
            if "question" not in r or "gt_answer" not in r or not any(cands):
                malformed(bad, path, row, "needs question, gt_answer and an image")
                continue
            escapes = Counter()
            cands = [p for p in (image_path(image_root, c, escapes) for c in cands if c) if p is not None]
            if not cands:
                bad.update(escapes)
                continue
            image = next((c for c in cands if os.path.exists(c)), cands[0])
            qid = r.get("question_id", r.get("id", f"{Path(path).stem}:{i}"))
            out.append({"question_id": str(qid), "image": image, "prompt": str(r["question"]),
                        "question_type": r.get("question_type"), "question": r["question"],
                        "gt_answer": r["gt_answer"], "image_content": r.get("image_content") or []})
    return out


def dedupe(examples, bad):
    seen, out = set(), []
    for ex in examples:
        if ex["question_id"] in seen:
            bad["duplicate_question_id"] += 1
        else:
            seen.add(ex["question_id"])
            out.append(ex)
    return out


# ------------------------------------------------------------------------------------------------------ the runner
class CheckpointError(RuntimeError):
    """A model or judge that cannot be loaded: stops the run (unlike per-example errors, which are counted)."""


def read_results(path, bad=None):
    """results.jsonl -> list of rows; a truncated last line (killed mid-write) is skipped and counted."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if bad is not None and line.strip():
                    bad["corrupt_result_line"] += 1
    return rows


class _Progress:
    """tqdm when installed, else one stderr line with examples/s and ETA."""

    def __init__(self, total, desc, enabled=True):
        self.total, self.done, self.t0, self.enabled, self.bar = total, 0, time.time(), enabled, None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="ex", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            rate = self.done / max(time.time() - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"\r{self.done}/{self.total} {rate:.2f} ex/s ETA {eta:.0f}s", end="", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def _result_row(task, ex, answer, judge_fn, image, bad):
    row = {"question_id": ex["question_id"], "image": ex["image"], "prompt": ex["prompt"], "answer": answer}
    if task == "pope":
        row.update(label=ex["label"], split=ex["split"], pred=M.parse_yes_no(answer))
    elif task == "chair":
        row.update(image_id=ex["image_id"], gt_objects=ex["gt_objects"])
        if ex["gt_objects"] is not None:
            per = M.chair_scores([answer], [set(ex["gt_objects"])], ex.get("synonyms"))["per_caption"][0]
            row.update(per)
    else:
        try:
            judged = judge_fn(image, M.format_judge_prompt(ex, answer))
        except CheckpointError:
            raise
        except Exception as e:  # a judge failure loses this example only; a rerun retries it
            bad["judge_error"] += 1
            print(f"warning: judge failed on {ex['question_id']}: {e}", file=sys.stderr)
            return None
        row.update(question_type=ex["question_type"], judge_output=judged, rating=M.parse_rating(judged))
    return row


def run_task(task, examples, generate_fn, out_dir, *, batch_size=8, judge_fn=None, synonyms=None, bad=None,
             progress=True, name=None, key=None):
    """Generate, score and append results for the examples not yet in out_dir/results-<key>.jsonl (key: what the
    answers depend on, results_key(); None: results.jsonl); write and return out_dir/summary.json's dict.
    generate_fn(images, prompts) -> list[str]; judge_fn(image, prompt) -> str (mmhal)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "mmhal" and judge_fn is None:
        raise ValueError("task mmhal needs a judge (--judge DIR)")
    bad = Counter() if bad is None else Counter(bad)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res_path = out_dir / (f"results-{key}.jsonl" if key else "results.jsonl")
    done = {str(r.get("question_id")) for r in read_results(res_path)}
    todo = [ex for ex in examples if ex["question_id"] not in done]
    if synonyms is not None:
        todo = [dict(ex, synonyms=synonyms) for ex in todo]
    # a killed run may leave a partial last line: start ours on a fresh line
    if res_path.exists() and res_path.stat().st_size and not res_path.read_bytes().endswith(b"\n"):
        with open(res_path, "a") as f:
            f.write("\n")
    bar = _Progress(len(todo), name or task, enabled=progress)
    with open(res_path, "a") as f:
        for b in range(0, len(todo), batch_size):
            batch, images = [], []
            for ex in todo[b:b + batch_size]:
                try:
                    images.append(open_image(ex["image"]))
                    batch.append(ex)
                except ImageError as e:  # missing_image, unreadable_image, image_too_large
                    bad[e.reason] += 1
            answers = []
            if batch:
                try:
                    answers = list(generate_fn(images, [ex["prompt"] for ex in batch]))
                    if len(answers) != len(batch):
                        raise ValueError(f"generate_fn returned {len(answers)} answers for {len(batch)} prompts")
                except CheckpointError:
                    raise
                except Exception as e:  # one failed batch is counted, the run goes on
                    bad["generation_error"] += len(batch)
                    print(f"warning: generation failed for a batch: {e}", file=sys.stderr)
                    answers, batch = [], []
            for ex, im, ans in zip(batch, images, answers):
                row = _result_row(task, ex, str(ans), judge_fn, im, bad)
                if row is not None:
                    f.write(json.dumps(row) + "\n")
            f.flush()
            bar.update(len(todo[b:b + batch_size]))
    bar.close()
    # the summary covers this run's examples (a rerun with another --limit reports on its own examples)
    wanted = {ex["question_id"] for ex in examples}
    rows = list({str(r.get("question_id")): r for r in read_results(res_path, bad)
                 if str(r.get("question_id")) in wanted}.values())
    summary = {"task": task, "model": name, **summarize(task, rows, synonyms), "n_evaluated": len(rows),
               "bad_input": {k: v for k, v in sorted(bad.items()) if v},
               # Reward-model accuracy on held-out preference pairs: filled by the RL issue as
               # {"accuracy": float, "n": int} (same summary file, same top level). None until then.
               "reward_model": None}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize(task, rows, synonyms=None):
    """Result rows -> metrics dict (top-level keys of summary.json)."""
    if task == "pope":
        return M.pope_summary(rows)
    if task == "chair":
        scored = [r for r in rows if r.get("gt_objects") is not None]
        s = M.chair_scores([r["answer"] for r in scored], [set(r["gt_objects"]) for r in scored], synonyms)
        s.pop("per_caption")
        if not scored:  # no usable annotations: only the length is meaningful
            s.update(chair_s=None, chair_i=None, recall=None)
        s["n"] = len(rows)
        s["n_scored"] = len(scored)
        s["mean_length"] = M._ratio(sum(len(r["answer"].split()) for r in rows), len(rows))
        return s
    return M.mmhal_summary(rows)


def markdown_table(summaries, task):
    """[(name, summary)] -> side-by-side markdown table (ratios in %; "n/a": a ratio over zero rows)."""
    cols = TABLE_COLUMNS[task]
    lines = ["| model | n | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name, s in summaries:
        cells = []
        for c in cols:
            v = s.get(c)
            cells.append("n/a" if v is None else f"{100 * v:.2f}" if c in _PERCENT else
                         f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"| {name} | {s.get('n', 0)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- CLI
def model_generate_fn(model_dir, max_new_tokens, batch_size, template="auto"):
    """Load a checkpoint (nanoalign.checkpoint) -> generate_fn(images, prompts) using nanoalign.generate (greedy,
    stopping at every end id of the checkpoint, processor.end_ids). template "auto": the checkpoint's chat template
    when it has one, else vicuna_v1, which puts "<image>\n" in front of the question as LLaVA's model_vqa does.
    The checkpoint is loaded on the first call, so a finished (resumed) run loads nothing."""
    loaded = []

    def generate_fn(images, prompts):
        if not loaded:
            from nanoalign.checkpoint import load_for_cli
            from nanoalign.generate import generate_text
            try:
                model, processor = load_for_cli(model_dir)
            except ValueError as e:
                raise CheckpointError(f"cannot load {e}") from None
            try:
                processor.resolve_template(template)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
            loaded.append((generate_text, model, processor))
        generate_text, model, processor = loaded[0]
        return generate_text(model, processor, images, prompts, template, max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    return generate_fn


def model_judge_fn(judge_dir, max_new_tokens=JUDGE_MAX_NEW_TOKENS):
    """A local nanoalign-loadable VLM as an MMHal-V judge: judge(image, prompt) -> str."""
    gen = model_generate_fn(judge_dir, max_new_tokens, 1)
    return lambda image, prompt: gen([image], [prompt])[0]


def results_key(model_dir, judge_dir=None, *settings) -> str | None:
    """Stored results are reused only for the same model content: a hash of the checkpoint's content fingerprint
    (refcache.checkpoint_fingerprint), the judge's, and the generation settings. None for a folder without
    safetensors (nothing to fingerprint; loading it fails with its own message)."""
    import hashlib
    from nanoalign.refcache import checkpoint_fingerprint
    parts = []
    for d in (model_dir, judge_dir):
        try:
            parts.append(checkpoint_fingerprint(d) if d else "")
        except FileNotFoundError:
            return None
    return hashlib.sha256(json.dumps([parts, [str(x) for x in settings]]).encode()).hexdigest()[:16]


def model_names(dirs):
    names, seen = [], Counter()
    for d in dirs:
        base = Path(d).resolve().name or "model"
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def main(argv=None):
    from nanoalign.cli import Parser, missing_path
    ap = Parser(prog="python -m nanoalign.eval", description=__doc__.split("\n")[0])
    ap.add_argument("--model", nargs="+", required=True, help="checkpoint folder(s); several give a side-by-side table")
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--data", nargs="+", required=True, help="question file(s): POPE JSONL, CHAIR rows, MMHal JSON")
    ap.add_argument("--image-root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", nargs="+", default=None,
                    help="a name per --model for its results folder and table row (default: the folder names)")
    ap.add_argument("--limit", type=int, default=None, help="first N valid examples only")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--template", default="auto", choices=TEMPLATE_CHOICES,
                    help="prompt template: auto = the checkpoint's chat template if it has one, else vicuna_v1 "
                         "(the toy world's models: vicuna_nosys)")
    ap.add_argument("--annotations", default=None, help="COCO instances (or captions) JSON, for --task chair")
    ap.add_argument("--synonyms", default=None, help="JSON {category: [phrases]} replacing the COCO table (chair)")
    ap.add_argument("--judge", default=None, help="checkpoint folder of the judge VLM, for --task mmhal")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: pope 16, chair 256, mmhal 256")
    ap.add_argument("--judge-max-new-tokens", type=int, default=JUDGE_MAX_NEW_TOKENS)
    ap.add_argument("--max-failed", type=float, default=DEFAULT_MAX_FAILED,
                    help="exit 2 when more than this share of a model's rows failed (default 0.1; 1 = never)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    def fail(msg):
        print(f"error: {msg}", file=sys.stderr)
        return 2
    bad = missing_path([("--model", m) for m in args.model] + [("--data", d) for d in args.data] +
                       [("--image-root", args.image_root), ("--annotations", args.annotations),
                        ("--synonyms", args.synonyms), ("--judge", args.judge)], hub_ok=("--model", "--judge"))
    if bad:  # one line before any model loads
        return fail(bad)
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        return fail(f"--batch-size {args.batch_size} must be >= 1 and --limit {args.limit} >= 1 (leave --limit out "
                    "for every row)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return fail(f"--out {args.out}: a file, not a folder")
    if not 0.0 <= args.max_failed <= 1.0:
        return fail(f"--max-failed {args.max_failed}: a share between 0 and 1")
    if not Path(args.image_root).is_dir():
        return fail(f"--image-root {args.image_root}: not a folder")
    if args.task == "chair" and not args.annotations:
        return fail("--task chair needs --annotations (COCO instances or captions JSON) to score captions")
    if args.task == "mmhal" and not args.judge:
        return fail("--task mmhal needs --judge DIR (a nanoalign-loadable VLM that sees the image)")
    from nanoalign.checkpoint import resolve_model
    try:  # local folders, or hub ids org/name fetched (or found in the cache) now
        args.model = [str(resolve_model(d)) for d in args.model]
        args.judge = str(resolve_model(args.judge)) if args.judge else None
    except ValueError as e:
        return fail(f"model folder not found: {e}")
    names = args.name or model_names(args.model)
    if len(names) != len(args.model):
        return fail(f"--name gives {len(names)} name(s) for {len(args.model)} --model folder(s): one each")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        return fail(f"--name {', '.join(dupes)}: given to more than one model; each model needs its own name")
    if any(not n or "/" in n or n in (".", "..") for n in names):
        return fail(f"--name {' '.join(names)}: names are folder names (no '/', not empty)")
    synonyms = None
    try:
        if args.synonyms:
            synonyms = json.loads(Path(args.synonyms).read_text())
            if not isinstance(synonyms, dict):
                return fail(f"--synonyms {args.synonyms}: expected a JSON object {{category: [phrases]}}")
        bad = Counter()
        if args.task == "pope":
            examples = load_pope(args.data, args.image_root, bad)
        elif args.task == "chair":
            examples, categories = load_chair(args.data, args.image_root, args.annotations, bad, synonyms)
        else:
            examples = load_mmhal(args.data, args.image_root, bad)
    except (FileNotFoundError, ValueError) as e:
        return fail(str(e))
    if args.task == "chair" and bad["bad_annotation_file"]:
        return fail(f"--annotations {args.annotations}: unusable for CHAIR (see the warning above); nothing generated")
    examples = dedupe(examples, bad)[:args.limit]
    if not examples:
        return fail(f"no usable example in --data {' '.join(map(str, args.data))} for --task {args.task} "
                    f"(bad input: {dict(bad) or 'none: the files hold no rows'}); nothing generated")
    if args.task == "chair" and synonyms is None and not set(categories) <= set(M.COCO_SYNONYMS):
        # not COCO (e.g. the toy world without --synonyms): its category names, singular and plural, are the table
        print(f"note: categories are not COCO's; matching the {len(categories)} category names only", file=sys.stderr)
        synonyms = {c: [c] for c in categories}
    if bad:
        print(f"bad input while reading: {dict(bad)}", file=sys.stderr)
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[args.task]
    judge_fn = model_judge_fn(args.judge, args.judge_max_new_tokens) if args.judge else None
    results = []
    for model_dir, name in zip(args.model, names):
        gen = model_generate_fn(model_dir, max_new, args.batch_size, args.template)
        key = results_key(model_dir, args.judge, args.task, args.template, max_new, args.judge_max_new_tokens)
        try:
            s = run_task(args.task, examples, gen, Path(args.out, name), batch_size=args.batch_size,
                         judge_fn=judge_fn, synonyms=synonyms, bad=bad, progress=not args.no_progress, name=name,
                         key=key)
        except CheckpointError as e:
            return fail(str(e))
        results.append((name, s))
    table = markdown_table(results, args.task)
    top = results[0][1] if len(results) == 1 else {"task": args.task, "models": dict(results), "table": table}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "summary.json").write_text(json.dumps(top, indent=2))
    print(table)
    rc = 0
    for name, s in results:
        if s["bad_input"]:
            print(f"{name}: bad input {s['bad_input']}", file=sys.stderr)
        failed = {k: v for k, v in s["bad_input"].items() if k in FAILED_KINDS}
        if s.get("unparseable"):  # an answer (POPE yes/no, MMHal's judge rating) the metric cannot score
            failed["unparseable"] = s["unparseable"]
        n_failed = sum(failed.values())
        n_ok = s["n_evaluated"] - failed.get("unparseable", 0)
        if n_ok == 0 or n_failed > args.max_failed * (n_ok + n_failed):
            print(f"error: {name}: {n_ok} example(s) evaluated, {n_failed} row(s) failed "
                  f"({', '.join(f'{k}={v}' for k, v in failed.items()) or 'none counted'}) > --max-failed "
                  f"{args.max_failed:g} of the rows", file=sys.stderr)
            rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
