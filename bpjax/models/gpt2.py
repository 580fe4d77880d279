"""Hugging Face GPT-2 folders in and out of :func:`bpjax.gpt`: load, save, tokenizer.

A folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``), as
``transformers.GPT2LMHeadModel.save_pretrained`` writes it. :func:`bpjax.gpt` is GPT-2's
architecture, so every tensor maps to one param leaf with no change of layout: HF's ``Conv1D``
stores its weight as (in, out) and computes ``x @ W + b``, exactly as :func:`bpjax.dense` and
the attention's ``w_qkv`` (D, 3D) (columns ``[q | k | v]``, each ``[head 1 | … | head h]``) and
``w_o`` (D, D) do. The one table that says so is :data:`HF_TO_BP`.

Usage (nothing is downloaded; point it at a folder you have)::

    model, params, config = gpt2_from_pretrained("gpt2-folder", dtype=jnp.float32)
    logits, _, _ = model.forward(params, (), ids)                    # (N, T, V)
    save_gpt2_pretrained("gpt2-tuned", params, config=config)
    tokenizer = gpt2_tokenizer("gpt2-folder")                        # needs `tokenizers`

The safetensors format is read and written here, without a dependency: 8 bytes of little-endian
u64 header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}``, then the raw little-endian bytes, offsets relative to the data start.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import struct
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .._core import Layer

__all__ = [
    "HF_TO_BP",
    "gpt2_from_pretrained",
    "gpt2_params_from_state_dict",
    "gpt2_state_dict",
    "gpt2_tokenizer",
    "read_safetensors",
    "save_gpt2_pretrained",
    "write_safetensors",
]

#: HF GPT-2 tensor name → bpjax param path, per block ``{i}`` (stacked on the blocks' axis L) or
#: whole. Shapes (V vocab, P positions, D width, F = 4D the MLP's): no tensor is transposed.
HF_TO_BP: dict[str, tuple[str, ...]] = {
    "wte.weight": ("tok", "table"),                       # (V, D), also the tied unembedding
    "wpe.weight": ("pos",),                               # (P, D)
    "h.{i}.ln_1.weight": ("blocks", "ln1", "scale"),      # (D,)
    "h.{i}.ln_1.bias": ("blocks", "ln1", "bias"),         # (D,)
    "h.{i}.attn.c_attn.weight": ("blocks", "attn", "w_qkv"),  # (D, 3D), Conv1D (in, out)
    "h.{i}.attn.c_attn.bias": ("blocks", "attn", "b_qkv"),    # (3D,)
    "h.{i}.attn.c_proj.weight": ("blocks", "attn", "w_o"),    # (D, D), Conv1D (in, out)
    "h.{i}.attn.c_proj.bias": ("blocks", "attn", "b_o"),      # (D,)
    "h.{i}.ln_2.weight": ("blocks", "ln2", "scale"),      # (D,)
    "h.{i}.ln_2.bias": ("blocks", "ln2", "bias"),         # (D,)
    "h.{i}.mlp.c_fc.weight": ("blocks", "fc", "w"),       # (D, F), Conv1D (in, out)
    "h.{i}.mlp.c_fc.bias": ("blocks", "fc", "b"),         # (F,)
    "h.{i}.mlp.c_proj.weight": ("blocks", "proj", "w"),   # (F, D), Conv1D (in, out)
    "h.{i}.mlp.c_proj.bias": ("blocks", "proj", "b"),     # (D,)
    "ln_f.weight": ("ln_f", "scale"),                     # (D,)
    "ln_f.bias": ("ln_f", "bias"),                        # (D,)
}

# Old checkpoints also store attention buffers (the causal mask and its fill value), not weights.
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")            # both are GELU's tanh approximation

# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a ``.safetensors`` file, by name, as NumPy arrays, and its metadata."""
    data = pathlib.Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"read_safetensors: expected a safetensors file, got {len(data)} bytes in {path}")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"read_safetensors: expected a header of {n} bytes, got a file of {len(data)} bytes: {path}")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"read_safetensors: expected a dtype in {sorted(_ST_DTYPES)}, "
                             f"got {info['dtype']!r} for {name!r} in {path}")
        begin, end = info["data_offsets"]
        dt = np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(body[begin:end], dtype=dt).reshape(info["shape"]).copy()
    return out, meta


