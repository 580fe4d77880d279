"""scripts/examples/finetune_gpt2.py on a tiny GPT-2 folder built by scripts/examples/gpt2_folder.py
(2 layers, width 16, a byte-level vocabulary of 259): it fine-tunes, saves a folder that loads back, resumes bit for
bit from a checkpoint, and refuses mixed runs and bad options in one line."""
from __future__ import annotations

import json
import pathlib
import shutil
import sysconfig

import jax
import numpy as np
import pytest
from test_scripts import _load

from bpjax.models import gpt2_from_pretrained

pytest.importorskip("tokenizers", reason="the fine-tune reads the folder's tokenizer with the tokenizers package")
ft = _load("finetune_gpt2")

OPTIONS = {"steps": 6, "batch_tokens": 256, "micro_batch": 4, "context": 32, "eval_every": 3, "eval_batches": 2, "print_every": 3,
               "checkpoint_every": 3, "lr": 1e-3, "warmup": 1, "peak_n": 64}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    folder = _load("gpt2_folder").write_folder(root / "model", "tiny")      # random weights, byte-level BPE
    text = root / "text.txt"
    text.write_text(pathlib.Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text())    # about 20k tokens
    return root, folder, text


def leaves(tree):
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(tree)]


def test_it_fine_tunes_saves_a_loadable_folder_and_resumes_bit_for_bit(inputs, capsys):
    root, folder, text = inputs
    a = ft.finetune(from_folder=folder, text=text, out=root / "a", **OPTIONS)
    out = capsys.readouterr().out
    assert "tokens/s" in out and "MFU" in out and "validation loss" in out
    assert a["history"]["step"] == list(range(1, 7)) and a["history"]["val_step"] == [3, 6]
    assert a["history"]["train_loss"][-1] < a["history"]["train_loss"][0]          # it learns
    assert (root / "a" / "curves.png").stat().st_size > 0
    _, loaded, _ = gpt2_from_pretrained(root / "a" / "hf")
    assert all(np.array_equal(x, y) for x, y in zip(leaves(loaded), leaves(a["params"])))

    shutil.copytree(root / "a", root / "b")                  # stopped after step 3's checkpoint
    shutil.rmtree(root / "b" / "checkpoints" / "6")
    shutil.rmtree(root / "b" / "hf")
    b = ft.finetune(from_folder=folder, text=text, out=root / "b", resume=True, **OPTIONS)
    assert "resuming" in capsys.readouterr().out
    assert all(np.array_equal(x, y) for x, y in zip(leaves(b["params"]), leaves(a["params"])))
    assert (root / "b" / "metrics.jsonl").read_text() == (root / "a" / "metrics.jsonl").read_text()
    assert b["history"] == a["history"]


def test_bfloat16_compute_keeps_float32_master_weights(inputs):
    root, folder, text = inputs
    r = ft.finetune(from_folder=folder, text=text, out=root / "bf16", dtype="bfloat16",
                    **{**OPTIONS, "steps": 2, "eval_every": 2})
    assert all(x.dtype == np.float32 for x in leaves(r["params"]))
    assert np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"])


def _main(capsys, *argv):
    code = ft.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def test_mixed_runs_and_bad_options_are_refused_in_one_line(inputs, capsys):
    root, folder, text = inputs
    base = ["--from", folder, "--text", text, "--steps", 2, "--batch-tokens", 256, "--micro-batch", 4,
            "--context", 32, "--peak-n", 64]
    run = root / "refusals"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"format": 1, "arguments": {"lr": 0.5}}))
    cases = [
        (["--out", run], "already holds a run; pass --resume to continue it or --overwrite"),
        (["--out", run, "--resume"], "--resume expected the arguments of the run"),
        (["--out", run, "--resume", "--overwrite"], "expected --resume or --overwrite, got both"),
        (["--out", root / "x", "--batch-tokens", 100], "expected --batch-tokens a multiple of"),
        (["--out", root / "x", "--context", 64], "expected --context ≤ the model's 32 positions, got 64"),
        (["--out", root / "x", "--text", root / "none.txt"], "expected --text to be a text file"),
        (["--out", root / "x", "--from", root], "--from: gpt2_from_pretrained: expected a Hugging Face folder"),
    ]
    for extra, message in cases:
        code, err = _main(capsys, *base, *extra)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (root / "x").exists()                        # nothing was started
