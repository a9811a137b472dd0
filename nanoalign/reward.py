"""Rewards for RL and the reward model (RM): a VLM with a scalar head, trained with the Bradley-Terry loss.

The reward model (the Apple study, Amirloo et al. 2024, arXiv:2407.02477, Sec. 2.1 and 5.5; Stiennon et al. 2020,
arXiv:2009.01325): the policy's architecture (nanoalign.model.LlavaModel, which returns final-normed hidden states)
and a head Linear(H, 1) on the hidden state of the last response token (EOS when the response was not truncated):
    r(x, y) = w . h_last(x, y) + b
Trained on preference pairs with Eq. 1, -log sigmoid(r(x, y_w) - r(x, y_l)) (`bradley_terry_loss`).

On disk: a plain llava-hf checkpoint folder (config.json, model.safetensors, tokenizer.json, ...; it loads with
`nanoalign.checkpoint.load_pretrained` and transformers' LlavaForConditionalGeneration, which ignore the extra file)
plus HEAD_FILE = reward_head.safetensors beside it:
    tensors   weight (1, H) float32, bias (1,) float32
    metadata  format "nanoalign.reward_head", version "1", hidden_size, template (the prompt template it was trained
              with), tokenizer_sha256 (`tokenizer_fingerprint` of the folder's tokenizer.json), token
              "last_response", and optional train_data (what it was trained on: the rows of the Table 7 cross table)
Loading an RM whose head file is missing or malformed, whose tokenizer no longer matches the recorded fingerprint, or
whose tokenizer differs from the policy's (an RM scores the policy's token ids) raises ValueError with one line.

Rewards for RL (`load_reward(spec)`): a callable
    score(examples: list[Example], images: list[PIL.Image | None], responses: list[str]) -> torch.Tensor (N,) float32
for the specs
    rm:PATH          the reward model in PATH
    module:function  a Python function the user names (`pkg.mod:fn` or `path/to/file.py:fn`), called as
                     fn(images, prompts, responses) -> N numbers (rule rewards such as answer correctness)
    oracle[:SCENES]  the toy world's judge, oracle_score(response, scene, question) (nanoalign.toy.oracle); the scene
                     of an example is its row's `scene` key (Example.extra["scene"]) or, given SCENES (a toy world's
                     scenes_*.jsonl), the scene whose `image` is the example's image file name
A reward that raises, returns the wrong number of values, or a non-finite value stops with a ValueError naming the
example id.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from nanoalign.batch import Unusable, collate, encode_example
from nanoalign.forward import forward

HEAD_FILE = "reward_head.safetensors"
HEAD_FORMAT = "nanoalign.reward_head"
HEAD_VERSION = "1"


# ------------------------------------------------------------------------------------------------- the reward model
def reward_head(hidden_size: int, generator: torch.Generator | None = None, zero: bool = False) -> nn.Linear:
    """A fresh Linear(H, 1): weight ~ N(0, 1/(H + 1)), bias 0 (the reward head initialization of Stiennon et al.
    2020 / OpenAI's lm-human-preferences, so that initial rewards have about unit scale); zero: weight 0 too (PPO's
    value head: V = 0 at the start)."""
    head = nn.Linear(hidden_size, 1)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size + 1), generator=generator)
        head.bias.zero_()
        if zero:
            head.weight.zero_()
    return head


def last_response_index(labels: torch.Tensor) -> torch.Tensor:
    """(R, T) labels (nanoalign.batch layout: labels[t] = the token at t + 1, -100 off the response) -> (R,) the
    position of each row's last response token (the last labelled t, + 1). ValueError for a row without one."""
    scored = labels != -100
    empty = ~scored.any(1)
    if empty.any():
        raise ValueError(f"reward model: rows {empty.nonzero().flatten().tolist()} have no response token")
    last = labels.shape[1] - 1 - scored.flip(1).int().argmax(1)  # (R,) last labelled position
    if (last + 1 >= labels.shape[1]).any():
        raise ValueError("reward model: a response token has no position of its own (labels not in the "
                         "nanoalign.batch layout)")
    return last + 1


