"""The toy's oracle: read a response with the world's closed vocabulary and check every fact against the scene.

`parse` finds the mentions of the world's objects and what each states; `oracle_score` scores a caption or a short
answer (a reward and an annotator); `find_hallucinated_spans` / `correct_caption` / `correction_pref` give RLHF-V-style
fine-grained corrections; `corrupt_answer` makes POVID-style one-fact swaps; `rank_responses` / `best_worst_pair` /
`ranked_pairs` rank a pool of responses VLFeedback-style. Imports only the world (no PIL, no tokenizer), so a reward
can use it anywhere: `from nanoalign.toy.oracle import oracle_score`. Why the corrections look as they do:
docs/toy_world.md.
"""
import itertools
import re

from nanoalign.toy.world import (CAPTION_PROMPT, CELL_NAMES, COLORS, KIND_OF, KINDS, NUMBERS, PAIRED, PLURALS, SIZES,
                                 _cell_phrase, answer_question, groups, kind_sentence)


COUNT_OF = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBERS)}}
POS_WORDS = {"top", "bottom", "left", "right", "center", "middle"}
_CELL_OF = {tuple(n.split()): i for i, n in enumerate(CELL_NAMES)}
_CELL_OF[("middle",)] = 4



def parse(text):
    """Mentions of the world's objects in text, with the facts stated about each (the oracle's reader).

    A mention is a kind word (singular or plural) or "object(s)" (kind "__total__"). Count, size and color words are
    read from the run of such words right before the noun; positions from the runs of position words after it, up to
    the next mention. Returns a list of dicts with char spans: sent, noun, count/size/color (word, start, end) or None,
    positions [(cell, start, end)] where the span includes a leading "at/on/in the".
    """
    out = []
    for sm in re.finditer(r"[^.!?\s][^.!?\n]*[.!?]?", text):
        words = [(m.group(0).lower(), m.start() + sm.start(), m.end() + sm.start()) for m in re.finditer(r"[A-Za-z]+", sm.group(0))]
        idx = [i for i, w in enumerate(words) if w[0] in KIND_OF or w[0] in ("object", "objects")]
        for j, i in enumerate(idx):
            lo = idx[j - 1] + 1 if j else 0
            m = {"kind": KIND_OF.get(words[i][0], "__total__"), "noun": words[i][1:], "plural": words[i][0] not in KINDS and words[i][0] != "object",
                 "sent": (sm.start(), sm.start() + len(sm.group(0).rstrip())), "count": None, "size": None, "color": None, "positions": []}
            b = i - 1
            while b >= lo and (words[b][0] in COUNT_OF or words[b][0] in SIZES or words[b][0] in COLORS):
                key = "count" if words[b][0] in COUNT_OF else "size" if words[b][0] in SIZES else "color"
                m[key] = m[key] or words[b]
                b -= 1
            m["np_start"] = words[b + 1][1]
            m["between"] = text[m["count"][2]:words[i][1]] if m["count"] else None
            m["count_upper"] = bool(m["count"]) and text[m["count"][1]].isupper()
            hi = idx[j + 1] if j + 1 < len(idx) else len(words)
            a = i + 1
            while a < hi:
                if words[a][0] in POS_WORDS:
                    e = a
                    while e + 1 < hi and words[e + 1][0] in POS_WORDS:
                        e += 1
                    cell = _CELL_OF.get(tuple(w[0] for w in words[a:e + 1]))
                    s0 = words[a][1]
                    if a >= 2 and words[a - 1][0] == "the" and words[a - 2][0] in ("at", "on", "in"):
                        s0 = words[a - 2][1]
                    m["positions"].append((cell, s0, words[e][2]))
                    a = e
                a += 1
            m["verb"] = next((w for w in words[lo:hi] if w[0] in ("is", "are")), None)
            out.append(m)
    return out


