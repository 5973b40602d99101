"""Hugging Face GPT-2 checkpoints: `import_gpt2` a folder into a run directory, `export_gpt2` one back.

`_hf_names` is the name mapping (HF Conv1D weights are already `[in, out]`, like Keras `Dense`
kernels; `lm_head.weight` is tied to `wte.weight`). safetensors are read with NumPy alone;
`pytorch_model.bin` only through `torch.load(weights_only=True)`.
"""

import json
import os
import re
import struct

import numpy as np

from kgpt import files
from kgpt.config import ModelConfig, TrainConfig
from kgpt.data.config import DataConfig
from kgpt.model.gpt import GPT
from kgpt.model.saving import save_model
from kgpt.recipe import Recipe
from kgpt.rundir import FINAL_MODEL, RunDirectory
from kgpt.tokenizers.bpe import load_gpt2_tokenizer

SAFETENSORS_FILENAME = "model.safetensors"
SAFETENSORS_INDEX_FILENAME = "model.safetensors.index.json"
PYTORCH_FILENAME = "pytorch_model.bin"
HF_CONFIG_FILENAME = "config.json"
# GELU spellings that are the tanh approximation kgpt's FeedForward computes.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Legacy causal-mask buffers, not weights.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def _hf_names(config):
    """{HF tensor name (unprefixed): (kgpt weight path, expected shape)} for a `ModelConfig`."""
    h, i = config.hidden_dim, config.intermediate_dim
    names = {
        "wte.weight": ("embeddings/token_embedding/embeddings", (config.vocabulary_size, h)),
        "wpe.weight": ("embeddings/position_embedding/embeddings", (config.sequence_length, h)),
        "ln_f.weight": ("final_norm/gamma", (h,)),
        "ln_f.bias": ("final_norm/beta", (h,)),
    }
    for n in range(config.num_layers):
        for hf, kgpt, shape in [
            ("ln_1.weight", "attention_norm/gamma", (h,)),
            ("ln_1.bias", "attention_norm/beta", (h,)),
            ("attn.c_attn.weight", "attention/qkv/kernel", (h, 3 * h)),
            ("attn.c_attn.bias", "attention/qkv/bias", (3 * h,)),
            ("attn.c_proj.weight", "attention/output/kernel", (h, h)),
            ("attn.c_proj.bias", "attention/output/bias", (h,)),
            ("ln_2.weight", "feed_forward_norm/gamma", (h,)),
            ("ln_2.bias", "feed_forward_norm/beta", (h,)),
            ("mlp.c_fc.weight", "feed_forward/intermediate/kernel", (h, i)),
            ("mlp.c_fc.bias", "feed_forward/intermediate/bias", (i,)),
            ("mlp.c_proj.weight", "feed_forward/output/kernel", (i, h)),
            ("mlp.c_proj.bias", "feed_forward/output/bias", (h,)),
        ]:
            names[f"h.{n}.{hf}"] = (f"block_{n}/{kgpt}", shape)
    return names


