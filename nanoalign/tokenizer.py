"""Tokenizer (tokenizers-library wrapper), LLaVA prompt templates and the multimodal Processor.

The Processor does what transformers' LlavaProcessor / LlavaNextProcessor do: the text is tokenized with `<image>`
as one added token, then every `<image>` id is repeated num_image_tokens(h, w) times for its image (576 for a
LLaVA-1.5 336px model; base + unpadded AnyRes grid + newlines for LLaVA-1.6), so the model can scatter exactly that
many image features where input_ids == image_token_index.

Chat templates: a checkpoint's own Jinja chat template (read by read_chat_template from where transformers keeps it)
is rendered by render_chat_template the way transformers' apply_chat_template renders it; the named LLaVA templates
(vicuna_v1, ...) serve checkpoints without one. Processor.build_prompt / Processor.prompt_ids pick between them
(`template`: "auto" = the checkpoint's own if present else vicuna_v1, "checkpoint", or a named one).
"""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime

import torch
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer

from nanoalign.image import PREPROCESSOR_FILE, PROCESSOR_FILE, ImageProcessor, _cfg_get, _read_json

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
TEMPLATES = ("vicuna_v1", "llava_v1", "vicuna_nosys", "raw")  # the named templates (module-level build_prompt)
# what Processor.build_prompt and --template accept: "auto" (the checkpoint's own chat template when it has one,
# else vicuna_v1), "checkpoint" (its own, an error when it has none) or a named template
TEMPLATE_CHOICES = ("auto", "checkpoint") + TEMPLATES
DEFAULT_TEMPLATE = "vicuna_v1"  # what "auto" falls back to


def build_prompt(question: str, template: str = "vicuna_v1", with_image: bool = True) -> str:
    """Wrap one user question in a LLaVA conversation template.

    vicuna_v1 / llava_v1: "<system> USER: <image>\\n{question} ASSISTANT:" -- "<image>\\n" is put in front of the
    question when it has no `<image>` yet (as LLaVA's model_vqa does) unless with_image=False (text-only); a question
    that already has one keeps it where it is. vicuna_nosys: the same turn without the system sentence (the toy
    world uses it: its 72 tokens would double a toy sequence). raw: the question unchanged (it must carry its own
    `<image>` if an image is given).
    """
    if template in ("auto", "checkpoint"):
        raise ValueError(f"build_prompt: template {template!r} needs the checkpoint's processor: "
                         f"call Processor.build_prompt / Processor.prompt_ids")
    if template == "raw":
        return question
    if template not in _SYSTEMS and template != "vicuna_nosys":
        raise ValueError(f"build_prompt: unknown template {template!r} (choose from {', '.join(TEMPLATES)})")
    if with_image and IMAGE_TOKEN not in question:
        question = IMAGE_TOKEN + "\n" + question
    if template == "vicuna_nosys":
        return f"USER: {question} ASSISTANT:"
    return f"{_SYSTEMS[template]} USER: {question} ASSISTANT:"


# ---------------------------------------------------------------------------------------------- chat templates
def read_chat_template(path: str) -> tuple[str | None, str | None]:
    """(the checkpoint folder's own chat template, the file it came from), or (None, None).

    Looked up in transformers' order: processor_config.json "chat_template", chat_template.json (older processor
    layout), chat_template.jinja (transformers 5), then tokenizer_config.json "chat_template" (the tokenizer's; a
    string, or a list of {"name", "template"} of which "default" is taken). A dict of named templates yields its
    "default". Malformed entries -> ValueError naming the file."""
    def pick(v, where):
        if isinstance(v, list):  # tokenizer_config.json's named-template list
            v = {t.get("name"): t.get("template") for t in v if isinstance(t, dict)}
        if isinstance(v, dict):
            if "default" not in v:
                raise ValueError(f"{where}: several chat templates but none named 'default' ({', '.join(map(str, v))})")
            v = v["default"]
        if not isinstance(v, str):
            raise ValueError(f"{where}: chat_template is {type(v).__name__}, not a string")
        return v

    pc = os.path.join(path, "processor_config.json")
    if os.path.isfile(pc) and _read_json(pc).get("chat_template") is not None:
        return pick(_read_json(pc)["chat_template"], pc), pc
    cj = os.path.join(path, "chat_template.json")
    if os.path.isfile(cj):
        return pick(_read_json(cj).get("chat_template"), cj), cj
    jj = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jj):
        with open(jj, encoding="utf-8") as f:
            return f.read(), jj
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tc) and _read_json(tc).get("chat_template") is not None:
        return pick(_read_json(tc)["chat_template"], tc), tc
    return None, None