def _errors(m, scene, gs):
    """Wrong facts of one mention of an existing kind: list of (kind_of_error, start, end, correction), sorted by
    start. A count whose number changes has its correction over count..noun, which holds its color / size words:
    _word_fixes merges those. A wrong position gets a true cell not stated yet, or correction None when the mention
    states more cells than its kind has."""
    errs = []
    if m["kind"] == "__total__":
        n = len(scene["objects"])
        if m["count"] and COUNT_OF[m["count"][0]] != n:
            if (COUNT_OF[m["count"][0]] == 1) == (n == 1):  # same grammatical number: fix the count word only
                errs.append(("count", m["count"][1], m["count"][2], NUMBERS[n]))
            else:
                errs.append(("count", m["count"][1], m["noun"][1], f"{NUMBERS[n]}{m['between']}object{'' if n == 1 else 's'}"))
            if m["verb"] and m["verb"][0] != ("is" if n == 1 else "are"):
                errs.append(("grammar", m["verb"][1], m["verb"][2], "is" if n == 1 else "are"))
        return errs
    g = gs[m["kind"]]
    for key in ("color", "size"):
        if m[key] and m[key][0] != g[key]:
            errs.append((key, m[key][1], m[key][2], g[key]))
    if m["count"] and COUNT_OF[m["count"][0]] != g["count"]:
        n = g["count"]
        noun = m["kind"] if n == 1 else PLURALS[m["kind"]]
        if (COUNT_OF[m["count"][0]] == 1) == (n == 1):
            fix = m["count"][0] if n == 1 else NUMBERS[n]
            errs.append(("count", m["count"][1], m["count"][2], fix))
        else:
            fix = ("a" if n == 1 else NUMBERS[n]) + m["between"] + noun
            errs.append(("count", m["count"][1], m["noun"][1], fix))
        if m["count_upper"]:
            errs[-1] = errs[-1][:3] + (fix[0].upper() + fix[1:],)
        if m["verb"] and m["verb"][0] != ("is" if n == 1 else "are"):
            errs.append(("grammar", m["verb"][1], m["verb"][2], "is" if n == 1 else "are"))
    free = [c for c in g["cells"] if c not in {c for c, _, _ in m["positions"]}]
    for cell, s, e in m["positions"]:
        if cell not in g["cells"]:
            errs.append(("position", s, e, _cell_phrase(free.pop(0)) if free else None))
    return sorted(errs, key=lambda x: x[1])


def _word_fixes(m, errs):
    """errs (_errors of mention m) as non-overlapping (start, end, fix) spans: the color / size corrections inside a
    count..noun rewrite are made within it. None when a correction is missing (the sentence must be rewritten)."""
    if any(fix is None for *_, fix in errs):
        return None
    wide = [x for x in errs if x[0] == "count" and x[2] > m["count"][2]]
    if not wide:
        return [(s, e, fix) for _, s, e, fix in errs]
    _, c0, c1, fix = wide[0]
    inside = [x for x in errs if x[0] in ("color", "size") and c0 <= x[1] and x[2] <= c1]
    head = fix[:fix.index(m["between"])]  # fix = count word + between + noun
    between = m["between"]
    for _, s, e, word in sorted(inside, key=lambda x: -x[1]):  # right to left: offsets stay valid
        o = s - m["count"][2]
        between = between[:o] + word + between[o + e - s:]
    fix = head + between + fix[len(head) + len(m["between"]):]
    return [(s, e, fix if k == "count" else word) for k, s, e, word in errs if (k, s, e, word) not in inside]


def oracle_score(response, scene, question=None, weights=(0.5, 0.2, 0.3)):
    """Check every fact a response states against the scene; usable as an annotator and as a reward.

    Captions: object precision P = existing mentioned kinds / mentioned kinds (1 if none), attribute precision
    A = correct / stated (color, size, count, position facts of existing kinds; 1 if none), recall R = mentioned /
    present kinds. score = w_P*P + w_A*A + w_R*R with weights (0.5, 0.2, 0.3), in [0, 1].
    With a `question` of one of the world's forms (answer_question), score = 1.0 if the answer is right else 0.0.
    """
    if not isinstance(response, str):
        raise ValueError(f"oracle_score: response must be a str, got {type(response).__name__}")
    if question is not None:
        truth = answer_question(question, scene)
        if truth is not None:
            ok = _short_answer_ok(response, truth)
            return {"score": float(ok), "correct": ok, "truth": truth}
    gs = groups(scene)
    ms = parse(response)
    kinds = [m["kind"] for m in ms if m["kind"] != "__total__"]
    mentioned = sorted({k for k in kinds if k in gs}, key=KINDS.index)
    halluc = sorted({k for k in kinds if k not in gs}, key=KINDS.index)
    errs, n_attr = [], 0
    for m in ms:
        if m["kind"] in gs or m["kind"] == "__total__":
            n_attr += sum(m[k] is not None for k in ("color", "size", "count")) + len(m["positions"])
            errs += [e for e in _errors(m, scene, gs) if e[0] != "grammar"]
    by = {k: sum(e[0] == k for e in errs) for k in ("color", "size", "count", "position")}
    P = len(mentioned) / max(1, len(mentioned) + len(halluc)) if kinds else 1.0
    A = 1.0 - len(errs) / n_attr if n_attr else 1.0
    R = len(mentioned) / max(1, len(gs))
    score = weights[0] * P + weights[1] * A + weights[2] * R
    return {"score": score, "mentioned": mentioned, "hallucinated": halluc, "missed": [k for k in gs if k not in mentioned],
            "object_precision": P, "attribute_precision": A, "recall": R, "attribute_errors": by["color"] + by["size"] + by["position"],
            "count_errors": by["count"], **{k + "_errors": v for k, v in by.items() if k != "count"}, "facts_stated": len(kinds) + n_attr}