def sequence_rewards(model, head: nn.Module, batch: dict, device, rows=slice(None)) -> torch.Tensor:
    """r = head(h at the last response token) for the rows `rows` (a slice) of a `nanoalign.batch.collate` batch.
    model: LlavaModel (hidden states (R, T, H)); head: Linear(H, 1). Returns (R,) float32 with grad when enabled."""
    h = forward(model, batch, device, rows)  # (R, T, H): rows cut by select_rows, a shared prompt run once
    pos = last_response_index(batch["labels"][rows]).to(device)  # (R,)
    h_last = h[torch.arange(h.shape[0], device=device), pos]  # (R, H)
    return head(h_last.to(head.weight.dtype)).squeeze(-1).float()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Reward-model loss, the Apple study's Eq. 1 (Bradley & Terry 1952; Stiennon et al. 2020, arXiv:2009.01325):
        L = -mean_pairs log sigmoid(r(x, y_w) - r(x, y_l))
    r_chosen, r_rejected (P,) -> (loss, {"accuracy": mean 1[r_w > r_l] (ties count as wrong), "margin": mean
    r_w - r_l, "reward_chosen", "reward_rejected": means}) (metrics detached).
    Departure: none (no reward-centering term as TRL's center_rewards_coefficient)."""
    margin = r_chosen - r_rejected
    loss = -F.logsigmoid(margin).mean()
    d = margin.detach()
    return loss, {"accuracy": (d > 0).float().mean(), "margin": d.mean(),
                  "reward_chosen": r_chosen.detach().mean(), "reward_rejected": r_rejected.detach().mean()}


# ------------------------------------------------------------------------------------------------ tokenizer identity
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's canonical JSON (nanoalign.tokenizer.Tokenizer, or a tokenizer.json path / folder):
    the file as `tokenizers` serializes it, keys sorted, truncation / padding settings left out. Two tokenizers with
    the same fingerprint turn the same text into the same ids."""
    return hashlib.sha256(json.dumps(_canonical(tokenizer), sort_keys=True).encode()).hexdigest()


def _canonical(tokenizer) -> dict:
    if isinstance(tokenizer, (str, Path)):
        from nanoalign.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_pretrained(str(tokenizer))
    d = json.loads(tokenizer.tok.to_str())
    d.pop("truncation", None)
    d.pop("padding", None)
    return d


def _tokenizer_difference(a, b) -> str:
    """What differs between two tokenizers, in a few words (for the error line)."""
    va, vb = a.tok.get_vocab(with_added_tokens=True), b.tok.get_vocab(with_added_tokens=True)
    if len(va) != len(vb):
        return f"{len(va)} vs {len(vb)} tokens"
    for tok in sorted(va, key=va.get):
        if vb.get(tok) != va[tok]:
            return f"token {tok!r} has id {va[tok]} vs {vb.get(tok)}"
    ca, cb = _canonical(a), _canonical(b)
    keys = [k for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    return f"same vocabulary, different {', '.join(keys)}"


# ------------------------------------------------------------------------------------------------------ save / load
def save_reward_head(path, head, tokenizer, template: str, train_data: str | None = None) -> Path:
    """Write PATH/reward_head.safetensors (atomically: a temporary file, then a rename) beside a checkpoint already
    saved in PATH. head: Linear(H, 1) or its state dict {"weight" (1, H), "bias" (1,)}; tokenizer: the checkpoint's
    (its fingerprint is recorded). Returns the file's path."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint folder (no config.json); save the model first")
    sd = head.state_dict() if isinstance(head, nn.Module) else dict(head)
    weight = sd["weight"].detach().float().cpu().contiguous()
    bias = sd["bias"].detach().float().cpu().reshape(1).contiguous()
    if weight.dim() != 2 or weight.shape[0] != 1:
        raise ValueError(f"save_reward_head: weight must be (1, H), got {tuple(weight.shape)}")
    meta = {"format": HEAD_FORMAT, "version": HEAD_VERSION, "hidden_size": str(weight.shape[1]), "template": template,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "token": "last_response"}
    if train_data is not None:
        meta["train_data"] = str(train_data)
    tmp = path / f".{HEAD_FILE}.tmp-{os.getpid()}"
    save_file({"weight": weight, "bias": bias}, str(tmp), metadata=meta)
    os.replace(tmp, path / HEAD_FILE)
    return path / HEAD_FILE


def read_reward_head(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """PATH/reward_head.safetensors -> (tensors {"weight", "bias"}, metadata); ValueError naming the file when it is
    missing, unreadable or not a reward head."""
    f = Path(path) / HEAD_FILE
    if not f.is_file():
        raise ValueError(f"{path}: no {HEAD_FILE}: not a reward model (train one with --algo rm)")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            meta = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise ValueError(f"{f}: unreadable safetensors file ({(str(e).splitlines() or [''])[0]})") from None
    if meta.get("format") != HEAD_FORMAT or set(tensors) != {"weight", "bias"}:
        raise ValueError(f"{f}: not a nanoalign reward head (format {meta.get('format')!r}, tensors {sorted(tensors)})")
    if meta.get("version") != HEAD_VERSION:
        raise ValueError(f"{f}: reward head version {meta.get('version')!r}, this nanoalign reads {HEAD_VERSION!r}")
    return tensors, meta


@dataclass
class RewardModel:
    """A loaded reward model: LlavaModel (eval, no grad), its head, processor and the head file's metadata."""
    path: str
    model: nn.Module
    head: nn.Linear
    processor: object
    meta: dict
    max_len: int = 4096

    @property
    def template(self) -> str:
        return self.meta["template"]

    @torch.no_grad()
    def score_batch(self, batch: dict, device=None) -> torch.Tensor:
        """Rewards (R,) of a collated batch tokenized with this RM's tokenizer (= the policy's: checked at load)."""
        return sequence_rewards(self.model, self.head, batch, device or self.head.weight.device)

    @torch.no_grad()
    def score(self, examples, images, responses) -> torch.Tensor:
        """Rewards (N,) of `responses` to the examples' prompts and images, tokenized with this RM's processor."""
        items = []
        for i, (ex, im, resp) in enumerate(zip(examples, images, responses)):
            try:
                items.append(encode_example(i, replace(ex, image=im, chosen=resp, rejected=None), self.processor,
                                            None, self.template, self.max_len))
            except Unusable as u:
                raise ValueError(f"reward rm:{self.path}: example {ex.id}: {u.reason} ({u})") from None
        return self.score_batch(collate(items, ["chosen"], self.processor, list(images)))


def load_reward_model(path, policy_tokenizer=None, device="cpu", dtype=torch.float32, max_len: int = 4096):
    """Checkpoint folder with reward_head.safetensors -> RewardModel. policy_tokenizer (nanoalign Tokenizer), when
    given, must equal the RM's (same `tokenizer_fingerprint`). Every failure is one ValueError line naming PATH."""
    from nanoalign.checkpoint import load_pretrained
    tensors, meta = read_reward_head(path)  # first: the cheap, most likely mistake
    try:
        model, processor = load_pretrained(path, dtype=dtype, device="cpu")
    except (FileNotFoundError, ValueError, KeyError, OSError) as e:
        raise ValueError(f"{path}: {(str(e).splitlines() or [''])[0]}") from None
    if processor is None:
        raise ValueError(f"{path}: no tokenizer.json in the reward model folder")
    H = model.config.text_config.hidden_size
    if tuple(tensors["weight"].shape) != (1, H) or tuple(tensors["bias"].shape) != (1,):
        raise ValueError(f"{path}/{HEAD_FILE}: head weight {tuple(tensors['weight'].shape)}, expected (1, {H}) for "
                         "this checkpoint's hidden size")
    own = tokenizer_fingerprint(processor.tokenizer)
    if meta.get("tokenizer_sha256") != own:
        raise ValueError(f"{path}: tokenizer.json is not the one the reward head was trained with (fingerprint "
                         f"{own[:12]} vs recorded {str(meta.get('tokenizer_sha256'))[:12]})")
    if policy_tokenizer is not None and tokenizer_fingerprint(policy_tokenizer) != own:
        raise ValueError(f"{path}: the reward model's tokenizer differs from the policy's "
                         f"({_tokenizer_difference(processor.tokenizer, policy_tokenizer)}); both must share one "
                         "tokenizer.json")
    head = nn.Linear(H, 1)
    head.load_state_dict(tensors)
    model.to(device=device).requires_grad_(False).eval()
    head.to(device=device, dtype=dtype).requires_grad_(False)
    return RewardModel(str(path), model, head, processor, meta, max_len)


# ----------------------------------------------------------------------------------------------- rewards for RL
def load_reward(spec: str, policy_tokenizer=None, device="cpu", max_len: int = 4096, option: str = "--reward"):
    """`--reward` spec -> score(examples, images, responses) -> (N,) float32 (see the module docstring).
    ValueError with one line for an unknown spec, a module or function that cannot be found, or a bad RM folder; a
    path of the spec (rm:P, oracle:P, FILE.py:fn) that does not exist is `no such file or folder: P (option)`
    (option: the command-line option the spec came from, for the line)."""
    from nanoalign.cli import missing_path, spec_path
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{option}: empty spec (expected rm:PATH, oracle[:SCENES] or module:function)")
    bad = missing_path([(option, spec_path(spec, option))])
    if bad:
        raise ValueError(bad)
    if spec.startswith("rm:"):
        rm = load_reward_model(spec[3:], policy_tokenizer, device, max_len=max_len)
        return _checked(spec, rm.score)
    if spec == "oracle" or spec.startswith("oracle:"):
        return _checked(spec, oracle_reward(spec[len("oracle:"):] or None))
    mod, sep, name = spec.rpartition(":")
    if not sep or not mod or not name:
        raise ValueError(f"{option} {spec!r}: expected rm:PATH, oracle[:SCENES] or module:function")
    return _checked(spec, user_reward(_import_function(spec, mod, name)))


def _import_function(spec: str, mod: str, name: str):
    try:
        if mod.endswith(".py"):
            s = importlib.util.spec_from_file_location(Path(mod).stem, mod)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod)
    except Exception as e:  # the user's module: any import-time failure is theirs, reported in one line
        raise ValueError(f"--reward {spec}: cannot import {mod}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {mod} has no function {name!r}")
    return fn


def user_reward(fn):
    """A user rule fn(images, prompts, responses) -> N numbers, as score(examples, images, responses)."""
    def score(examples, images, responses):
        return fn(list(images), [ex.prompt for ex in examples], list(responses))
    return score


def oracle_reward(scenes_path: str | None = None, oracle_fn=None):
    """The toy world's judge as score(examples, images, responses): oracle_fn(response, scene, question) -> a float
    or a dict with "score" (default: nanoalign.toy.oracle.oracle_score, imported at the first call). question = the prompt without "<image>".
    Scenes: Example.extra["scene"], else the scenes_*.jsonl row whose "image" is the example image's file name."""
    by_image = _read_scenes(scenes_path) if scenes_path else {}

    def score(examples, images, responses):
        fn = oracle_fn or _default_oracle()
        out = []
        for ex, resp in zip(examples, responses):
            scene = _scene(ex, by_image)
            if scene is None:
                where = f"; its image {os.path.basename(ex.image)!r} is not in {scenes_path}" if scenes_path else \
                    " (give oracle:SCENES.jsonl, the toy world's scenes file)"
                raise ValueError(f"oracle reward: example {ex.id} has no scene{where}")
            question = ex.prompt.replace("<image>", "").strip()
            s = fn(resp, scene, question)
            out.append(s["score"] if isinstance(s, dict) else s)
        return out
    return score


def _scene(ex, by_image: dict):
    """The toy scene of an example: its row's `scene` key, else by_image[its image's file name], else None."""
    scene = ex.extra.get("scene") if isinstance(ex.extra, dict) else None
    if scene is None and isinstance(ex.image, str):
        scene = by_image.get(os.path.basename(ex.image))
    return scene


def check_oracle(spec: str | None, examples, data: str, option: str = "--reward") -> None:
    """Before training: ValueError (one line) when `spec` is the toy world's oracle (oracle[:SCENES]) and an example
    of `data` has no scene for it (nanoalign.toy.oracle scores a response against its scene; a user's data has
    none), naming the data file, the first such row and how many, and what to use instead. Other specs: nothing."""
    if not spec or not (spec == "oracle" or spec.startswith("oracle:")):
        return
    scenes = spec[len("oracle:"):] or None
    by_image = _read_scenes(scenes) if scenes else {}
    missing = [ex for ex in examples if _scene(ex, by_image) is None]
    if not missing:
        return
    ex = missing[0]
    row = ex.id if ex.id.startswith(("line ", "row ")) else f"id {ex.id}"  # a row without an id: its label
    why = (f"no scene: its image {os.path.basename(ex.image)!r} is not in {scenes}" if scenes and
           isinstance(ex.image, str) else "no 'scene' key" + (f" and no image to look up in {scenes}" if scenes else ""))
    instead = "--annotator rm:PATH (a reward model) or vlm:PATH (a judge VLM)" if option == "--annotator" else \
        "--reward FILE.py:FN (your own rule) or rm:PATH (a reward model)"
    raise ValueError(f"{option} {spec} is the toy world's judge and needs each row's toy scene: {data}: {row} "
                     f"({len(missing)} of {len(examples)} rows) has {why}; for this data use {instead}")


def _default_oracle():
    from nanoalign.toy.oracle import oracle_score
    return oracle_score


def _read_scenes(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"oracle:{path}: not a file (expected a toy world's scenes_*.jsonl)")
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[os.path.basename(row["image"])] = row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: line {n}: not a scene row with an 'image' "
                                 f"({type(e).__name__}: {e})") from None
    return out


