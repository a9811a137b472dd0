"""Annotators: two sampled responses of one prompt -> which is chosen (Online-DPO's preference labels).

Amirloo et al. 2024, "Understanding Alignment in Multimodal LLMs: A Comprehensive Study", arXiv:2407.02477,
Section 3.4 / Appendix D: the policy samples two responses per prompt during training and an annotator (there
LLaVA-1.6-34B with the prompt of their Table 14) says which one is better. `--annotator` specs:
  oracle[:SCENES.jsonl]  the toy world's judge (nanoalign.toy.oracle.oracle_score through nanoalign.reward's
                         oracle_reward): the higher score wins;
  rm:PATH                a reward model checkpoint (nanoalign.reward.load_reward_model): the higher reward wins;
  vlm:PATH               a nanoalign-loadable VLM asked which response is better for the image, with JUDGE_PROMPT
                         below (our own words, not the paper's Table 14), decoded greedily and parsed by
                         parse_verdict; `both_orders` asks again with the responses swapped and keeps only the pairs
                         whose two verdicts agree (position-bias control).
Every annotator returns one verdict per pair: 0 = the first response is better, 1 = the second, None = the pair is
dropped; the reason of every drop is counted (identical, tie, unparseable, inconsistent). Stats also count how often
"Response 1" (the first shown) won among the parsed VLM verdicts: the position bias.
Departures: the judge prompt is ours; ties (equal scores) drop the pair instead of picking one at random.
"""
from __future__ import annotations

import re
from collections import Counter

import torch

# The judge prompt: the one place it lives. {question}, {first}, {second} are filled in; the image is shown before.
JUDGE_PROMPT = (
    "You are checking two answers to a question about the image above. Judge them only by what the image shows: "
    "an answer that names objects, counts, colors or positions that are not in the image is worse, and among "
    "faithful answers the more complete and helpful one is better.\n"
    "Question: {question}\n"
    "Response 1: {first}\n"
    "Response 2: {second}\n"
    "Which response is better? Reply with one line: \"Better: 1\" or \"Better: 2\" (or \"Better: tie\")."
)

_VERDICT_PATTERNS = [  # the first that matches decides; case-insensitive
    re.compile(r"better\s*(?:response|answer)?\s*[:=\-]?\s*(?:is\s+)?(?:response\s*|answer\s*)?#?\s*([12]|tie)\b"),
    re.compile(r"\b(?:response|answer)\s*#?\s*([12])\s+is\s+(?:better|preferred|more)"),
    re.compile(r"\b(?:prefer|choose|pick)\s+(?:response|answer)?\s*#?\s*([12])\b"),
    re.compile(r"^\W*([12])\W*$"),  # a bare "1" / "2." / "(2)"
    re.compile(r"\b(tie|equally good|both are equally)\b"),
    re.compile(r"\b(first|second)\s+(?:response|answer|one)\s+is\s+better"),
]


def parse_verdict(text: str) -> int | str | None:
    """A judge's reply -> 0 (Response 1 better), 1 (Response 2 better), "tie", or None (unparseable).
    Accepts "Better: 2", "Response 1 is better", "I prefer answer 2", a bare "1", "tie"; anything naming both or
    neither in a recognised form is None. Case-insensitive."""
    t = (text or "").strip().lower()
    if not t:
        return None
    for pat in _VERDICT_PATTERNS:
        m = pat.search(t)
        if m:
            v = m.group(1)
            if v in ("1", "first"):
                return 0
            if v in ("2", "second"):
                return 1
            return "tie"
    return None


class Annotator:
    """verdicts = annotator(examples, images, first, second): lists of P examples (nanoalign.data.Example), PIL images
    or None, response texts -> P verdicts (0 / 1 / None = dropped). `stats` (Counter) accumulates, since the last
    `take_stats()`: dropped_<reason>, pairs, first_wins / parsed (position bias of the VLM judge)."""

    def __init__(self, spec: str, score=None, judge=None, both_orders: bool = False):
        self.spec, self.score, self.judge, self.both_orders = spec, score, judge, both_orders
        self.stats = Counter()

    def take_stats(self) -> Counter:
        s, self.stats = self.stats, Counter()
        return s

    def __call__(self, examples, images, first: list[str], second: list[str]) -> list[int | None]:
        P = len(examples)
        out: list[int | None] = [None] * P
        todo = []
        for i in range(P):
            if first[i].strip() == second[i].strip():
                self.stats["dropped_identical"] += 1
            else:
                todo.append(i)
        self.stats["pairs"] += P
        if not todo:
            return out
        ex = [examples[i] for i in todo]
        im = [images[i] for i in todo]
        a, b = [first[i] for i in todo], [second[i] for i in todo]
        if self.score is not None:  # oracle / reward model: the higher score wins
            sa, sb = self.score(ex + ex, im + im, a + b).split(len(todo))
            verdicts = [0 if x > y else 1 if y > x else "tie" for x, y in zip(sa.tolist(), sb.tolist())]
        else:
            verdicts = self._judge(ex, im, a, b)
            if self.both_orders:
                swapped = self._judge(ex, im, b, a)
                verdicts = [_consistent(v, w) for v, w in zip(verdicts, swapped)]
        for i, v in zip(todo, verdicts):
            if v in (0, 1):
                out[i] = v
            else:
                self.stats["dropped_" + ("unparseable" if v is None else v)] += 1
        return out

    def _judge(self, examples, images, first, second):
        texts = self.judge(examples, images, first, second)
        verdicts = [parse_verdict(t) for t in texts]
        parsed = [v for v in verdicts if v in (0, 1)]
        self.stats["parsed"] += len(parsed)
        self.stats["first_wins"] += sum(1 for v in parsed if v == 0)
        return verdicts


