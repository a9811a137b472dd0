"""The toy visual world: procedurally drawn scenes, their text, a tokenizer, tiny model configs and an oracle.

A tiny-Shakespeare for multimodal alignment (issue 6). Each 48x48 RGB image shows 1-6 kinds of simple icons on a 3x3
grid of 16-pixel cells (at most one object per cell, so positions have names: "top left", "center", "bottom", ...).
Every kind has one color and one size in a scene and a count of 1-3 instances.

Language bias, on purpose (the world's "fork and knife"). Six partner -> companion pairs (COMPANION below). A scene
draws 1-3 primary kinds uniformly from all 16; each primary partner brings its companion with probability
P_COMPANION = 0.8. Captions describe kinds in the canonical order KINDS, where each companion directly follows its
partner, so "fork" is usually followed by "knife" in the text. Measured on 20,000 scenes of seed 0
(`python -m nanoalign.toyworld --stats`):
    P(companion present | partner present) = 0.81  (the 0.8 draw plus the companion drawn as a primary itself)
    P(companion present | partner absent)  = 0.12
    P(unpaired kind present)               = 0.12
    3.4 objects and 2.4 kinds per scene on average; 19% of (scene, present partner) cases miss the companion.
A model that attends weakly to the image "sees" the companion in those 20% of scenes: CHAIR counts it, and POPE's
adversarial split asks about exactly these absent companions.

Text: detailed captions (total count, then one sentence per kind: count, size, color, position), short QA
(color, count, size, position) and yes/no existence questions. Oracle: `oracle_score` parses a response with the
world's closed vocabulary and checks every stated fact against the scene; `find_hallucinated_spans` /
`correct_caption` give RLHF-V-style fine-grained corrections; `corrupt_answer` makes POVID-style one-fact swaps.
Scenes are plain dicts: {"width", "height", "objects": [{"kind", "color", "size", "cell", "origin", "bbox"}]} with
bbox = [x0, y0, x1, y1) tight around the drawn pixels.
"""
import hashlib
import itertools
import json
import os
import re
import string

import numpy as np
from PIL import Image

VERSION = 2  # 2: sft_ground.json (the SFT mix plus existence questions: the base's second SFT stage)
IMAGE_SIZE, GRID, CELL = 48, 3, 16
BACKGROUND = (24, 24, 24)
COMPANION = {"fork": "knife", "cup": "plate", "bat": "ball", "sock": "shoe", "key": "lock", "pen": "book"}
PAIRED = {**COMPANION, **{c: p for p, c in COMPANION.items()}}
KINDS = ["fork", "knife", "cup", "plate", "bat", "ball", "sock", "shoe", "key", "lock", "pen", "book",
         "tree", "kite", "star", "clock"]  # canonical caption order: each companion right after its partner
PLURALS = {k: ("knives" if k == "knife" else k + "s") for k in KINDS}
SHAPES = {"fork": "plus", "knife": "vbar", "cup": "square", "plate": "ring", "bat": "diag", "ball": "disc",
          "sock": "ell", "shoe": "halfdisc", "key": "x", "lock": "hollowsquare", "pen": "hbar", "book": "tridown",
          "tree": "triup", "kite": "diamond", "star": "star", "clock": "hollowdiamond"}
COLORS = {"red": (220, 50, 50), "green": (60, 190, 70), "blue": (60, 100, 240), "yellow": (235, 215, 50),
          "purple": (160, 70, 210), "white": (240, 240, 240)}
SIZES = {"small": 9, "large": 15}
CELL_NAMES = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
P_COMPANION = 0.8
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_PROMPT = "Describe the image in detail."
CAPTION_PROMPTS = [CAPTION_PROMPT, "Describe this image.", "What is in the image? Give a detailed description."]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4 in this order
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


