"""Tokenizer (tokenizers-library wrapper), LLaVA prompt templates and the multimodal Processor.

The Processor does what transformers' LlavaProcessor / LlavaNextProcessor do: the text is tokenized with `<image>`
as one added token, then every `<image>` id is repeated num_image_tokens(h, w) times for its image (576 for a
LLaVA-1.5 336px model; base + unpadded AnyRes grid + newlines for LLaVA-1.6), so the model can scatter exactly that
many image features where input_ids == image_token_index.
"""
from __future__ import annotations

import json
import os

import torch
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer

from nanoalign.image import ImageProcessor, _cfg_get, _read_json

IMAGE_TOKEN = "<image>"
TOKENIZER_FILE = "tokenizer.json"

# LLaVA's conversation templates (llava/conversation.py, SeparatorStyle.TWO with sep=" ", sep2="</s>"): a single-turn
# prompt is  system + " " + "USER: " + message + " " + "ASSISTANT:"  (the model continues after the colon).
# `vicuna_v1` (what LLaVA-1.5 evaluation uses, --conv-mode vicuna_v1) says "user"; `llava_v1` says "human".
_SYSTEMS = {
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}
TEMPLATES = ("vicuna_v1", "llava_v1", "vicuna_nosys", "raw")


def build_prompt(question: str, template: str = "vicuna_v1", with_image: bool = True) -> str:
    """Wrap one user question in a LLaVA conversation template.

    vicuna_v1 / llava_v1: "<system> USER: <image>\\n{question} ASSISTANT:" -- "<image>\\n" is put in front of the
    question when it has no `<image>` yet (as LLaVA's model_vqa does) unless with_image=False (text-only); a question
    that already has one keeps it where it is. vicuna_nosys: the same turn without the system sentence (the toy
    world uses it: its 72 tokens would double a toy sequence). raw: the question unchanged (it must carry its own
    `<image>` if an image is given).
    """
    if template == "raw":
        return question
    if template not in _SYSTEMS and template != "vicuna_nosys":
        raise ValueError(f"build_prompt: unknown template {template!r} (choose from {', '.join(TEMPLATES)})")
    if with_image and IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN + "\n" + question
    if template == "vicuna_nosys":
        return f"USER: {question} ASSISTANT:"
    return f"{_SYSTEMS[template]} USER: {question} ASSISTANT:"


def _special(v):
    """tokenizer_config.json stores special tokens as a string or {"content": ...}."""
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    """A `tokenizers.Tokenizer` (tokenizer.json) with the ids LLaVA needs.

    encode(text, add_bos=True) -> list[int]  (BOS added here, never by the file's post-processor)
    decode(ids, skip_special_tokens=True) -> str
    bos_id / eos_id / pad_id (None when the vocabulary lacks them), image_token_id, vocab_size (with added tokens).
    pad_id: `pad_token` if given, else "<pad>", else "<unk>", else EOS.
    """

    def __init__(self, tok: HFTokenizer, bos_token="<s>", eos_token="</s>", pad_token=None,
                 image_token=IMAGE_TOKEN, source="tokenizer"):
        self.tok = tok
        self.source = source
        self.image_token = image_token
        self.image_token_id = tok.token_to_id(image_token)
        if self.image_token_id is None:
            raise ValueError(f"{source}: no {image_token!r} token in the vocabulary (add it as a special token)")
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        if pad_token is not None:
            self.pad_id = tok.token_to_id(pad_token)
            if self.pad_id is None:
                raise ValueError(f"{source}: pad token {pad_token!r} is not in the vocabulary")
        else:
            cands = [tok.token_to_id(t) for t in ("<pad>", "<unk>")] + [self.eos_id]
            self.pad_id = next((c for c in cands if c is not None), None)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer file not found")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            first = (str(e).splitlines() or [""])[0]
            raise ValueError(f"{path}: cannot be read as a tokenizers tokenizer.json ({first})") from None
        return cls(tok, source=path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """A checkpoint directory's tokenizer.json, with the special-token names of its tokenizer_config.json
        (bos_token / eos_token / pad_token / image_token) when that file exists. `path` may also be the file."""
        path = str(path)
        if not os.path.isdir(path):
            return cls.from_file(path)
        kw = {}
        tc = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tc):
            d = _read_json(tc)
            for key in ("bos_token", "eos_token", "pad_token", "image_token"):
                if isinstance(_special(d.get(key)), str):
                    kw[key] = _special(d[key])
        return cls.from_file(os.path.join(path, TOKENIZER_FILE), **kw)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, path: str) -> None:
        """Write the tokenizer.json (path may be a directory)."""
        if os.path.isdir(path):
            path = os.path.join(path, TOKENIZER_FILE)
        self.tok.save(path)

    def __len__(self) -> int:
        return self.vocab_size