def model_config_from_hf(hf_config):
    """The `ModelConfig` of a parsed GPT-2 `config.json`; ValueError for variants kgpt cannot compute."""
    model_type = hf_config.get("model_type")
    architectures = hf_config.get("architectures") or []
    if model_type != "gpt2":
        raise ValueError(
            f"config.json has model_type={model_type!r} (architectures {architectures}); kgpt "
            "imports only GPT-2 checkpoints (model_type 'gpt2', e.g. gpt2, gpt2-medium, "
            "gpt2-large, gpt2-xl)."
        )
    for key, default, supported in [
        ("activation_function", "gelu_new", TANH_GELU),
        ("scale_attn_weights", True, (True,)),
        ("scale_attn_by_inverse_layer_idx", False, (False,)),
        ("add_cross_attention", False, (False,)),
        ("tie_word_embeddings", True, (True,)),
    ]:
        value = hf_config.get(key, default)
        if value not in supported:
            raise ValueError(
                f"config.json has {key}={value!r}; kgpt's GPT computes only {key} in "
                f"{list(supported)}, so this checkpoint cannot be imported exactly."
            )
    try:
        return ModelConfig(
            vocabulary_size=hf_config["vocab_size"],
            sequence_length=hf_config.get("n_positions", hf_config.get("n_ctx")),
            num_layers=hf_config["n_layer"],
            num_heads=hf_config["n_head"],
            hidden_dim=hf_config["n_embd"],
            intermediate_dim=hf_config.get("n_inner"),
            dropout=float(hf_config.get("resid_pdrop", 0.1)),
            layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-5)),
            initializer_range=float(hf_config.get("initializer_range", 0.02)),
        )
    except KeyError as error:
        raise ValueError(
            f"config.json lacks {error.args[0]!r}; a GPT-2 config needs vocab_size, n_positions, "
            "n_layer, n_head and n_embd."
        ) from None


