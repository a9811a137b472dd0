"""The toy visual world: scenes, their drawing and their text (no PIL, no tokenizer: the oracle imports this).

Each 48x48 RGB image shows 1-6 kinds of simple icons on a 3x3 grid of 16-pixel cells (at most one object per cell,
so positions have names: "top left", "center", "bottom", ...). Every kind has one color and one size in a scene and
a count of 1-3 instances. Scenes are plain dicts: {"width", "height", "objects": [{"kind", "color", "size", "cell",
"origin", "bbox"}]} with bbox = [x0, y0, x1, y1) tight around the drawn pixels.

Language bias, on purpose (the world's "fork and knife"): six partner -> companion pairs (COMPANION); a scene draws
1-3 primary kinds uniformly from all 16 and each primary partner brings its companion with probability P_COMPANION;
captions name kinds in the canonical order KINDS, where each companion directly follows its partner. A model that
attends weakly to the image "sees" the companion where it is absent; CHAIR counts it and POPE's adversarial split
asks about exactly these. Why the world is built this way: docs/toy_world.md; `python -m nanoalign.toy.files --stats`
prints its co-occurrence statistics.
"""
import itertools
import re

import numpy as np

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
KIND_OF = {**{k: k for k in KINDS}, **{p: k for k, p in PLURALS.items()}}  # kind or plural word -> kind


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


def make_scenes(n, seed, split):
    """n scenes of a split; scene i is drawn from default_rng([seed, split_id, i]), so it does not depend on n."""
    sid = {"train": 0, "eval": 1}[split]
    return [sample_scene(np.random.default_rng([seed, sid, i])) for i in range(n)]


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


# ---------------------------------------------------------------------------------------------------- co-occurrence
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


def world_stats(n=20000, seed=0):
    """Co-occurrence statistics of n training scenes: how strong the language bias of COMPANION is in the data."""
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
