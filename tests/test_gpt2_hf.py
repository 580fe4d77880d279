"""Hugging Face GPT-2 folders and bp.gpt (bpjax/models/gpt2.py): loading, saving, the tokenizer,
every refusal's message, and parity with transformers' GPT2LMHeadModel (llm.c's check: logits,
loss, every gradient by name, AdamW steps). Nothing is downloaded: the folders are built here,
tiny (2 layers, width 16, 4 heads, vocabulary 40, 12 positions), with random weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from test_scripts import ROOT, _load

import bpjax as bp
from bpjax.models import gpt2 as G
from bpjax.models import gpt2_from_pretrained, gpt2_tokenizer, save_gpt2_pretrained

CONFIG = {"model_type": "gpt2", "n_layer": 2, "n_embd": 16, "n_head": 4, "n_positions": 12, "vocab_size": 40,
          "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new", "n_inner": None}


def hf_tensors(config=CONFIG, seed=0, prefix=""):
    """Random GPT-2 tensors by HF's names (no ``transformer.`` prefix: the hub's own files), float32."""
    rng = np.random.default_rng(seed)
    v, p, d, f = config["vocab_size"], config["n_positions"], config["n_embd"], 4 * config["n_embd"]
    one = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
           "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
           "mlp.c_fc.weight": (d, f), "mlp.c_fc.bias": (f,), "mlp.c_proj.weight": (f, d), "mlp.c_proj.bias": (d,)}
    shapes = {"wte.weight": (v, d), "wpe.weight": (p, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    shapes.update({f"h.{i}.{k}": s for i in range(config["n_layer"]) for k, s in one.items()})
    scale_one = lambda k: 1.0 if ".ln_" in f".{k}" and k.endswith(".weight") else 0.0  # layer-norm γ ≈ 1
    return {prefix + k: (0.1 * rng.standard_normal(s) + scale_one(k)).astype(np.float32) for k, s in shapes.items()}


def write_folder(folder, tensors=None, config=CONFIG):
    """config.json and model.safetensors, written with safetensors' own NumPy API when installed."""
    os.makedirs(folder, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = hf_tensors(config) if tensors is None else tensors
    try:
        from safetensors.numpy import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        G.write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    return folder


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "gpt2-tiny")


def test_loading_maps_every_tensor_by_the_table_and_the_model_runs(folder):
    model, params, config = gpt2_from_pretrained(folder)
    t = hf_tensors()
    assert config["n_head"] == 4
    assert params["blocks"]["attn"]["w_qkv"].shape == (2, 16, 48)                  # (L, D, 3D), no transpose
    for hf, path in G.HF_TO_BP.items():
        leaf = G._get(params, path)
        assert leaf.dtype == jnp.float32
        for i in range(2) if "{i}" in hf else [None]:
            want = t[hf.format(i=i)]
            np.testing.assert_array_equal(leaf[i] if i is not None else leaf, want)
    logits, _, _ = model.forward(params, (), jnp.zeros((2, 12), jnp.int32))
    assert logits.shape == (2, 12, 40)


def test_load_save_load_round_trips_exactly_and_never_overwrites_unasked(folder, tmp_path):
    _, params, config = gpt2_from_pretrained(folder, dtype=jnp.float64)
    out = save_gpt2_pretrained(tmp_path / "saved", params, config=config)
    _, again, config2 = gpt2_from_pretrained(out, dtype=jnp.float64)
    for a, b in zip(*(jax_leaves(p) for p in (params, again))):
        assert a.dtype == b.dtype == jnp.float64
        np.testing.assert_array_equal(a, b)
    assert {k: config2[k] for k in CONFIG} == CONFIG
    with pytest.raises(FileExistsError, match=r"save_gpt2_pretrained: expected a folder without config.json, got "
                                              r"one in .*saved \(pass overwrite=True to replace it\)"):
        save_gpt2_pretrained(out, params, config=config)
    save_gpt2_pretrained(out, params, config=config, dtype=np.float32, overwrite=True)
    tensors, meta = G.read_safetensors(out / "model.safetensors")
    assert meta == {"format": "pt"} and tensors["transformer.wte.weight"].dtype == np.float32
    with pytest.raises(ValueError, match="save_gpt2_pretrained: expected num_heads, or a config with n_head, got neither"):
        save_gpt2_pretrained(tmp_path / "other", params)


def jax_leaves(tree):
    import jax
    return jax.tree_util.tree_leaves(tree)


