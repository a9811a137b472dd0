"""The built-in toy visual world: train.py's default run when neither --model nor --data is given.

    world     scenes, their drawing and their text (captions, short QA, existence questions)
    oracle    the toy's reward and annotator: parse a response, score it, correct it, rank responses
    files     the world on disk (SFT / POPE / CHAIR files), its tokenizer, the tiny LLaVA configs
    base      the SFT base model's recipe (cached), and the toy pipeline's rank helpers
    pairs     preference pairs per algorithm from ground truth
    evaluate  CHAIR / POPE / yes/no probe before and after
    run       the default run: settings as train.py defaults, the pipeline, the summary

The recipe and why it is built this way: docs/toy_world.md. Nothing is imported here, so that
`from nanoalign.toy.oracle import oracle_score` pulls in neither PIL nor torch.
"""