_JINJA_ENV = None


def _jinja_env():
    """The environment transformers renders chat templates in: sandboxed (a template from disk cannot run code),
    trim_blocks + lstrip_blocks, loop controls, `{% generation %}` blocks (rendered as their body), a tojson that
    does not escape HTML, raise_exception() and strftime_now()."""
    global _JINJA_ENV
    if _JINJA_ENV is None:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):  # transformers marks assistant text with {% generation %}..{% endgeneration %}
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body).set_lineno(lineno)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _JINJA_ENV = env
    return _JINJA_ENV


@functools.lru_cache(maxsize=16)
def template_reads_content_parts(template: str) -> bool:
    """Whether a chat template reads typed content parts (message['content'] as [{"type": "image"}, {"type": "text",
    "text": ...}], what transformers' processors pass and every llava-hf template expects) rather than a string
    (a text model's template). Decided from the template's syntax tree: it looks up a "type" or "text" key."""
    from jinja2 import nodes
    tree = _jinja_env().parse(template)
    # item.type / item['type'] / selectattr('type', 'equalto', 'image'): a Getattr or a string constant
    return any((n.attr if isinstance(n, nodes.Getattr) else n.value) in ("type", "text")
               for n in tree.find_all((nodes.Getattr, nodes.Const)))


def conversation_messages(humans: list[str], answers: list[str], with_image: bool, content_parts: bool) -> list[dict]:
    """The conversation user humans[0], assistant answers[0], user humans[1], ... as transformers' processors take
    it: content parts ([{"type": "image"}, {"type": "text", "text": ...}], content_parts) or strings.
    The image: a human turn whose text starts with "<image>\\n" (LLaVA's data) gets an image part in its place (with
    content_parts); a tag elsewhere stays in its text; with_image and no tag in any turn: the first turn gets the
    image part, or "<image>\\n" in front of its string (LLaVA's order)."""
    tagged = any(IMAGE_TOKEN in h for h in humans)
    msgs = []
    for k, h in enumerate(humans):
        image = with_image and not tagged and k == 0
        if content_parts and with_image and h.startswith(IMAGE_TOKEN + "\n"):
            image, h = True, h[len(IMAGE_TOKEN) + 1:]
        if content_parts:
            msgs.append({"role": "user", "content": ([{"type": "image"}] if image else []) +
                         [{"type": "text", "text": h}]})
        else:
            msgs.append({"role": "user", "content": (IMAGE_TOKEN + "\n" if image else "") + h})
        if k < len(answers):
            a = answers[k]
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}] if content_parts else a})
    return msgs


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    return _jinja_env().from_string(template)


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True,
                         source: str = "chat template", **special_tokens) -> str:
    """Render a Jinja chat template as transformers' apply_chat_template(tokenize=False) does: the same environment
    (see _jinja_env), variables messages, add_generation_prompt and the special-token strings (bos_token, ...).
    A template error -> ValueError naming `source`."""
    import jinja2
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"{source}: chat template failed: {e}") from None


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
                 image_token=IMAGE_TOKEN, source="tokenizer", unk_token=None):
        self.tok = tok
        self.source = source
        self.image_token = image_token
        self.image_token_id = tok.token_to_id(image_token)
        if self.image_token_id is None:
            raise ValueError(f"{source}: no {image_token!r} token in the vocabulary (add it as a special token)")
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.bos_token = bos_token if self.bos_id is not None else None
        # Whether a prompt starts with BOS: as the file's post-processor does it (what transformers follows: a
        # Llama/Mistral tokenizer.json adds BOS, a ChatML/Qwen-style one adds nothing); a file without any
        # post-processor gets BOS (LLaVA's rule; the toy world's tokenizer relies on it, transformers adds none).
        probe = tok.encode("", add_special_tokens=True).ids
        self.adds_bos = self.bos_id is not None and (tok.post_processor is None or probe[:1] == [self.bos_id])
        # the special-token strings a chat template sees (transformers passes its special_tokens_map)
        self.special_tokens = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token),
                                                 ("unk_token", unk_token), ("pad_token", pad_token))
                               if v is not None and tok.token_to_id(v) is not None}
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
            for key in ("bos_token", "eos_token", "pad_token", "image_token", "unk_token"):
                if isinstance(_special(d.get(key)), str):
                    kw[key] = _special(d[key])
        return cls.from_file(os.path.join(path, TOKENIZER_FILE), **kw)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Ids of `text`, BOS in front when add_bos and the tokenizer puts one there (adds_bos) -- unless the text
        already starts with the BOS string (a chat template that writes it), the rule of transformers'
        processor.apply_chat_template(tokenize=True). Nothing else of the file's post-processor is applied."""
        return self.encode_offsets(text, add_bos)[0]

    def encode_offsets(self, text: str, add_bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, character span [start, end) of each id in `text`) as encode(); a BOS added here spans (0, 0)."""
        if not self.adds_bos or (self.bos_token is not None and text.startswith(self.bos_token)):
            add_bos = False
        enc = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos else []) + list(enc.ids), ([(0, 0)] if add_bos else []) + list(enc.offsets)

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
    end_ids: every id that ends a turn (see end_ids()); eos_id: the tokenizer's EOS (appended to responses).
    chat_template / chat_template_source: the checkpoint's own Jinja template and its file (None when it has none);
    build_prompt / prompt_ids turn a question into the prompt with it or with a named template.
    """

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, config=None, chat_template=None,
                 chat_template_source=None, generation_config=None, source_files=None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template              # the checkpoint's own Jinja template, or None
        self.chat_template_source = chat_template_source  # the file it came from (for messages)
        self.source_files = dict(source_files or {})    # name -> bytes of the source folder's processor files
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
        if isinstance(self.eos_id, list):
            self.eos_id = self.eos_id[0] if self.eos_id else None
        self.end_ids = end_ids(generation_config, config, tokenizer)
        self._frame = (None, None)  # (chat template, its answer_frame()), found on first use

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

    def resolve_template(self, template: str = "auto") -> str:
        """--template -> "checkpoint" (the checkpoint's own chat template) or a named template: "auto" is
        "checkpoint" when the checkpoint has a chat template, else vicuna_v1. ValueError for an unknown name or
        "checkpoint" without a chat template."""
        if template not in TEMPLATE_CHOICES:
            raise ValueError(f"unknown template {template!r} (choose from {', '.join(TEMPLATE_CHOICES)})")
        if template == "checkpoint" and self.chat_template is None:
            raise ValueError(f"--template checkpoint: {self.tokenizer.source}: the checkpoint has no chat template "
                             f"(chat_template.jinja, chat_template.json, processor_config.json or "
                             f"tokenizer_config.json); choose a named one: {', '.join(TEMPLATES)}")
        if template == "auto":
            return "checkpoint" if self.chat_template is not None else DEFAULT_TEMPLATE
        return template

    def template_text(self, template: str = "auto") -> str:
        """What the resolved template is, as text (for cache keys and logs): the checkpoint's Jinja source, or a
        named template's prompt with "{question}" in place of the question."""
        t = self.resolve_template(template)
        return self.chat_template if t == "checkpoint" else f"{t}: " + build_prompt("{question}", t)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The checkpoint's chat template rendered on `messages` (render_chat_template with this tokenizer's
        special-token strings)."""
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.chat_template_source,
                                    **self.tokenizer.special_tokens)

    def messages(self, humans: list[str], answers: list[str] = (), with_image: bool = True) -> list[dict]:
        """conversation_messages in the form the checkpoint's template reads (content parts or strings)."""
        return conversation_messages(humans, list(answers), with_image,
                                     template_reads_content_parts(self.chat_template))

    def build_prompt(self, question: str, template: str = "auto", with_image: bool = True) -> str:
        """One user question -> the prompt text. template "auto": the checkpoint's own chat template when it has
        one (rendered as transformers' apply_chat_template(add_generation_prompt=True) renders it, the question as
        the text part after one image part), else vicuna_v1; "checkpoint": its own, ValueError when it has none;
        a named template (vicuna_v1, llava_v1, vicuna_nosys, raw): module-level build_prompt."""
        template = self.resolve_template(template)
        if template != "checkpoint":
            return build_prompt(question, template, with_image)
        return self.render(self.messages([question], [], with_image), True)

    def answer_frame(self, template: str = "auto") -> tuple[str, str]:
        """(text between the generation prompt and an answer, text that ends an assistant turn) of the resolved
        template. Named templates: (" ", "") -- LLaVA writes "ASSISTANT: answer" and training appends EOS. The
        checkpoint's template: found by rendering [user, assistant MARK] and [user] + generation prompt, as
        transformers renders them: what lies between the prompt and MARK, and what follows MARK up to trailing
        whitespace (chatml "<|im_end|>", Llama-3 "<|eot_id|>", mistral "</s>"; "" for llava-hf's vicuna template,
        which ends an answer with a space only). ValueError when the conversation does not extend the prompt."""
        if self.resolve_template(template) != "checkpoint":
            return " ", ""
        if self._frame[0] != self.chat_template:
            mark = "nanoalign-answer-mark"
            prompt = self.render(self.messages(["hello"], [], False), True)
            full = self.render(self.messages(["hello"], [mark], False), False)
            if not full.startswith(prompt) or mark not in full[len(prompt):]:
                raise ValueError(f"{self.chat_template_source}: the chat template's rendering of [user, assistant] "
                                 f"does not extend its generation prompt ({prompt[-40:]!r} vs {full[-60:]!r})")
            before, after = full[len(prompt):].split(mark, 1)
            self._frame = (self.chat_template, (before, after.rstrip()))
        return self._frame[1]

    def render_conversation(self, humans: list[str], answers: list[str], with_image: bool = True
                            ) -> list[tuple[str, bool]]:
        """The conversation user humans[0], assistant answers[0], user humans[1], ... as the checkpoint's chat template
        renders it (transformers' apply_chat_template), cut into pieces (text, is_answer) that alternate context,
        answer, context, answer, ...:
          - context k: up to and including the generation prompt before answer k (the first one: BOS, system text,
            the first user turn; later ones: what the template puts after answer k-1's end of turn and the next
            user turn);
          - answer k: from the generation prompt to the end of the template's end-of-turn (answer_frame), trailing
            whitespace left to the next context ("" end of turn: the answer's text only).
        len(answers) is len(humans) (ends with an answer) or len(humans) - 1 (ends with a generation prompt).
        "".join of the pieces before answer k is exactly the template rendered on the turns before it with
        add_generation_prompt=True. ValueError when a turn renders differently once later turns follow it."""
        if len(answers) not in (len(humans), len(humans) - 1):
            raise ValueError(f"render_conversation: {len(humans)} user turns but {len(answers)} answers")
        end = self.answer_frame("checkpoint")[1]
        msgs = self.messages(humans, answers, with_image)
        pieces, done = [], ""
        for k in range(len(humans)):
            prompt = self.render(msgs[:2 * k + 1], True)
            if not prompt.startswith(done):
                raise ValueError(f"{self.chat_template_source}: user turn {k + 1} renders differently once later "
                                 f"turns follow it (prefix {done[-40:]!r} vs {prompt[max(0, len(done) - 40):][:60]!r})")
            pieces.append((prompt[len(done):], False))
            done = prompt
            if k == len(answers):
                break
            full = self.render(msgs[:2 * k + 2], False)
            answer = full[len(prompt):].rstrip()
            if not full.startswith(prompt) or not answer.endswith(end):
                raise ValueError(f"{self.chat_template_source}: assistant turn {k + 1} is not rendered as the "
                                 f"generation prompt + answer + {end!r} ({full[max(0, len(prompt) - 20):][:80]!r})")
            pieces.append((answer, True))
            done += answer
        return pieces

    def prompt_ids(self, question: str, image_size: tuple[int, int] | None, template: str = "auto") -> list[int]:
        """BOS + build_prompt(question, template) tokenized, the `<image>` id expanded for the (height, width) image
        (None: text only) -- equal to transformers' processor.apply_chat_template(conversation,
        add_generation_prompt=True, tokenize=True) for a checkpoint template."""
        ids = self.tokenizer.encode(self.build_prompt(question, template, with_image=image_size is not None))
        return self.expand_image_tokens(ids, [image_size] if image_size is not None else [])

    def expand_image_tokens(self, ids: list[int], image_sizes: list[tuple[int, int]]) -> list[int]:
        """Repeat the k-th image token id num_image_tokens(*image_sizes[k]) times (one (height, width) per tag)."""
        counts = iter([self.image_processor.num_image_tokens(h, w) for h, w in image_sizes])
        out = []
        for t in ids:
            out.extend([t] * next(counts) if t == self.image_token_id else [t])
        return out

    def save(self, path: str) -> None:
        """Write the processor files into the folder `path` so that transformers' AutoProcessor.from_pretrained(path)
        and apply_chat_template behave as on the source checkpoint: the source folder's processor, tokenizer,
        chat-template and generation files (read at load time) are written back unchanged; what the source lacked
        is written from our settings: tokenizer.json, tokenizer_config.json (special-token names), the image
        processor (preprocessor_config.json, unless the source's processor_config.json holds it) and a
        processor_config.json (processor_class, patch_size, select strategy: without it transformers' processor
        has patch_size None and fails)."""
        os.makedirs(path, exist_ok=True)
        for name, data in self.source_files.items():
            os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
        have = set(self.source_files)
        if TOKENIZER_FILE not in have:
            self.tokenizer.save(os.path.join(path, TOKENIZER_FILE))
        if "tokenizer_config.json" not in have:
            tok = self.tokenizer.tok
            names = {k: (tok.id_to_token(v) if v is not None else None) for k, v in
                     (("bos_token", self.tokenizer.bos_id), ("eos_token", self.tokenizer.eos_id),
                      ("pad_token", self.tokenizer.pad_id))}
            with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "image_token": self.tokenizer.image_token,
                           **names}, f, indent=2)
        nested = PROCESSOR_FILE in have and "image_processor" in json.loads(self.source_files[PROCESSOR_FILE])
        if not nested and PREPROCESSOR_FILE not in have:
            self.image_processor.save(path)
        if PROCESSOR_FILE not in have:
            ip = self.image_processor
            with open(os.path.join(path, PROCESSOR_FILE), "w") as f:
                json.dump({"processor_class": ip.to_dict()["processor_class"],
                           "image_token": self.tokenizer.image_token,
                           "patch_size": ip.patch_size, "vision_feature_select_strategy":
                           ip.vision_feature_select_strategy,
                           "num_additional_image_tokens": 1}, f, indent=2)  # CLIP's CLS: counts as ours
        if self.chat_template is not None and self.chat_template_source is None:
            with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
                f.write(self.chat_template)

    @classmethod
    def from_pretrained(cls, path: str, model_config=None, log=print) -> "Processor":
        """A checkpoint folder's processor: tokenizer.json (+ tokenizer_config.json's special-token names), the
        image processor (image.ImageProcessor.from_pretrained: every layout transformers reads), the chat template
        (read_chat_template), the end-of-turn ids (end_ids) and the bytes of its processor files (see save).
        `log` prints the one-line notes about settings that fall back to defaults (None: silent)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Processor.from_pretrained: {path}: no such directory")
        if model_config is None and os.path.isfile(os.path.join(path, "config.json")):
            model_config = _read_json(os.path.join(path, "config.json"))
        tokenizer = Tokenizer.from_pretrained(path)
        template, source = read_chat_template(path)
        gen = os.path.join(path, GENERATION_FILE)
        files = {}
        for name in CARRIED_FILES:
            if os.path.isfile(os.path.join(path, name)):
                with open(os.path.join(path, name), "rb") as f:
                    files[name] = f.read()
        tdir = os.path.join(path, "chat_templates")
        if os.path.isdir(tdir):
            for name in sorted(os.listdir(tdir)):
                if name.endswith(".jinja") and os.path.isfile(os.path.join(tdir, name)):
                    with open(os.path.join(tdir, name), "rb") as f:
                        files["chat_templates/" + name] = f.read()
        return cls(tokenizer, ImageProcessor.from_pretrained(path, model_config, log=log), model_config, template,
                   source, _read_json(gen) if os.path.isfile(gen) else None, files)


GENERATION_FILE = "generation_config.json"
# files a saved checkpoint carries over unchanged from the folder it was loaded from (plus chat_templates/*.jinja)
CARRIED_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "tokenizer.model", "vocab.json", "merges.txt", PROCESSOR_FILE, PREPROCESSOR_FILE,
                 "chat_template.json", "chat_template.jinja", GENERATION_FILE)


def end_ids(generation_config=None, model_config=None, tokenizer=None) -> list[int]:
    """The ids that end a turn, in order, without repeats: generation_config.json's eos_token_id (an int or a list;
    Llama-3 / Mistral-style checkpoints list several), the model config's text_config.eos_token_id (int or list)
    and top-level eos_token_id, and the tokenizer's EOS. Generation stops at any of them."""
    out = []
    for v in (_cfg_get(generation_config, "eos_token_id"), _cfg_get(model_config, "text_config", "eos_token_id"),
              _cfg_get(model_config, "eos_token_id"), getattr(tokenizer, "eos_id", None)):
        for i in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(i, int) and not isinstance(i, bool) and i not in out:
                out.append(i)
    return out