def test_our_safetensors_writer_and_reader_agree_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy", reason="the safetensors package checks our format code")
    tensors = {"a": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.ones((4,), np.float32),
               "c": np.array([1, 2], np.int64)}
    G.write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    theirs = st.load_file(str(tmp_path / "ours.safetensors"))
    st.save_file(tensors, str(tmp_path / "theirs.safetensors"))
    ours, _ = G.read_safetensors(tmp_path / "theirs.safetensors")
    for k, a in tensors.items():
        np.testing.assert_array_equal(theirs[k], a)
        np.testing.assert_array_equal(ours[k], a)
        assert ours[k].dtype == a.dtype


def test_prefixed_names_buffers_and_a_tied_lm_head_are_accepted(tmp_path):
    t = hf_tensors(prefix="transformer.")
    t["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 12, 12), np.float32))   # old checkpoints' mask buffer
    t["lm_head.weight"] = t["transformer.wte.weight"].copy()
    _, params, _ = gpt2_from_pretrained(write_folder(tmp_path / "f", t))
    np.testing.assert_array_equal(params["tok"]["table"], t["lm_head.weight"])


def _edit(t, **changes):
    t = dict(t)
    for k, v in changes.items():
        if v is None:
            del t[k]
        else:
            t[k] = v
    return t


# (what is wrong, config changes, tensors changed, the message expected)
REFUSALS = [
    ("activation", {"activation_function": "relu"}, None,
     ("gpt2_from_pretrained: expected config.json's activation_function to be 'gelu_new' (GELU's tanh approximation, "
     "bp.gpt's), got 'relu'")),
    ("untied config", {"tie_word_embeddings": False}, None,
     ("gpt2_from_pretrained: expected config.json's tie_word_embeddings to be true (bp.gpt ties the unembedding to wte), "
     "got False")),
    ("layer-idx scaling", {"scale_attn_by_inverse_layer_idx": True}, None,
     ("gpt2_from_pretrained: expected config.json's scale_attn_by_inverse_layer_idx to be false (bp.gpt's blocks all "
     "scale their scores alike), got True")),
    ("unscaled attention", {"scale_attn_weights": False}, None,
     ("gpt2_from_pretrained: expected config.json's scale_attn_weights to be true (bp.gpt scales the scores by "
     "1/sqrt(head size)), got False")),
    ("n_inner", {"n_inner": 20}, None,
     "gpt2_from_pretrained: expected config.json's n_inner to be null or a multiple of n_embd=16, got 20"),
    ("missing size", {"n_head": None}, None,
     "gpt2_from_pretrained: expected config.json to have 'n_head', got the keys"),
    ("untied lm_head", {}, {"lm_head.weight": np.zeros((40, 16), np.float32)},
     "gpt2_from_pretrained: expected 'lm_head.weight' equal to 'wte.weight' (bp.gpt ties them), got an untied lm_head"),
    ("missing tensor", {}, {"h.1.mlp.c_fc.bias": None},
     "gpt2_from_pretrained: expected the tensor 'h.1.mlp.c_fc.bias', got a checkpoint without it"),
    ("extra tensor", {}, {"h.2.ln_1.weight": np.ones((16,), np.float32)},
     "gpt2_from_pretrained: expected only GPT-2's tensors for n_layer=2, got the extra tensor 'h.2.ln_1.weight'"),
    ("wrong shape", {}, {"h.0.attn.c_attn.weight": np.ones((48, 16), np.float32)},
     "gpt2_from_pretrained: expected 'h.0.attn.c_attn.weight' of shape (16, 48), got (48, 16)"),
]


@pytest.mark.parametrize("what, config, tensors, message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_each_mismatch_is_refused_in_one_line_naming_its_key(tmp_path, what, config, tensors, message):
    cfg = {k: v for k, v in {**CONFIG, **config}.items() if v is not None or k == "n_inner"}
    t = _edit(hf_tensors(), **(tensors or {}))
    with pytest.raises(ValueError) as e:
        gpt2_from_pretrained(write_folder(tmp_path / "f", t, cfg))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_folder_without_weights_or_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="gpt2_from_pretrained: expected a Hugging Face folder with config.json"):
        gpt2_from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match="gpt2_from_pretrained: expected model.safetensors or "
                                                "pytorch_model.bin in .*, got neither"):
        gpt2_from_pretrained(tmp_path)