def read_safetensors(path):
    """Reads a `.safetensors` file into `{name: np.ndarray}` with NumPy only (BF16 widened to float32)."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header size).")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > os.path.getsize(path) - 8:
            raise ValueError(f"{path} is not a safetensors file (header size {header_size} is too big).")
        header = json.loads(file.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}.")
        begin, end = entry["data_offsets"]
        array = data[begin:end].view(dtype).reshape(entry["shape"])
        if entry["dtype"] == "BF16":  # the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
    return tensors


def write_safetensors(tensors, path, metadata=None):
    """Writes `{name: np.ndarray}` as a `.safetensors` file (`metadata`: str -> str)."""
    codes = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items() if k != "BF16"}
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        header[name] = {
            "dtype": codes[array.dtype], "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        for array in arrays:
            file.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def read_pytorch_bin(path):
    """Reads `pytorch_model.bin` only through `torch.load(weights_only=True)`, never full pickle."""
    advice = (
        "Convert the checkpoint to model.safetensors (e.g. in transformers: "
        "GPT2LMHeadModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)) "
        "and import that."
    )
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path} is a pickle, which kgpt reads only with torch.load(weights_only=True), and "
            f"torch is not installed (pip install -e '.[gpt2]'). {advice}"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        raise ValueError(
            f"torch {torch.__version__} cannot load {path} with weights_only=True, and kgpt "
            f"never unpickles arbitrary objects. {advice}"
        ) from None
    except Exception as error:  # UnpicklingError / RuntimeError from the restricted unpickler
        raise ValueError(
            f"Refusing {path}: torch.load(weights_only=True) rejected it ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). It holds more than tensors, "
            f"and kgpt never runs pickled code. {advice}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors.")
    return {
        name: (tensor.float() if tensor.is_floating_point() else tensor).numpy()
        for name, tensor in state.items()
    }


def read_checkpoint(directory):
    """The weights of a Hugging Face folder as `{name: np.ndarray}` (safetensors preferred)."""
    single = os.path.join(directory, SAFETENSORS_FILENAME)
    index = os.path.join(directory, SAFETENSORS_INDEX_FILENAME)
    pickled = os.path.join(directory, PYTORCH_FILENAME)
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as file:
            shards = sorted(set(json.load(file)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(read_safetensors(os.path.join(directory, shard)))
        return tensors
    if os.path.isfile(pickled):
        return read_pytorch_bin(pickled)
    raise FileNotFoundError(
        f"No GPT-2 weights in {directory}: expected {SAFETENSORS_FILENAME}, "
        f"{SAFETENSORS_INDEX_FILENAME} or {PYTORCH_FILENAME}."
    )


def convert_weights(tensors, config):
    """Maps HF GPT-2 tensors (`transformer.` prefix optional) onto kgpt weight paths, checking shapes.

    Returns:
        `{kgpt weight path (without the model name): float32 array}`.
    """
    unprefixed = {name.removeprefix("transformer."): array for name, array in tensors.items()}
    lm_head = unprefixed.pop("lm_head.weight", None)
    expected = _hf_names(config)
    result = {}
    for name, (path, shape) in expected.items():
        if name not in unprefixed:
            raise ValueError(
                f"Tensor {name} is missing (expected shape {shape}); the checkpoint does not fit "
                f"a GPT-2 with {config.num_layers} layers, width {config.hidden_dim}."
            )
        array = unprefixed[name]
        if tuple(array.shape) != shape:
            raise ValueError(
                f"Tensor {name} has shape {tuple(array.shape)}, expected {shape} from config.json "
                f"(kgpt weight {path}); the weights and config.json disagree."
            )
        result[path] = np.asarray(array, dtype=np.float32)
    unexpected = sorted(n for n in unprefixed if n not in expected and not _IGNORED.match(n))
    if unexpected:
        raise ValueError(
            f"Unexpected tensor(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            f" (shape {tuple(unprefixed[unexpected[0]].shape)}); this is not a plain GPT-2 with "
            f"{config.num_layers} layers, so it cannot be imported exactly."
        )
    if lm_head is not None:
        table = result["embeddings/token_embedding/embeddings"]
        if tuple(lm_head.shape) != table.shape or not np.array_equal(lm_head, table):
            raise ValueError(
                f"Tensor lm_head.weight (shape {tuple(lm_head.shape)}) differs from wte.weight "
                f"(shape {table.shape}); kgpt's GPT ties its output head to the token embeddings."
            )
    return result


def load_gpt2(directory):
    """A built float32 kgpt `GPT` holding the weights of a Hugging Face GPT-2 folder."""
    path = os.path.join(directory, HF_CONFIG_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {HF_CONFIG_FILENAME} in {directory}; pass a Hugging Face GPT-2 folder "
            "(config.json, model.safetensors, vocab.json, merges.txt)."
        )
    with open(path, encoding="utf-8") as file:
        config = model_config_from_hf(json.load(file))
    weights = convert_weights(read_checkpoint(directory), config)
    model = GPT.from_config_object(config)
    for variable in model.weights:
        variable.assign(weights[variable.path.split("/", 1)[1]])
    return model


def missing_files(directory):
    """What a Hugging Face GPT-2 folder needs and `directory` lacks, e.g. `["merges.txt"]`."""
    needed = [
        (HF_CONFIG_FILENAME,),
        (SAFETENSORS_FILENAME, SAFETENSORS_INDEX_FILENAME, PYTORCH_FILENAME),
        ("vocab.json", "encoder.json"),
        ("merges.txt",),
    ]
    return [
        names[0] + (f" (or {' or '.join(names[1:])})" if len(names) > 1 else "")
        for names in needed if not any(os.path.isfile(os.path.join(directory, name)) for name in names)
    ]


def import_gpt2(hf_dir, run_dir, force=False):
    """Imports a Hugging Face GPT-2 folder as a run directory, like `kgpt train`'s; returns the `GPT`.

    Writes `config.json` (a recipe plus a `source` entry), `tokenizer/` (kind `gpt2`) and
    `final.keras`. `force` replaces an existing, non-empty `run_dir`.

    Example:
        import_gpt2("downloads/gpt2", "checkpoints/gpt2")
    """
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"No such folder: {hf_dir}; pass a Hugging Face GPT-2 folder.")
    missing = missing_files(hf_dir)
    if missing:
        raise FileNotFoundError(
            f"{hf_dir} is not a whole Hugging Face GPT-2 folder: it lacks {', '.join(missing)}; a GPT-2 "
            "folder holds config.json, the weights, vocab.json and merges.txt (e.g. "
            "huggingface.co/openai-community/gpt2's files)."
        )
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not force:
        raise ValueError(f"{run_dir} already exists and is not empty; choose another --out or pass --force.")
    tokenizer = load_gpt2_tokenizer(hf_dir)
    model = load_gpt2(hf_dir)
    if tokenizer.vocabulary_size > model.model_config.vocabulary_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocabulary_size} ids but config.json has vocab_size="
            f"{model.model_config.vocabulary_size}; the tokenizer files belong to another model."
        )
    # Written into a sibling temporary folder and renamed: no half-imported run directory.
    files.remove_stale(os.path.dirname(os.path.abspath(run_dir)))
    with files.staged_directory(run_dir) as staging:
        staged = RunDirectory(staging)
        tokenizer.save(staged.tokenizer_dir)
        config = model.model_config
        data = DataConfig(
            corpus="wikitext2",
            tokenizer="gpt2",
            tokenizer_path=os.path.abspath(RunDirectory(run_dir).tokenizer_dir),
            sequence_length=config.sequence_length,
        )
        recipe = Recipe(model=config.to_dict(), data=data, train=TrainConfig()).to_dict()
        recipe["source"] = {"format": "huggingface-gpt2", "directory": os.path.abspath(hf_dir)}
        staged.write_config(recipe)
        save_model(model, staged.file(FINAL_MODEL))
    return model


def export_gpt2(model, tokenizer, directory):
    """Writes a kgpt `GPT` as a folder `transformers.GPT2LMHeadModel.from_pretrained` loads.

    Args:
        model: a `GPT` with GPT-2's arrangement (`normalize_first`, `use_bias`).
        tokenizer: its tokenizer; BPE kinds also write `vocab.json` and `merges.txt`.

    Example:
        export_gpt2(load_model("checkpoints/gpt2"), load_tokenizer("checkpoints/gpt2/tokenizer"), "out/hf")
    """
    config = model.model_config
    if not (config.normalize_first and config.use_bias and config.position_embedding == "learned"):
        raise ValueError(
            f"Only GPT-2's arrangement exports to Hugging Face: normalize_first=True, use_bias=True "
            f"and learned positions; this model has normalize_first={config.normalize_first}, "
            f"use_bias={config.use_bias}, position_embedding={config.position_embedding!r}."
        )
    paths = {path: name for name, (path, _) in _hf_names(config).items()}
    tensors = {
        paths[v.path.split("/", 1)[1]]: np.asarray(v.numpy(), np.float32) for v in model.weights
    }
    os.makedirs(directory, exist_ok=True)
    write_safetensors(tensors, os.path.join(directory, SAFETENSORS_FILENAME), {"format": "pt"})
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocabulary_size,
        "n_positions": config.sequence_length,
        "n_ctx": config.sequence_length,
        "n_embd": config.hidden_dim,
        "n_layer": config.num_layers,
        "n_head": config.num_heads,
        "n_inner": config.intermediate_dim,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": config.initializer_range,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.end_of_text_id,
        "eos_token_id": tokenizer.end_of_text_id,
    }
    with open(os.path.join(directory, HF_CONFIG_FILENAME), "w", encoding="utf-8") as file:
        json.dump(hf_config, file, indent=2)
    if tokenizer.has_bpe_files:
        with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as file:
            json.dump(tokenizer.vocabulary, file, ensure_ascii=False)
        with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as file:
            file.write("#version: 0.2\n" + "".join(f"{m}\n" for m in tokenizer.merges))


def export_hf(run_dir, out_dir):
    """Writes a run directory as a Hugging Face GPT-2 folder (`--format hf`), staged and renamed.

    Example:
        export_hf("checkpoints/gpt2_wikitext2", "exports/gpt2_wikitext2_hf")
    """
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ValueError(f"{out_dir} already exists and is not empty; choose another --out.")
    run = RunDirectory(run_dir)
    tokenizer = run.load_tokenizer()
    model = run.load_model()
    with files.staged_directory(out_dir) as staging:  # out_dir is absent or empty, checked above
        export_gpt2(model, tokenizer, staging)
    return out_dir