# ---------------------------------------------------------------------------------------------------- drawing
def shape_mask(shape, s):
    """(s, s) bool mask of an icon drawn in an s x s box; u, v in [-1, 1] are pixel centres (v grows downwards)."""
    c = (np.arange(s) + 0.5) / s * 2 - 1
    v, u = np.meshgrid(c, c, indexing="ij")  # (s, s) each
    r, a, d = np.hypot(u, v), np.abs(u), np.abs(u) + np.abs(v)
    masks = {
        "square": np.ones((s, s), bool), "disc": r <= 1.0, "ring": (r >= 0.5) & (r <= 1.0),
        "plus": (a <= 0.3) | (np.abs(v) <= 0.3), "vbar": a <= 0.3, "hbar": np.abs(v) <= 0.3,
        "diag": np.abs(u + v) <= 0.45, "x": (np.abs(u - v) <= 0.4) | (np.abs(u + v) <= 0.4),
        "ell": (u <= -0.3) | (v >= 0.3), "halfdisc": (r <= 1.0) & (v >= 0), "hollowsquare": (a >= 0.5) | (np.abs(v) >= 0.5),
        "triup": v >= 2 * a - 1, "tridown": v <= 1 - 2 * a, "diamond": d <= 1.0, "hollowdiamond": (d >= 0.5) & (d <= 1.0),
        "star": r <= 0.45 + 0.55 * np.abs(((np.arctan2(u, -v) * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2,
    }
    return masks[shape]


def render(scene):
    """Scene dict -> (H, W, 3) uint8 image. Binary masks, no anti-aliasing: every pixel is a palette color."""
    img = np.empty((scene["height"], scene["width"], 3), np.uint8)
    img[:] = BACKGROUND
    for o in scene["objects"]:
        s = SIZES[o["size"]]
        x, y = o["origin"]
        img[y:y + s, x:x + s][shape_mask(SHAPES[o["kind"]], s)] = COLORS[o["color"]]
    return img


def sample_scene(rng):
    """Draw one scene with a numpy Generator (the co-occurrence process of the module docstring)."""
    kinds = set(rng.choice(KINDS, size=int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2])), replace=False).tolist())
    for k in sorted(kinds, key=KINDS.index):
        if k in COMPANION and rng.random() < P_COMPANION:
            kinds.add(COMPANION[k])
    kinds = sorted(kinds, key=KINDS.index)
    counts = [int(rng.choice([1, 2, 3], p=[0.65, 0.25, 0.1])) for _ in kinds]
    while sum(counts) > GRID * GRID:
        counts[int(np.argmax(counts))] -= 1
    cells = rng.permutation(GRID * GRID).tolist()
    objects = []
    for k, n in zip(kinds, counts):
        color, size = str(rng.choice(list(COLORS))), str(rng.choice(list(SIZES)))
        s = SIZES[size]
        mine, cells = sorted(cells[:n]), cells[n:]
        for cell in mine:
            x = cell % GRID * CELL + int(rng.integers(0, CELL - s + 1))
            y = cell // GRID * CELL + int(rng.integers(0, CELL - s + 1))
            ys, xs = np.nonzero(shape_mask(SHAPES[k], s))
            bbox = [x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1]
            objects.append({"kind": k, "color": color, "size": size, "cell": int(cell), "origin": [x, y], "bbox": bbox})
    return {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "objects": objects}


def groups(scene):
    """kind -> {color, size, count, cells} in canonical order."""
    out = {}
    for o in sorted(scene["objects"], key=lambda o: (KINDS.index(o["kind"]), o["cell"])):
        g = out.setdefault(o["kind"], {"color": o["color"], "size": o["size"], "count": 0, "cells": []})
        g["count"] += 1
        g["cells"].append(o["cell"])
    return out


# ---------------------------------------------------------------------------------------------------- text
def _cell_phrase(cell):
    name = CELL_NAMES[cell]
    return {"left": "on the left", "right": "on the right", "center": "in the center"}.get(name, "at the " + name)


def position_phrase(cells):
    ps = [_cell_phrase(c) for c in cells]
    return ps[0] if len(ps) == 1 else ", ".join(ps[:-1]) + " and " + ps[-1]


def noun_phrase(kind, g):
    det = "a" if g["count"] == 1 else NUMBERS[g["count"]]  # no kind, size or color starts with a vowel
    return f"{det} {g['size']} {g['color']} {kind if g['count'] == 1 else PLURALS[kind]}"


