"""The toy world on disk: its SFT, POPE and CHAIR files, its tokenizer and the tiny LLaVA configs.

`build_world(out_dir, ...)` writes everything a run needs (cached by a manifest); `load_scenes` reads a split back.

    python -m nanoalign.toy.files [--out DIR] [--n-train N] [--n-eval N] [--seed S]   # build a world
    python -m nanoalign.toy.files --stats                                             # its co-occurrence statistics

What the files hold and why (the SFT mix, the grounding stage's existence questions): docs/toy_world.md.
"""
import hashlib
import json
import os
import string

import numpy as np

from nanoalign.toy.world import (CAPTION_PROMPT, CAPTION_PROMPTS, IMAGE_SIZE, KINDS, PLURALS, caption, cooccurrence,
                                 exist_question, groups, make_scenes, pope_negatives, qa_pairs, render, world_stats)


VERSION = 2  # 2: sft_ground.json (the SFT mix plus existence questions: the base's second SFT stage)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4 in this order
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


# ---------------------------------------------------------------------------------------------------- SFT records
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
    present and absent kinds alternate, so half the answers are "No."). Why the stage: docs/toy_world.md."""
    recs = []
    for i, (sc, img) in enumerate(zip(scenes, images)):
        rng = np.random.default_rng([seed, 4, i])
        qas = qa_pairs(sc, rng, per_image, per_image)
        recs += [_record(f"{i:06d}_g{j}", img, q, a) for j, (q, a) in enumerate(qas)]
    return recs

# ---------------------------------------------------------------------------------------------------- evaluation files
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
def build_world(out_dir, n_train=2000, n_eval=200, seed=0, qa_per_image=3, vocab_size=512, exist_per_image=1):
    """Write the world to out_dir (cached by a manifest holding VERSION and a hash of the arguments) -> paths dict:
    images/ (PNG), scenes_train.jsonl / scenes_eval.jsonl, sft.json (LLaVA-Instruct), sft_ground.json (sft.json's
    records plus 4 existence questions per image, ground_records), pope.jsonl, chair_coco.json,
    chair_questions.jsonl, synonyms.json, tokenizer.json, config.json / preprocessor_config.json (default llava),
    manifest.json. Image paths in the files are relative to out_dir/images."""
    from PIL import Image
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


if __name__ == "__main__":
    from nanoalign.cli import Parser
    ap = Parser(prog="python -m nanoalign.toy.files", description="Build the toy world or print its statistics.")
    ap.add_argument("--out", default="toyworld")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", action="store_true", help="print the co-occurrence statistics of 20k scenes")
    a = ap.parse_args()
    print(json.dumps(world_stats(seed=a.seed) if a.stats else build_world(a.out, a.n_train, a.n_eval, a.seed), indent=1))
