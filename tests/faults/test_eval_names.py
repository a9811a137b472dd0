"""Seam: nanoalign.eval's stored results (reused across calls into one --out)."""
import shutil

from nanoalign import eval as E
from safetensors.torch import load_file, save_file


def _pope(tmp_path):
    from test_eval import make_images, write_jsonl
    make_images(tmp_path / "imgs", ["a.jpg"])
    write_jsonl(tmp_path / "pope.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?",
                                            "label": "yes"},
                                           {"question_id": 2, "image": "a.jpg", "text": "Is there a cat?",
                                            "label": "no"}])
    return ["--task", "pope", "--data", str(tmp_path / "pope.jsonl"), "--image-root", str(tmp_path / "imgs"),
            "--out", str(tmp_path / "out"), "--no-progress"]


def test_two_models_with_one_folder_name(world, tmp_path, monkeypatch, capsys):
    """A second model whose checkpoint folder has the same name (every run's is `final`) evaluated into the same
    --out -> its answers are computed, never the first model's reused: results are keyed by content fingerprint."""
    for run, scale in (("a", 1.0), ("b", 2.0)):
        shutil.copytree(world / "ckpt", tmp_path / run / "final")
        f = tmp_path / run / "final" / "model.safetensors"
        sd = load_file(str(f))
        save_file({k: v * scale for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    answers = {"a": "yes", "b": "no"}  # a answers yes to both, b no to both
    calls = []

    def fake(d, max_new, bs, template="vicuna_v1"):
        run = d.split("/")[-2]
        return lambda images, prompts: calls.append(run) or [answers[run]] * len(prompts)
    monkeypatch.setattr(E, "model_generate_fn", fake)
    args = _pope(tmp_path)
    assert E.main(["--model", str(tmp_path / "a" / "final"), *args]) == 0
    assert E.main(["--model", str(tmp_path / "b" / "final"), *args]) == 0
    assert calls == ["a", "b"]
    out = capsys.readouterr().out.splitlines()
    rows = [ln for ln in out if ln.startswith("| final")]
    assert rows[0] != rows[1]  # yes_ratio 100 vs 0
    assert E.main(["--model", str(tmp_path / "a" / "final"), *args]) == 0  # same content: reused, no generation
    assert calls == ["a", "b"]


def test_names_given_and_refused(world, tmp_path, monkeypatch, capsys):
    """--name per model -> the results folders and table rows carry it; two models given one name in one call ->
    refused with one line, exit 2."""
    shutil.copytree(world / "ckpt", tmp_path / "m")
    monkeypatch.setattr(E, "model_generate_fn",
                        lambda d, max_new, bs, template="vicuna_v1": lambda ims, ps: ["yes"] * len(ps))
    args = _pope(tmp_path)
    m = str(tmp_path / "m")
    assert E.main(["--model", m, m, "--name", "x", "x", *args]) == 2
    assert "--name x: given to more than one model" in capsys.readouterr().err
    assert E.main(["--model", m, m, "--name", "x", *args]) == 2
    assert E.main(["--model", m, m, "--name", "base", "dpo", *args]) == 0
    assert "| base |" in capsys.readouterr().out and (tmp_path / "out" / "dpo" / "summary.json").is_file()