def _short_answer_ok(response, truth):
    r, t = response.lower(), truth.lower().rstrip(".")
    if t in ("yes", "no"):
        m = re.search(r"\b(yes|no)\b", r)
        return bool(m) and m.group(1) == t
    if t in COLORS or t in SIZES or t in NUMBERS:
        vocab = COLORS if t in COLORS else SIZES if t in SIZES else NUMBERS
        found = [w for w in re.findall(r"[a-z]+", r) if w in vocab]
        return found[:1] == [t]
    cells = {c for m in parse("the thing " + r) for c, _, _ in m["positions"]}
    want = {c for m in parse("the thing " + t) for c, _, _ in m["positions"]}
    return bool(cells) and cells == want


def find_hallucinated_spans(caption_text, scene):
    """RLHF-V-style fine-grained corrections: sorted, non-overlapping [(start, end, correction)] over caption_text.

    Wrong color/size words and wrong positions are corrected word by word; a wrong count rewrites the count word, or
    count..noun (its color / size words corrected within) when the number changes, and the verb's number. A sentence
    mentioning an absent kind, or stating more positions than its kind has cells, is replaced as a whole: by the
    canonical sentences of the real kinds it mentions, else by the canonical sentence of a present kind the caption
    never mentions, else deleted (with its following space).
    """
    gs = groups(scene)
    ms = parse(caption_text)
    spans, bad_sents, mentioned = [], {}, {m["kind"] for m in ms}
    unmentioned = [k for k in gs if k not in mentioned]
    for m in ms:
        bad_sents.setdefault(m["sent"], []).append(m)
    for sent, mm in sorted(bad_sents.items()):
        if all(m["kind"] in gs or m["kind"] == "__total__" for m in mm):
            fixes = [_word_fixes(m, _errors(m, scene, gs)) for m in mm]
            if all(f is not None for f in fixes):
                spans += [x for f in fixes for x in f]
                continue
        real = [m["kind"] for m in mm if m["kind"] in gs]
        if real:
            fix = " ".join(kind_sentence(k, gs[k]) for k in dict.fromkeys(real))
        elif unmentioned:
            k = unmentioned.pop(0)
            fix = kind_sentence(k, gs[k])
        else:
            s, e = sent
            while e < len(caption_text) and caption_text[e] == " ":
                e += 1
            spans.append((s, e, ""))
            continue
        spans.append((sent[0], sent[1], fix))
    spans = sorted(set(spans))
    # deleted sentences that touch are one deletion; one that ends the caption takes the spaces before it instead
    merged = []
    for s, e, fix in spans:
        if merged and fix == "" == merged[-1][2] and s <= merged[-1][1]:
            s = merged.pop()[0]
        merged.append((s, e, fix))
    if merged and merged[-1][2] == "" and merged[-1][1] == len(caption_text):
        s = merged[-1][0]
        while s > 0 and caption_text[s - 1] == " " and (len(merged) < 2 or s - 1 >= merged[-2][1]):
            s -= 1
        merged[-1] = (s, len(caption_text), "")
    return merged


def correct_caption(caption_text, scene):
    """Apply find_hallucinated_spans -> (corrected, spans) with spans [(start, end, new_start, new_end)]: the char
    span in the original caption and the span of its replacement in the corrected one (new_start == new_end for a
    deletion)."""
    out, spans, pos, shift = [], [], 0, 0
    for s, e, fix in find_hallucinated_spans(caption_text, scene):
        out += [caption_text[pos:s], fix]
        spans.append((s, e, s + shift, s + shift + len(fix)))
        shift += len(fix) - (e - s)
        pos = e
    out.append(caption_text[pos:])
    return "".join(out), spans