def _consistent(v, w):
    """Verdict v on (a, b) and w on (b, a) -> v when they agree (w names the same response), else a drop reason."""
    if v is None or w is None:
        return None
    if v == "tie" or w == "tie":
        return "tie"
    return v if w == 1 - v else "inconsistent"


def vlm_judge(model, processor, template: str = "vicuna_v1", max_new_tokens: int = 16):
    """judge(examples, images, first, second) -> reply texts of `model` (greedy, eval mode) to JUDGE_PROMPT."""
    from nanoalign.batch import encode_prompt
    from nanoalign.engine import sample
    from nanoalign.tokenizer import IMAGE_TOKEN

    def judge(examples, images, first, second):
        rows, present = [], []
        for ex, im, a, b in zip(examples, images, first, second):
            q = ex.prompt.replace(IMAGE_TOKEN, "").strip()
            text = JUDGE_PROMPT.format(question=q, first=a.strip(), second=b.strip())
            size = None if im is None else (im.height, im.width)
            rows.append(encode_prompt(processor, (IMAGE_TOKEN + "\n" if im is not None else "") + text, size,
                                      template))
            if im is not None:
                present.append(im)
        batch = left_padded(rows, processor.pad_id)
        if present:
            batch.update(processor.image_processor.process(present))
        r = sample(model, batch, 1, temperature=0.0, max_new_tokens=max_new_tokens, end_ids=processor.end_ids,
                   pad_id=processor.pad_id)
        return [processor.tokenizer.decode(ids) for ids in r.ids]
    return judge


def left_padded(rows: list[list[int]], pad_id: int) -> dict:
    """Token id lists -> {"input_ids", "attention_mask"} (B,T) long, left padded (the engine's prompt layout)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    am = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        am[i, T - len(r):] = 1
    return {"input_ids": ids, "attention_mask": am}


def load_annotator(spec: str, policy_tokenizer=None, device="cpu", both_orders: bool = False,
                   template: str = "vicuna_v1") -> Annotator:
    """`--annotator` spec -> Annotator. Raises ValueError with one line naming the spec when it cannot be loaded, or
    `no such file or folder: P (--annotator)` when the spec's path (rm:P, vlm:P, oracle:P) does not exist."""
    from nanoalign.cli import missing_path, spec_path
    if not isinstance(spec, str) or not spec:
        raise ValueError("--annotator: empty spec (expected oracle[:SCENES], rm:PATH or vlm:PATH)")
    bad = missing_path([("--annotator", spec_path(spec, "--annotator"))])
    if bad:
        raise ValueError(bad)
    if spec == "oracle" or spec.startswith("oracle:") or spec.startswith("rm:"):
        from nanoalign.reward import load_reward
        try:
            return Annotator(spec, score=load_reward(spec, policy_tokenizer, device, option="--annotator"),
                             both_orders=both_orders)
        except ValueError as e:
            raise ValueError(f"--annotator {spec}: {e}") from None
    if spec.startswith("vlm:"):
        from nanoalign.checkpoint import load_pretrained
        path = spec[4:]
        try:
            model, processor = load_pretrained(path, dtype=torch.float32)
        except (FileNotFoundError, ValueError, KeyError, OSError) as e:
            raise ValueError(f"--annotator {spec}: cannot load the judge: {(str(e).splitlines() or [''])[0]}") \
                from None
        if processor is None:
            raise ValueError(f"--annotator {spec}: no tokenizer.json in {path}")
        model.to(device).requires_grad_(False).eval()
        return Annotator(spec, judge=vlm_judge(model, processor, template), both_orders=both_orders)
    raise ValueError(f"--annotator {spec!r}: expected oracle[:SCENES.jsonl], rm:PATH or vlm:PATH")
