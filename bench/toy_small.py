"""The toy default run at a reduced size, same code paths (a world of 200 scenes, a 60-step SFT base that names no
objects yet, 40 DDPO steps of batch 8): it shows the run lines and the plot (docs/curves_toy_small.png), not what
alignment does (the full-size run: train.py --algo ddpo).
    OMP_NUM_THREADS=2 python bench/toy_small.py --algo ddpo --toy-cache /tmp/toy_small --out runs/toy_small --eval-every 5"""
import os
import sys

sys.path.insert(0, os.getcwd())
import train  # noqa: E402
from nanoalign.toy import run  # noqa: E402

SMALL = dict(n_train=200, n_eval=24, vision_steps=10, sft_steps=40, ground_steps=20, eval_max_new_tokens=40)
run.ALIGN["default"] = {"steps": 40, "lr": 1e-4, "batch": 8, "pair_scenes": 40, "samples": 2, "ranked": 3,
                        "temperature": 0.7, "yesno": 2, "sft_weight": 1.0}
args = train.parse_args(sys.argv[1:])
run.default_run(args, train.main, train.parse_args, train.ALGOS, settings=SMALL)
