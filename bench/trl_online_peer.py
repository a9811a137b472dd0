"""Peer side of bench/bench_online.py, run in a separate venv with TRL (never imported by nanoalign):
    python bench/trl_online_peer.py CKPT IMG_DIR STEPS MAX_NEW PROMPTS_PER_STEP OUT_JSON
TRL's OnlineDPOTrainer (trl.experimental.online_dpo in TRL 1.x) on CPU with the same tiny llava checkpoint, prompts,
images and lengths as train.py --algo online-dpo: 2 samples per prompt at temperature 1.0 (top-p 1), the sigmoid
(DPO) loss with beta 0.1, lr 1e-4, a frozen reference copy (no PEFT), and as the judge the same rule as ours: a reward
function = the number of characters of the decoded response (the longer one is chosen; TRL keeps a tie with the
first sample chosen, ours drops it). Writes {"step_s": [...], "step_cpu": process CPU seconds at each step's end,
"step_end_rss_mb", "peak_rss_mb", "mean_length": mean completion tokens}."""
import json
import resource
import sys
import time
import warnings

import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback

ckpt, img_dir, steps, max_new, P, out = sys.argv[1:7]
steps, max_new, P = int(steps), int(max_new), int(P)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the experimental module's warning
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer  # noqa: E402

question = [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]
rows = [{"prompt": [{"role": "user", "content": question}],
         "image": Image.open(f"{img_dir}/{i}.png").convert("RGB")} for i in range(16)]
ds = Dataset.from_list(rows)
lengths = []


def chars(prompts, completions, completion_ids, **kw):
    """The judge: the number of characters of each decoded response (ours: the same, nanoalign.annotate.Annotator
    with this score)."""
    lengths.extend(len(ids) for ids in completion_ids)
    return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]


class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.times, self.cpu, self.rss, self.anon = None, [], [], None, []

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)
        self.cpu.append(time.process_time())
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.anon.append([int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("RssAnon:")][0])


cfg = OnlineDPOConfig(output_dir=f"{out}.dir", use_cpu=True, per_device_train_batch_size=P, max_new_tokens=max_new,
                      max_steps=steps, logging_steps=1, report_to=[], save_strategy="no", learning_rate=1e-4,
                      beta=0.1, loss_type="sigmoid", temperature=1.0, top_p=1.0, bf16=False,
                      gradient_accumulation_steps=1, dataloader_num_workers=0)
torch.manual_seed(0)
model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
ref = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
proc = AutoProcessor.from_pretrained(ckpt)
clock = Clock()
tr = OnlineDPOTrainer(model=model, ref_model=ref, reward_funcs=[chars], args=cfg, train_dataset=ds,
                      processing_class=proc, callbacks=[clock])
tr.train()
json.dump({"step_s": clock.times, "step_cpu": clock.cpu, "step_end_rss_mb": clock.rss, "step_anon_mb": clock.anon,
           "mean_length": sum(lengths) / max(1, len(lengths)),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, open(out, "w"))