class Processor:
    """Text + images -> model inputs, like transformers' Llava(Next)Processor.

    __call__(prompts, images, padding_side="left") -> dict(
        input_ids (B, T) long, attention_mask (B, T) long (1 = real token),
        pixel_values (n_img, 3, S, S) or (n_img, n_tiles_max, 3, S, S) or None, image_sizes (n_img, 2) or None)
    images[i] is a PIL image, None, or a list of PIL images (one per `<image>` in prompts[i], in order).
    Padding uses pad_id (the model config's pad_token_id when set, else the tokenizer's).
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, config=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        cfg_image = _cfg_get(config, "image_token_index")
        if cfg_image is not None and cfg_image != tokenizer.image_token_id:
            raise ValueError(f"tokenizer {tokenizer.source}: {tokenizer.image_token!r} has id "
                             f"{tokenizer.image_token_id} but the model config's image_token_index is {cfg_image}")
        n_embed = _cfg_get(config, "text_config", "vocab_size")
        if n_embed is not None and tokenizer.vocab_size > n_embed:
            raise ValueError(f"tokenizer {tokenizer.source}: {tokenizer.vocab_size} tokens but the model's embedding "
                             f"has only {n_embed} rows")
        self.image_token_id = tokenizer.image_token_id
        self.pad_id = _cfg_get(config, "pad_token_id", default=tokenizer.pad_id)
        if self.pad_id is None:
            self.pad_id = 0
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else _cfg_get(
            config, "text_config", "eos_token_id")

    def __call__(self, prompts, images=None, padding_side: str = "left", add_bos: bool = True) -> dict:
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is None:
            images = [None] * len(prompts)
        elif isinstance(images, Image.Image):
            images = [images]
        if len(images) != len(prompts):
            raise ValueError(f"Processor: {len(prompts)} prompts but {len(images)} image entries")
        if padding_side not in ("left", "right"):
            raise ValueError(f"Processor: padding_side {padding_side!r} is not 'left' or 'right'")
        rows, flat_images = [], []
        for i, (prompt, imgs) in enumerate(zip(prompts, images)):
            imgs = [] if imgs is None else ([imgs] if isinstance(imgs, Image.Image) else list(imgs))
            ids = self.tokenizer.encode(prompt, add_bos=add_bos)
            n_tags = ids.count(self.image_token_id)
            if imgs and n_tags == 0:
                raise ValueError(f"Processor: prompt {i} has no {IMAGE_TOKEN} but an image is given: {prompt[:60]!r}")
            if n_tags != len(imgs):
                raise ValueError(f"Processor: prompt {i} has {n_tags} {IMAGE_TOKEN} but {len(imgs)} image(s) given")
            rows.append(self.expand_image_tokens(ids, [(im.height, im.width) for im in imgs]))
            flat_images.extend(imgs)
        T = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
            input_ids[b, sl] = torch.tensor(r, dtype=torch.long)
            attention_mask[b, sl] = 1
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": None, "image_sizes": None}
        if flat_images:
            out.update(self.image_processor.process(flat_images))
        return out

    def expand_image_tokens(self, ids: list[int], image_sizes: list[tuple[int, int]]) -> list[int]:
        """Repeat the k-th image token id num_image_tokens(*image_sizes[k]) times (one (height, width) per tag)."""
        counts = iter([self.image_processor.num_image_tokens(h, w) for h, w in image_sizes])
        out = []
        for t in ids:
            out.extend([t] * next(counts) if t == self.image_token_id else [t])
        return out

    def save(self, path: str) -> None:
        """Write tokenizer.json, tokenizer_config.json (special token names) and preprocessor_config.json."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save(os.path.join(path, TOKENIZER_FILE))
        tok = self.tokenizer.tok
        names = {k: (tok.id_to_token(v) if v is not None else None) for k, v in
                 (("bos_token", self.tokenizer.bos_id), ("eos_token", self.tokenizer.eos_id),
                  ("pad_token", self.tokenizer.pad_id))}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "image_token": self.tokenizer.image_token,
                       **names}, f, indent=2)
        self.image_processor.save(path)

    @classmethod
    def from_pretrained(cls, path: str, model_config=None) -> "Processor":
        """tokenizer.json (+ tokenizer_config.json's special-token names when present) and the image processor."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Processor.from_pretrained: {path}: no such directory")
        if model_config is None and os.path.isfile(os.path.join(path, "config.json")):
            model_config = _read_json(os.path.join(path, "config.json"))
        tokenizer = Tokenizer.from_pretrained(path)
        return cls(tokenizer, ImageProcessor.from_pretrained(path, model_config), model_config)