def _checked(spec: str, fn):
    """Wrap a score function: one ValueError line naming the example when it raises, returns the wrong number of
    values, a non-number or a non-finite value. When a batch call raises, each example is retried alone to find the
    one that fails."""
    def score(examples, images, responses):
        n = len(examples)
        if not (len(images) == len(responses) == n):
            raise ValueError(f"reward {spec}: {n} examples, {len(images)} images, {len(responses)} responses")
        try:
            values = fn(examples, images, responses)
        except Exception as e:
            raise ValueError(_blame(spec, fn, examples, images, responses, e)) from None
        if isinstance(values, torch.Tensor) and values.dim() == 1:
            values = values.tolist()
        elif isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
            raise ValueError(f"reward {spec}: returned {type(values).__name__} {values!r:.40}; it must return a list "
                             f"of {n} numbers, one per response (fn(images, prompts, responses))")
        values = list(values)
        if len(values) != n:
            raise ValueError(f"reward {spec}: returned {len(values)} values for {n} responses (examples "
                             f"{', '.join(ex.id for ex in examples[:5])}{', ...' if n > 5 else ''}: --k responses "
                             "each)")
        out = []
        for ex, v in zip(examples, values):
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"reward {spec}: example {ex.id}: returned {v!r}, not a number") from None
            if not math.isfinite(v):
                raise ValueError(f"reward {spec}: example {ex.id}: non-finite reward {v}")
            out.append(v)
        return torch.tensor(out, dtype=torch.float32)
    return score