def kind_sentence(kind, g, template=0):
    """One caption sentence for a kind; template 0 is the canonical form used for corrections."""
    np_, be, pos = noun_phrase(kind, g), ("is" if g["count"] == 1 else "are"), position_phrase(g["cells"])
    if template == 1:
        return f"There {be} {np_} {pos}."
    if template == 2:
        return f"I can see {np_} {pos}."
    return f"{np_[0].upper()}{np_[1:]} {be} {pos}."


def total_sentence(n):
    return f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} object{'' if n == 1 else 's'} in the image."


def caption(scene, rng=None):
    """Detailed caption: total count, then one sentence per kind in canonical order (template drawn from rng)."""
    sents = [total_sentence(len(scene["objects"]))]
    for k, g in groups(scene).items():
        sents.append(kind_sentence(k, g, 0 if rng is None else int(rng.integers(0, 3))))
    return " ".join(sents)


def answer_question(question, scene):
    """Ground-truth short answer to one of the world's question forms, or None if the form is not recognised."""
    q, gs = question.lower(), groups(scene)
    m = re.search(r"is there an? (\w+) in the image", q)
    if m and m.group(1) in KIND_OF:
        return "Yes." if KIND_OF[m.group(1)] in gs else "No."
    m = re.search(r"what colou?r (?:is|are) the (\w+)|how many (\w+)|is the (\w+) small or large|where (?:is|are) the (\w+)", q)
    if not m:
        return None
    word = next(w for w in m.groups() if w)
    g = gs.get(KIND_OF.get(word, ""))
    if g is None:
        return "There is none." if m.group(2) is None else "Zero."
    if m.group(1):
        return g["color"].capitalize() + "."
    if m.group(2):
        return NUMBERS[g["count"]].capitalize() + "."
    if m.group(3):
        return g["size"].capitalize() + "."
    p = position_phrase(g["cells"])
    return p[0].upper() + p[1:] + "."


def exist_question(kind):
    """The world's yes/no existence question (SFT data, POPE rows, existence pairs and the yes/no probe ask it)."""
    return f"Is there a {kind} in the image?"


def qa_pairs(scene, rng, n=3, n_exist=1):
    """n (question, answer) pairs: n_exist yes/no existence questions (the first about a present or a random absent
    kind, 50/50, then alternating present / absent while absent kinds remain) + n - n_exist short QA."""
    gs = groups(scene)
    absent = [k for k in KINDS if k not in gs]
    qs, present = [], rng.random() < 0.5 or not absent
    for _ in range(min(n_exist, n)):
        k = str(rng.choice(list(gs))) if present or not absent else str(rng.choice(absent))
        qs.append(exist_question(k))
        present = not present
    for _ in range(n - len(qs)):
        k = str(rng.choice(list(gs)))
        one = gs[k]["count"] == 1
        qs.append([f"What color {'is the ' + k if one else 'are the ' + PLURALS[k]}?", f"How many {PLURALS[k]} are there?",
                   f"Is the {k} small or large?", f"Where {'is the ' + k if one else 'are the ' + PLURALS[k]}?"][int(rng.integers(0, 4))])
    return [(q, answer_question(q, scene)) for q in qs]


# ---------------------------------------------------------------------------------------------------- parsing
KIND_OF = {**{k: k for k in KINDS}, **{p: k for k, p in PLURALS.items()}}
COUNT_OF = {"a": 1, "an": 1, **{w: i for i, w in enumerate(NUMBERS)}}
POS_WORDS = {"top", "bottom", "left", "right", "center", "middle"}
_CELL_OF = {tuple(n.split()): i for i, n in enumerate(CELL_NAMES)}
_CELL_OF[("middle",)] = 4


def _parse(text):
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
    ms = _parse(response)
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
    cells = {c for m in _parse("the thing " + r) for c, _, _ in m["positions"]}
    want = {c for m in _parse("the thing " + t) for c, _, _ in m["positions"]}
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
    ms = _parse(caption_text)
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