def write_safetensors(path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name → array) as one ``.safetensors`` file, in name order, the header
    padded with spaces to 8 bytes (what the format's own writer does)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    chunks, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        if a.dtype not in _ST_NAMES:
            raise ValueError(f"write_safetensors: expected a dtype among {sorted(map(str, _ST_NAMES))}, "
                             f"got {a.dtype} for {name!r}")
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for raw in chunks:
            f.write(raw)


# ----------------------------------------------------------------------------- config


def _sizes(config: dict[str, Any]) -> dict[str, Any]:
    """The :func:`bpjax.gpt` arguments of an HF GPT-2 config, refusing what gpt does not compute."""
    name = "gpt2_from_pretrained"
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
        if key not in config:
            raise ValueError(f"{name}: expected config.json to have {key!r}, got the keys {sorted(config)}")
    checks = [("model_type", config.get("model_type", "gpt2") == "gpt2", "'gpt2'"),
              ("activation_function", config.get("activation_function", "gelu_new") in _GELU_TANH,
               "'gelu_new' (GELU's tanh approximation, bp.gpt's)"),
              ("tie_word_embeddings", config.get("tie_word_embeddings", True) is True,
               "true (bp.gpt ties the unembedding to wte)"),
              ("scale_attn_weights", config.get("scale_attn_weights", True) is True,
               "true (bp.gpt scales the scores by 1/sqrt(head size))"),
              ("scale_attn_by_inverse_layer_idx", config.get("scale_attn_by_inverse_layer_idx", False) is False,
               "false (bp.gpt's blocks all scale their scores alike)"),
              ("add_cross_attention", config.get("add_cross_attention", False) is False, "false")]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"{name}: expected config.json's {key} to be {expected}, got {config.get(key)!r}")
    dim, inner = config["n_embd"], config.get("n_inner")
    if inner is not None and inner % dim:
        raise ValueError(f"{name}: expected config.json's n_inner to be null or a multiple of n_embd={dim}, "
                         f"got {inner!r}")
    # reorder_and_upcast_attn only changes the attention's floating-point order (float32 scores), not its value.
    return {"vocab_size": config["vocab_size"], "dim": dim, "num_heads": config["n_head"],
            "num_layers": config["n_layer"], "max_len": config["n_positions"],
            "mlp_ratio": 4 if inner is None else inner // dim, "eps": config.get("layer_norm_epsilon", 1e-5)}


def _shapes(s: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each HF tensor's expected shape (one block's, for the ``h.{i}`` names)."""
    v, p, d, f = s["vocab_size"], s["max_len"], s["dim"], s["mlp_ratio"] * s["dim"]
    return {"wte.weight": (v, d), "wpe.weight": (p, d), "h.{i}.ln_1.weight": (d,), "h.{i}.ln_1.bias": (d,),
            "h.{i}.attn.c_attn.weight": (d, 3 * d), "h.{i}.attn.c_attn.bias": (3 * d,),
            "h.{i}.attn.c_proj.weight": (d, d), "h.{i}.attn.c_proj.bias": (d,),
            "h.{i}.ln_2.weight": (d,), "h.{i}.ln_2.bias": (d,),
            "h.{i}.mlp.c_fc.weight": (d, f), "h.{i}.mlp.c_fc.bias": (f,),
            "h.{i}.mlp.c_proj.weight": (f, d), "h.{i}.mlp.c_proj.bias": (d,),
            "ln_f.weight": (d,), "ln_f.bias": (d,)}


# ----------------------------------------------------------------------------- tensors ↔ params


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def gpt2_params_from_state_dict(tensors: dict[str, np.ndarray], config: dict[str, Any], *,
                                dtype=jnp.float32) -> dict[str, Any]:
    """:func:`bpjax.gpt` params from HF GPT-2 tensors (name → array), checked name by name.

    Names may carry the ``transformer.`` prefix (GPT2LMHeadModel's) or not (GPT2Model's); a
    ``lm_head.weight`` must equal ``wte.weight`` (bp.gpt's unembedding is tied). Block tensors
    ``h.{i}.…`` are stacked on a leading axis L, as bp.gpt stores its blocks."""
    name = "gpt2_from_pretrained"
    s = _sizes(config)
    shapes, layers = _shapes(s), s["num_layers"]
    t = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    lm_head = t.pop("lm_head.weight", None)
    expected = {hf.format(i=i) for hf in HF_TO_BP for i in range(layers)}
    extra = sorted(k for k in t if k not in expected and not _BUFFER.fullmatch(k))
    if extra:
        raise ValueError(f"{name}: expected only GPT-2's tensors for n_layer={layers}, got the extra "
                         f"tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    missing = sorted(expected - set(t))
    if missing:
        raise ValueError(f"{name}: expected the tensor {missing[0]!r}, got a checkpoint without it"
                         + (f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    for k, shape in ((hf.format(i=i), shapes[hf]) for hf in HF_TO_BP for i in range(layers)):
        if tuple(t[k].shape) != shape:
            raise ValueError(f"{name}: expected {k!r} of shape {shape}, got {tuple(t[k].shape)}")
    if lm_head is not None and not (lm_head.shape == t["wte.weight"].shape and np.array_equal(lm_head, t["wte.weight"])):
        raise ValueError(f"{name}: expected 'lm_head.weight' equal to 'wte.weight' (bp.gpt ties them), "
                         "got an untied lm_head")
    params: dict[str, Any] = {}
    for hf, path in HF_TO_BP.items():
        if "{i}" in hf:
            a = np.stack([t[hf.format(i=i)] for i in range(layers)])     # (L, ...)
        else:
            a = t[hf]
        _set(params, path, jnp.asarray(a, dtype=dtype))
    return params


def gpt2_state_dict(params: dict[str, Any], *, dtype=None, prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """HF GPT-2 tensors (name → NumPy array) from :func:`bpjax.gpt` params: the inverse of
    :func:`gpt2_params_from_state_dict`, the blocks unstacked. ``dtype``: cast to it (default:
    keep the params' dtype). Also maps gradients of the params to HF's names."""
    layers = _get(params, ("blocks", "ln1", "scale")).shape[0]
    out = {}
    for hf, path in HF_TO_BP.items():
        a = np.asarray(_get(params, path))
        if dtype is not None:
            a = a.astype(dtype)
        if "{i}" in hf:
            for i in range(layers):
                out[prefix + hf.format(i=i)] = a[i]
        else:
            out[prefix + hf] = a
    return out


# ----------------------------------------------------------------------------- folders


def _read_config(folder: pathlib.Path, name: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{name}: expected a Hugging Face folder with config.json, got none in {folder}")
    return json.loads(path.read_text())


def gpt2_from_pretrained(folder, *, dtype=jnp.float32, **gpt_kwargs) -> tuple[Layer, dict[str, Any], dict[str, Any]]:
    """Load a local Hugging Face GPT-2 folder as :func:`bpjax.gpt`, to run or fine-tune it here.

    Reads ``config.json`` and ``model.safetensors`` (or, without it, ``pytorch_model.bin``, which
    needs torch). Sizes come from the config: ``vocab_size`` V, ``n_embd`` D, ``n_head``,
    ``n_layer`` L, ``n_positions``, ``n_inner`` (null: 4D), ``layer_norm_epsilon``.

    Args:
      folder: the folder's path.
      dtype: the params' dtype (and the model's ``param_dtype``).
      **gpt_kwargs: more :func:`bpjax.gpt` options (``lean``, ``block_size``, ``attention_impl``).

    Returns:
      ``(model, params, config)``: the Layer (ids (N, T) → logits (N, T, V)), its params
      (``{"tok": {"table": (V, D)}, "pos": (P, D), "blocks": …, "ln_f": …}``) and the config dict.

    Raises ValueError, one line naming the key, when the checkpoint is not bp.gpt's
    architecture: another activation, untied embeddings, per-layer attention scaling, cross
    attention, a missing or extra tensor, a wrong shape.
    """
    from ..layers.attention import gpt

    name = "gpt2_from_pretrained"
    folder = pathlib.Path(folder)
    config = _read_config(folder, name)
    sizes = _sizes(config)
    if (folder / "model.safetensors").is_file():
        tensors, _ = read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise ImportError(f"{name}: expected model.safetensors, or torch to read pytorch_model.bin, got "
                              f"neither in {folder} (pip install torch, or convert the file to safetensors)") from None
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        tensors = {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}
    else:
        raise FileNotFoundError(f"{name}: expected model.safetensors or pytorch_model.bin in {folder}, got neither")
    params = gpt2_params_from_state_dict(tensors, config, dtype=dtype)
    model = gpt(sizes.pop("vocab_size"), **sizes, param_dtype=dtype, **gpt_kwargs)
    return model, params, config


def save_gpt2_pretrained(folder, params: dict[str, Any], *, config: dict[str, Any] | None = None,
                         num_heads: int | None = None, eps: float | None = None, dtype=None,
                         overwrite: bool = False) -> pathlib.Path:
    """Write :func:`bpjax.gpt` params as a Hugging Face GPT-2 folder (``config.json`` and
    ``model.safetensors``) that ``transformers.GPT2LMHeadModel.from_pretrained`` loads.

    Args:
      folder: created if absent; its two files are never replaced unless ``overwrite=True``.
      params: bp.gpt's params; the sizes (V, D, L, positions, MLP width) are read from them.
      config: the config to start from (e.g. the one :func:`gpt2_from_pretrained` returned, so
        token ids and the other fields carry over); the sizes replace its own.
      num_heads, eps: the heads and layer-norm epsilon, when ``config`` has none (params cannot
        say how many heads there are).
      dtype: the tensors' dtype in the file (default: the params').

    Returns the folder's path.
    """
    name = "save_gpt2_pretrained"
    folder = pathlib.Path(folder)
    existing = [f for f in ("config.json", "model.safetensors") if (folder / f).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{name}: expected a folder without {existing[0]}, got one in {folder} "
                              "(pass overwrite=True to replace it)")
    cfg = dict(config or {})
    if num_heads is not None:
        cfg["n_head"] = int(num_heads)
    if eps is not None:
        cfg["layer_norm_epsilon"] = float(eps)
    if "n_head" not in cfg:
        raise ValueError(f"{name}: expected num_heads, or a config with n_head, got neither")
    v, d = params["tok"]["table"].shape
    layers, f = params["blocks"]["fc"]["w"].shape[0], params["blocks"]["fc"]["w"].shape[-1]
    if d % cfg["n_head"]:
        raise ValueError(f"{name}: expected n_head dividing n_embd={d}, got n_head={cfg['n_head']}")
    tensors = gpt2_state_dict(params, dtype=dtype)
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=int(v), n_embd=int(d),
               n_layer=int(layers), n_positions=int(params["pos"].shape[0]), n_inner=None if f == 4 * d else int(f),
               activation_function=cfg.get("activation_function", "gelu_new"), tie_word_embeddings=True,
               layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5))
    cfg.setdefault("n_ctx", cfg["n_positions"])
    cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype)
    _sizes(cfg)                                                     # what we write, we can read back
    os.makedirs(folder, exist_ok=True)
    write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return folder


def gpt2_tokenizer(folder):
    """The folder's GPT-2 byte-level BPE tokenizer, as a ``tokenizers.Tokenizer``
    (``.encode(text).ids``, ``.decode(ids)``), from ``tokenizer.json`` or ``vocab.json`` +
    ``merges.txt``. Needs the ``tokenizers`` package (``pip install tokenizers``)."""
    name = "gpt2_tokenizer"
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"{name}: expected the tokenizers package to read a tokenizer, got none installed "
                          "(pip install tokenizers)") from None
    folder = pathlib.Path(folder)
    if (folder / "tokenizer.json").is_file():
        return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from tokenizers import decoders, models, pre_tokenizers
        tok = tokenizers.Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    raise FileNotFoundError(f"{name}: expected tokenizer.json, or vocab.json and merges.txt, in {folder}, got neither")
