"""Peer side of bench/bench_rl.py, run in a separate venv with TRL (never imported by nanoalign):
    python bench/trl_rl_peer.py {grpo|rloo} CKPT IMG_DIR STEPS K MAX_NEW PROMPTS_PER_STEP OUT_JSON
TRL's GRPOTrainer / RLOOTrainer on CPU with the same tiny llava checkpoint, prompts, images, k and lengths; the reward
is the number of words of the response. GRPO with loss_type "grpo" (train.py's --grpo-loss default), one update per
generation (TRL's defaults num_iterations 1, steps_per_generation 1), beta 0.04 (GRPO) / 0.05 (RLOO), as train.py.
Writes {"step_s": [...], "step_cpu": process CPU seconds at each step's end, "step_end_rss_mb": peak RSS at the
last step's end, "peak_rss_mb": whole process, "mean_length": mean completion tokens}."""
import json
import resource
import sys
import time

import torch
from datasets import Dataset
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback

algo, ckpt, img_dir, steps, k, max_new, P, out = sys.argv[1:9]
steps, k, max_new, P = int(steps), int(k), int(max_new), int(P)
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

question = [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]
rows = [{"prompt": [{"role": "user", "content": question}],
         "image": Image.open(f"{img_dir}/{i}.png").convert("RGB")} for i in range(16)]
ds = Dataset.from_list(rows)


def length(completions, **kw):
    return [float(len((c[0]["content"] if isinstance(c, list) else c).split())) for c in completions]


class Clock(TrainerCallback):
    def __init__(self):
        self.t, self.times, self.cpu, self.anon = None, [], [], []

    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.t)
        self.cpu.append(time.process_time())  # process CPU seconds at each step's end
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.anon.append([int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("RssAnon:")][0])


Config, Trainer = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
cfg = Config(output_dir=f"{out}.dir", use_cpu=True, per_device_train_batch_size=P * k, num_generations=k,
             max_completion_length=max_new, max_steps=steps, logging_steps=1, report_to=[], save_strategy="no",
             learning_rate=1e-4, beta=0.04 if algo == "grpo" else 0.05, temperature=1.0, bf16=False,
             gradient_accumulation_steps=1, dataloader_num_workers=0,
             **({"loss_type": "grpo"} if algo == "grpo" else {}))
torch.manual_seed(0)
model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
proc = AutoProcessor.from_pretrained(ckpt)
clock = Clock()
tr = Trainer(model=model, reward_funcs=[length], args=cfg, train_dataset=ds, processing_class=proc, callbacks=[clock])
tr.train()
lens = [float(h['completions/mean_length']) for h in tr.state.log_history if 'completions/mean_length' in h]
json.dump({"step_s": clock.times, "mean_length": sum(lens) / max(1, len(lens)), "step_end_rss_mb": clock.rss,
           "step_anon_mb": clock.anon,
           "step_cpu": clock.cpu,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, open(out, "w"))
