"""Write a GPT-2 folder with random weights and a byte-level tokenizer, for runs with no download.

    python scripts/examples/gpt2_folder.py OUT              # GPT-2 124M's sizes, V = 50257
    python scripts/examples/gpt2_folder.py OUT --tiny       # 2 layers, width 16, V = 259

A machine with no network (the lent GPU) has no pretrained GPT-2; this writes one of its shape,
in the Hugging Face layout (``config.json``, ``model.safetensors`` by
:func:`bpjax.models.save_gpt2_pretrained`, ``vocab.json`` + ``merges.txt``) that
``finetune_gpt2.py --from`` and transformers read. The weights are drawn as ``bp.gpt`` draws
them (``train_gpt.init_on_host``: NumPy, seconds even at 124M). The tokenizer is GPT-2's
byte-level BPE scheme with only the 256 byte symbols and three merges ("he", "ll", "hell"):
every text encodes, and ids from 259 up (the rest of a 124M vocabulary) never occur, so a
fine-tune first learns to give them no probability.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax.numpy as jnp

from bpjax.models import save_gpt2_pretrained

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_gpt import build, init_on_host

SIZES = {"124m": {"layers": 12, "dim": 768, "heads": 12, "context": 1024, "vocab_size": 50257},
         "tiny": {"layers": 2, "dim": 16, "heads": 4, "context": 32, "vocab_size": 259}}
MERGES = [("h", "e"), ("l", "l"), ("he", "ll")]


def byte_symbols() -> list:
    """GPT-2's printable stand-in for each byte 0..255: printable Latin-1 bytes stand for
    themselves, the others are shifted to code points from 256 up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def write_byte_level_vocab(folder, merges=MERGES) -> dict:
    """``vocab.json`` (the byte symbols, then one id per merge) and ``merges.txt``; returns the vocabulary."""
    folder = pathlib.Path(folder)
    vocab = {s: i for i, s in enumerate(byte_symbols() + ["".join(m) for m in merges])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return vocab


def write_folder(folder, size: str = "124m", seed: int = 0) -> pathlib.Path:
    """A random GPT-2 folder of ``size`` ("124m" or "tiny") with the byte-level tokenizer."""
    s = SIZES[size]
    model, _ = build(vocab_size=s["vocab_size"], dim=s["dim"], heads=s["heads"], layers=s["layers"],
                     context=s["context"])
    params = init_on_host(model, (s["context"],), seed)
    folder = save_gpt2_pretrained(folder, params, num_heads=s["heads"], dtype=jnp.float32, overwrite=True)
    write_byte_level_vocab(folder)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the folder to write")
    ap.add_argument("--tiny", action="store_true", help="2 layers of width 16 instead of 124M's sizes")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    folder = write_folder(args.out, "tiny" if args.tiny else "124m", args.seed)
    print(f"gpt2_folder: wrote {folder} ({'tiny' if args.tiny else '124m'} sizes, random weights, byte-level tokenizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