def _blame(spec, fn, examples, images, responses, err) -> str:
    if isinstance(err, ValueError) and "example" in str(err):  # already names its example (e.g. the oracle's scene)
        return str(err)
    for i, ex in enumerate(examples):
        try:
            fn(examples[i:i + 1], images[i:i + 1], responses[i:i + 1])
        except Exception as e:
            return f"reward {spec}: example {ex.id}: raised {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    ids = ", ".join(ex.id for ex in examples[:5]) + (", ..." if len(examples) > 5 else "")
    return f"reward {spec}: raised {type(err).__name__} on the batch of examples {ids}: {err}"


def pair_rewards(rm: RewardModel, examples, encoded, image_root, batch_size: int = 8, device=None):
    """RM rewards of preference pairs: encoded (nanoalign.batch.encode_all with rm.processor and rm.template) ->
    (r_chosen (P,), r_rejected (P,)) float32, in the order of `encoded`."""
    from nanoalign.batch import open_image
    rc, rr = [], []
    for i in range(0, len(encoded), batch_size):
        items = encoded[i:i + batch_size]
        images = [open_image(examples[it.index], image_root) for it in items]
        r = rm.score_batch(collate(items, ["chosen", "rejected"], rm.processor, images), device)
        rc.append(r[:len(items)].cpu())
        rr.append(r[len(items):].cpu())
    return torch.cat(rc), torch.cat(rr)