def corrupt_answer(answer, scene, rng, p_object=0.6):
    """POVID-style corrupted answer: exactly one fact changed -> (corrupted, (start, end)) span in the corrupted text.

    With probability p_object (when possible) an existing object's noun is swapped for an absent kind, preferring its
    co-occurring partner/companion; otherwise one of its color, size, count (plural counts only) or position
    facts, or a yes/no or one-word short answer, is swapped for another value. Returns (answer, None) if nothing
    can be changed.
    """
    gs = groups(scene)
    ms = [m for m in _parse(answer) if m["kind"] in gs and not _errors(m, scene, gs)]
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


def write_prefs(path, rows):
    """Write the generic `prefs` JSONL: image, prompt, chosen, rejected, optional chosen_segments/rejected_segments
    as [[start, end], ...] character spans. Returns the number of rows."""
    need = ("image", "prompt", "chosen", "rejected")
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            miss = [k for k in need if not isinstance(r.get(k), str)]
            if miss:
                raise ValueError(f"write_prefs: row {i} lacks string field(s) {miss}")
            for k in ("chosen_segments", "rejected_segments"):
                for seg in r.get(k) or []:
                    text = r[k.split("_")[0]]
                    if not (len(seg) == 2 and 0 <= seg[0] <= seg[1] <= len(text)):
                        raise ValueError(f"write_prefs: row {i} {k} has span {seg} outside its text (len {len(text)})")
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n")
    return i + 1 if rows else 0


def correction_pref(caption_text, scene, image, prompt=CAPTION_PROMPT):
    """RLHF-V-style prefs row from a model caption (rejected) and its correction (chosen), or None if it is right."""
    corrected, spans = correct_caption(caption_text, scene)
    if not spans or corrected.strip() == caption_text.strip():
        return None
    return {"image": image, "prompt": "<image>\n" + prompt, "chosen": corrected, "rejected": caption_text,
            "chosen_segments": [[a, b] for _, _, a, b in spans], "rejected_segments": [[s, e] for s, e, _, _ in spans]}


# ---------------------------------------------------------------------------------------------------- evaluation files
def cooccurrence(scenes):
    """(freq: kind -> number of scenes holding it, cooc: (a, b) -> number of scenes holding both)."""
    freq, cooc = {k: 0 for k in KINDS}, {}
    for sc in scenes:
        ks = sorted(groups(sc), key=KINDS.index)
        for k in ks:
            freq[k] += 1
        for a, b in itertools.permutations(ks, 2):
            cooc[a, b] = cooc.get((a, b), 0) + 1
    return freq, cooc


def pope_negatives(scene, category, n, rng, freq, cooc):
    """n absent kinds for one POPE split. random: uniform; popular: most frequent in the training scenes;
    adversarial: the absent partner/companion of a present kind first, then the absent kinds co-occurring most
    with the present kinds (POPE's definition, with the world's pairs as the strongest co-occurrences)."""
    gs = groups(scene)
    absent = [k for k in KINDS if k not in gs]
    if category == "random":
        return [str(k) for k in rng.permutation(absent)[:n]]
    if category == "popular":
        return sorted(absent, key=lambda k: (-freq[k], KINDS.index(k)))[:n]
    if category == "adversarial":
        key = lambda k: (PAIRED.get(k) not in gs, -sum(cooc.get((p, k), 0) for p in gs), KINDS.index(k))
        return sorted(absent, key=key)[:n]
    raise ValueError(f"pope_negatives: category must be random|popular|adversarial, got {category!r}")


def pope_rows(scenes, images, rng, freq, cooc, n_per_image=3):
    """POPE-style JSONL rows {question_id, image, text, label, category, object}: per image and split, up to
    n_per_image present kinds (label yes) and as many absent ones (label no)."""
    rows = []
    for sc, img in zip(scenes, images):
        present = list(groups(sc))
        pos = [str(k) for k in rng.permutation(present)[:n_per_image]]
        for cat in ("random", "popular", "adversarial"):
            neg = pope_negatives(sc, cat, len(pos), rng, freq, cooc)
            for k, label in [(k, "yes") for k in pos] + [(k, "no") for k in neg]:
                rows.append({"question_id": len(rows), "image": img, "text": exist_question(k),
                             "label": label, "category": cat, "object": k})
    return rows