def correction_pref(caption_text, scene, image, prompt=CAPTION_PROMPT):
    """RLHF-V-style prefs row from a model caption (rejected) and its correction (chosen), or None if it is right."""
    corrected, spans = correct_caption(caption_text, scene)
    if not spans or corrected.strip() == caption_text.strip():
        return None
    return {"image": image, "prompt": "<image>\n" + prompt, "chosen": corrected, "rejected": caption_text,
            "chosen_segments": [[a, b] for _, _, a, b in spans], "rejected_segments": [[s, e] for s, e, _, _ in spans]}


def corrupt_answer(answer, scene, rng, p_object=0.6):
    """POVID-style corrupted answer: exactly one fact changed -> (corrupted, (start, end)) span in the corrupted text.

    With probability p_object (when possible) an existing object's noun is swapped for an absent kind, preferring its
    co-occurring partner/companion; otherwise one of its color, size, count (plural counts only) or position
    facts, or a yes/no or one-word short answer, is swapped for another value. Returns (answer, None) if nothing
    can be changed.
    """
    gs = groups(scene)
    ms = [m for m in parse(answer) if m["kind"] in gs and not _errors(m, scene, gs)]
    absent = [k for k in KINDS if k not in gs]
    obj, attr = [], []
    for m in ms:
        pool = [PAIRED[m["kind"]]] if PAIRED.get(m["kind"]) in absent else absent
        if pool:
            obj.append((m["noun"], str(rng.choice(pool)), m["plural"]))
        for key, vocab in (("color", COLORS), ("size", SIZES)):
            if m[key]:
                attr.append(((m[key][1], m[key][2]), str(rng.choice([w for w in vocab if w != m[key][0]]))))
        if m["count"] and COUNT_OF[m["count"][0]] >= 2:
            attr.append(((m["count"][1], m["count"][2]), NUMBERS[int(rng.choice([c for c in (2, 3, 4) if c != COUNT_OF[m["count"][0]]]))]))
        if len(m["positions"]) == 1:
            cell, s, e = m["positions"][0]
            attr.append(((s, e), _cell_phrase(int(rng.choice([c for c in range(9) if c not in gs[m["kind"]]["cells"]])))))
    if not ms:  # short answers: yes/no, one color/size/count word
        for w in re.finditer(r"[A-Za-z]+", answer):
            lw = w.group(0).lower()
            for vocab in ({"yes": "no", "no": "yes"}, COLORS, SIZES, NUMBERS[1:7]):
                if lw in vocab:
                    new = vocab[lw] if isinstance(vocab, dict) and lw in ("yes", "no") else str(rng.choice([v for v in vocab if v != lw]))
                    new = new.capitalize() if w.group(0)[0].isupper() else new
                    return answer[:w.start()] + new + answer[w.end():], (w.start(), w.start() + len(new))
            if attr or obj:
                break
    if obj and (not attr or rng.random() < p_object):
        (s, e), kind, plural = obj[int(rng.integers(0, len(obj)))]
        new = PLURALS[kind] if plural else kind
    elif attr:
        (s, e), new = attr[int(rng.integers(0, len(attr)))]
    else:
        return answer, None
    return answer[:s] + new + answer[e:], (s, s + len(new))


def rank_responses(responses, scene, question=None):
    """[(score, response)] best first (stable for ties), scored by oracle_score."""
    scored = [(oracle_score(r, scene, question)["score"], i, r) for i, r in enumerate(responses)]
    return [(s, r) for s, i, r in sorted(scored, key=lambda t: (-t[0], t[1]))]


def ranked_pairs(responses, scene, question=None, min_gap=1e-6):
    """VLFeedback-style pairs: every pair of responses whose oracle scores differ by more than min_gap (ties
    skipped) -> [(chosen, rejected, chosen_score, rejected_score)]."""
    ranked = rank_responses(responses, scene, question)
    return [(a, b, sa, sb) for (sa, a), (sb, b) in itertools.combinations(ranked, 2) if sa - sb > min_gap and a != b]


def best_worst_pair(responses, scene, question=None, min_gap=1e-6):
    """One VLFeedback-style pair per prompt: (best, worst) of the responses by oracle_score, or None when their
    scores differ by min_gap or less."""
    ranked = rank_responses(responses, scene, question)
    (sa, a), (sb, b) = ranked[0], ranked[-1]
    return (a, b) if sa - sb > min_gap and a != b else None