def test_pytorch_model_bin_loads_the_same_params(tmp_path, folder):
    torch = pytest.importorskip("torch", reason="pytorch_model.bin is read with torch.load")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps(CONFIG))
    torch.save({k: torch.from_numpy(v) for k, v in hf_tensors().items()}, tmp_path / "bin" / "pytorch_model.bin")
    _, a, _ = gpt2_from_pretrained(folder)
    _, b, _ = gpt2_from_pretrained(tmp_path / "bin")
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        np.testing.assert_array_equal(x, y)


def _byte_level_vocab(folder):
    """A tiny byte-level BPE: the 256 byte symbols (GPT-2's byte→unicode map) and 3 merges."""
    return _load("gpt2_folder").write_byte_level_vocab(folder)


def test_the_tokenizer_reads_vocab_and_merges_or_tokenizer_json(tmp_path):
    pytest.importorskip("tokenizers", reason="gpt2_tokenizer needs the tokenizers package")
    vocab = _byte_level_vocab(tmp_path)
    tok = gpt2_tokenizer(tmp_path)
    ids = tok.encode("hello hi").ids
    assert ids[0] == vocab["hell"] and ids[1] == vocab["o"] and ids[2] == vocab["Ġ"]
    assert tok.decode(ids) == "hello hi"
    (tmp_path / "j").mkdir()
    tok.save(str(tmp_path / "j" / "tokenizer.json"))
    assert gpt2_tokenizer(tmp_path / "j").encode("hello hi").ids == ids
    with pytest.raises(FileNotFoundError, match="gpt2_tokenizer: expected tokenizer.json, or vocab.json and merges.txt"):
        gpt2_tokenizer(tmp_path / "nothing")


def test_the_tokenizer_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=r"gpt2_tokenizer: .*\(pip install tokenizers\)"):
        gpt2_tokenizer(tmp_path)


def test_parity_with_transformers_in_float64_logits_loss_every_gradient_and_adamw():
    pytest.importorskip("torch", reason="the parity check runs transformers' GPT2LMHeadModel (torch)")
    pytest.importorskip("transformers", reason="the parity check runs transformers' GPT2LMHeadModel")
    import tempfile
    parity = _load("gpt2_parity")
    sizes = {"n_layer": 2, "n_embd": 16, "n_head": 4, "vocab_size": 40, "n_positions": 12}
    hf = parity.hf_model(sizes, "float64", seed=1)
    ids = np.random.default_rng(1).integers(0, 40, (2, 10))
    with tempfile.TemporaryDirectory() as d:
        diffs = parity.compare(hf, d, ids, dtype="float64", steps=5)
    assert len([k for k in diffs if k.startswith("grad ")]) == 4 + 2 * 12          # every tensor, by name
    assert {k: v for k, v in diffs.items() if not v <= 1e-10} == {}


def test_transformers_loads_what_we_save_and_computes_our_logits(folder, tmp_path):
    torch = pytest.importorskip("torch", reason="GPT2LMHeadModel runs on torch")
    transformers = pytest.importorskip("transformers", reason="the saved folder is loaded by GPT2LMHeadModel")
    model, params, config = gpt2_from_pretrained(folder, dtype=jnp.float64)
    out = save_gpt2_pretrained(tmp_path / "saved", params, config=config)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float64).eval()
    ids = np.random.default_rng(2).integers(0, 40, (2, 12))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()
    ours, _, _ = model.forward(params, (), jnp.asarray(ids))
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_the_parity_script_passes_tiny_in_float32():
    pytest.importorskip("torch", reason="gpt2_parity.py runs transformers' GPT2LMHeadModel (torch)")
    pytest.importorskip("transformers", reason="gpt2_parity.py runs transformers' GPT2LMHeadModel")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmarks" / "gpt2_parity.py"), "--tiny", "--steps", "2"],
                       capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gpt2_parity: PASS" in r.stdout and "tolerance 0.0001" in r.stdout


def test_bp_loss_is_the_mean_over_every_shifted_prediction(folder):
    """HF's labels= loss is the mean over the N·(T−1) shifted predictions; so is this one."""
    model, params, _ = gpt2_from_pretrained(folder, dtype=jnp.float64)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (3, 9)))
    logits, _, _ = model.forward(params, (), ids)
    logp = logits[:, :-1] - jnp.log(jnp.sum(jnp.exp(logits[:, :-1]), -1, keepdims=True))
    want = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))
    (value, _), _ = bp.value_and_grad(model, bp.softmax_cross_entropy())(params, (), ids[:, :-1], ids[:, 1:])
    np.testing.assert_allclose(value, want, rtol=1e-12)