def coco_annotations(scenes, images):
    """COCO-style instances dict for CHAIR: images, annotations (image_id, category_id, bbox [x, y, w, h]), categories."""
    cats = [{"id": i + 1, "name": k, "supercategory": "object"} for i, k in enumerate(KINDS)]
    ims, anns = [], []
    for i, (sc, img) in enumerate(zip(scenes, images)):
        ims.append({"id": i, "file_name": img, "width": sc["width"], "height": sc["height"]})
        for o in sc["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": KINDS.index(o["kind"]) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    return {"images": ims, "annotations": anns, "categories": cats}


def synonyms():
    """The world's synonym table for CHAIR: kind -> [kind, plural]."""
    return {k: [k, PLURALS[k]] for k in KINDS}


# ---------------------------------------------------------------------------------------------------- tokenizer
def template_texts():
    """Prompt texts in the vicuna_v1 form, so the tokenizer learns merges for the template words."""
    return [f"{VICUNA_SYSTEM} USER: <image>\n{p} ASSISTANT:" for p in CAPTION_PROMPTS] + ["USER: ASSISTANT: </s>"]


def train_tokenizer(texts, out_path, vocab_size=512):
    """Byte-level BPE over the world's text (+ the template and all printable ASCII, so any ASCII text round-trips).
    Special tokens <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4; no post-processor (the Tokenizer adds <s>).
    Saves tokenizer.json at out_path and returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("train_tokenizer: texts must be a non-empty list of str")
    if vocab_size < 300:
        raise ValueError(f"train_tokenizer: vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + template_texts() * 50 + [string.printable], trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tok.save(str(out_path))
    return tok.get_vocab_size()


# ---------------------------------------------------------------------------------------------------- model configs
def toy_config(kind="llava", vocab_size=512):
    """llava-hf config.json dict of the toy VLM: CLIP 48px / patch 8 (36 patches), hidden 64, 2 layers; LLaMA hidden
    128, 4 layers, 4 heads, 2 KV heads. Default kind "llava" (1.5): 36 image tokens per 48x48 image; "llava_next"
    (AnyRes, pinpoints 48x96 / 96x48 / 96x96) gives 78 for the same image and sees nothing more in a square 48px
    world, so it is the slower option kept to exercise the 1.6 path. vision_feature_layer -1: with 2 layers, -2
    would waste half the tower. Pass vocab_size = the trained tokenizer's size."""
    if kind not in ("llava", "llava_next"):
        raise ValueError(f"toy_config: kind must be 'llava' or 'llava_next', got {kind!r}")
    text = {"model_type": "llama", "vocab_size": int(vocab_size), "hidden_size": 128, "intermediate_size": 352,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "max_position_embeddings": 512,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "tie_word_embeddings": False,
            "attention_bias": False, "mlp_bias": False}
    vision = {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": 8, "layer_norm_eps": 1e-5,
              "hidden_act": "quick_gelu", "num_channels": 3, "projection_dim": 64}
    cfg = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 4,
           "pad_token_id": 3, "projector_hidden_act": "gelu", "vision_feature_layer": -1,
           "vision_feature_select_strategy": "default", "multimodal_projector_bias": True,
           "tie_word_embeddings": False, "image_seq_length": (IMAGE_SIZE // 8) ** 2,
           "text_config": text, "vision_config": vision}
    if kind == "llava_next":
        cfg.update(architectures=["LlavaNextForConditionalGeneration"], model_type="llava_next",
                   image_grid_pinpoints=[[48, 96], [96, 48], [96, 96]])
    return cfg


def toy_preprocessor_config(kind="llava"):
    """preprocessor_config.json dict matching toy_config(kind) (CLIP mean/std, 48px)."""
    cfg = {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "do_resize": True,
           "size": {"shortest_edge": IMAGE_SIZE}, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    if kind == "llava_next":
        cfg.update(image_processor_type="LlavaNextImageProcessor", processor_class="LlavaNextProcessor", do_pad=True,
                   image_grid_pinpoints=toy_config("llava_next")["image_grid_pinpoints"])
    elif kind != "llava":
        raise ValueError(f"toy_preprocessor_config: kind must be 'llava' or 'llava_next', got {kind!r}")
    return cfg


# ---------------------------------------------------------------------------------------------------- the world on disk
def make_scenes(n, seed, split):
    """n scenes of a split; scene i is drawn from default_rng([seed, split_id, i]), so it does not depend on n."""
    sid = {"train": 0, "eval": 1}[split]
    return [sample_scene(np.random.default_rng([seed, sid, i])) for i in range(n)]


def world_texts(scenes, seed=0, qa_per_image=3, exist_per_image=1):
    """The SFT conversations' texts for the scenes (what the tokenizer is trained on)."""
    return [t for r in sft_records(scenes, [""] * len(scenes), seed, qa_per_image, exist_per_image)
            for c in r["conversations"] for t in [c["value"]]]


def _record(rid, img, q, a):
    """One single-turn LLaVA-Instruct record."""
    return {"id": rid, "image": img, "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                       {"from": "gpt", "value": a}]}


def sft_records(scenes, images, seed=0, qa_per_image=3, exist_per_image=1):
    """LLaVA-Instruct-style single-turn records: per image one detailed caption and qa_per_image short QA, of which
    exist_per_image are yes/no existence questions (qa_pairs)."""
    recs = []
    for i, (sc, img) in enumerate(zip(scenes, images)):
        rng = np.random.default_rng([seed, 2, i])
        conv = [(str(rng.choice(CAPTION_PROMPTS)), caption(sc, rng))] + qa_pairs(sc, rng, qa_per_image, exist_per_image)
        recs += [_record(f"{i:06d}_{j}", img, q, a) for j, (q, a) in enumerate(conv)]
    return recs


def ground_records(scenes, images, seed=0, per_image=4):
    """Extra existence questions for the base's grounding stage: per image `per_image` yes/no questions (qa_pairs:
    present and absent kinds alternate, so half the answers are "No."). Why the stage: README, "The toy world"."""
    recs = []
    for i, (sc, img) in enumerate(zip(scenes, images)):
        rng = np.random.default_rng([seed, 4, i])
        qas = qa_pairs(sc, rng, per_image, per_image)
        recs += [_record(f"{i:06d}_g{j}", img, q, a) for j, (q, a) in enumerate(qas)]
    return recs


def build_world(out_dir, n_train=2000, n_eval=200, seed=0, qa_per_image=3, vocab_size=512, exist_per_image=1):
    """Write the world to out_dir (cached by a manifest holding VERSION and a hash of the arguments) -> paths dict:
    images/ (PNG), scenes_train.jsonl / scenes_eval.jsonl, sft.json (LLaVA-Instruct), sft_ground.json (sft.json's
    records plus 4 existence questions per image, ground_records), pope.jsonl, chair_coco.json,
    chair_questions.jsonl, synonyms.json, tokenizer.json, config.json / preprocessor_config.json (default llava),
    manifest.json. Image paths in the files are relative to out_dir/images."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval), ("seed", seed), ("qa_per_image", qa_per_image),
                    ("exist_per_image", exist_per_image)):
        if not isinstance(v, (int, np.integer)) or v < (1 if name.startswith("n_") else 0):
            raise ValueError(f"build_world: {name} must be a {'positive' if name.startswith('n_') else 'non-negative'} int, got {v!r}")
    args = {"n_train": int(n_train), "n_eval": int(n_eval), "seed": int(seed), "qa_per_image": int(qa_per_image),
            "exist_per_image": int(exist_per_image),
            "vocab_size": int(vocab_size), "version": VERSION}
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    names = ["images", "scenes_train", "scenes_eval", "sft", "sft_ground", "pope", "chair_coco", "chair_questions",
             "synonyms", "tokenizer", "config", "preprocessor_config"]
    files = ["images", "scenes_train.jsonl", "scenes_eval.jsonl", "sft.json", "sft_ground.json", "pope.jsonl",
             "chair_coco.json", "chair_questions.jsonl", "synonyms.json", "tokenizer.json", "config.json",
             "preprocessor_config.json"]
    paths = {n: os.path.join(out_dir, f) for n, f in zip(names, files)}
    paths["manifest"] = man = os.path.join(out_dir, "manifest.json")
    if os.path.exists(man):
        try:
            old = json.load(open(man))
        except (OSError, ValueError):
            old = {}
        if old.get("key") == key and all(os.path.exists(p) for p in paths.values()):
            return paths
        os.remove(man)  # stale or partial: rebuild everything, manifest last
    os.makedirs(paths["images"], exist_ok=True)
    splits = {"train": make_scenes(n_train, seed, "train"), "eval": make_scenes(n_eval, seed, "eval")}
    imgs = {}
    for split, scenes in splits.items():
        imgs[split] = [f"{split}_{i:06d}.png" for i in range(len(scenes))]
        with open(paths["scenes_" + split], "w") as f:
            for sc, name in zip(scenes, imgs[split]):
                Image.fromarray(render(sc)).save(os.path.join(paths["images"], name))
                f.write(json.dumps({"image": name, **sc}) + "\n")
    recs = sft_records(splits["train"], imgs["train"], seed, qa_per_image, exist_per_image)
    _dump_json(paths["sft"], recs)
    _dump_json(paths["sft_ground"], recs + ground_records(splits["train"], imgs["train"], seed))
    freq, cooc = cooccurrence(splits["train"])
    rows = pope_rows(splits["eval"], imgs["eval"], np.random.default_rng([seed, 3]), freq, cooc)
    _dump_jsonl(paths["pope"], rows)
    _dump_json(paths["chair_coco"], coco_annotations(splits["eval"], imgs["eval"]))
    _dump_jsonl(paths["chair_questions"], [{"question_id": i, "image": im, "text": CAPTION_PROMPT, "image_id": i}
                                           for i, im in enumerate(imgs["eval"])])
    _dump_json(paths["synonyms"], synonyms())
    v = train_tokenizer([c["value"] for r in recs for c in r["conversations"]], paths["tokenizer"], vocab_size)
    _dump_json(paths["config"], toy_config("llava", v))
    _dump_json(paths["preprocessor_config"], toy_preprocessor_config("llava"))
    _dump_json(man, {"key": key, "args": args, "files": dict(zip(names, files)), "vocab_size": v})
    return paths


def load_scenes(path):
    """Scenes of scenes_*.jsonl as a dict image name -> scene."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_scenes: no scene file {path}")
    with open(path) as f:
        return {r["image"]: r for r in map(json.loads, f) if r}


def _dump_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _dump_jsonl(path, rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def world_stats(n=20000, seed=0):
    """The co-occurrence statistics quoted in the module docstring."""
    scenes = make_scenes(n, seed, "train")
    ks = [set(groups(s)) for s in scenes]
    with_p = [k for k in ks for p in COMPANION if p in k]
    pc = np.mean([COMPANION[p] in k for k in ks for p in COMPANION if p in k])
    pn = np.mean([COMPANION[p] in k for k in ks for p in COMPANION if p not in k])
    unp = [k for k in KINDS if k not in PAIRED]
    return {"p_companion_given_partner": float(pc), "p_companion_given_no_partner": float(pn),
            "p_unpaired_kind": float(np.mean([u in k for k in ks for u in unp])),
            "objects_per_scene": float(np.mean([len(s["objects"]) for s in scenes])),
            "kinds_per_scene": float(np.mean([len(k) for k in ks])), "partner_scenes": len(with_p)}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Build the toy world or print its statistics.")
    ap.add_argument("--out", default="toyworld")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", action="store_true", help="print the co-occurrence statistics of 20k scenes")
    a = ap.parse_args()
    print(json.dumps(world_stats(seed=a.seed) if a.stats else build_world(a.out, a.n_train, a.n_eval, a.seed), indent=1))
