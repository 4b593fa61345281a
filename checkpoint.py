"""Checkpoint I/O: Hugging Face LLaMA directories (safetensors, sharded or not, or pytorch_model*.bin) and Meta's
(`params.json` + `consolidated.NN.pth`) in, Hugging Face directories out; LoRA adapters in PEFT's format, both ways.

Our parameter names are HF's without the `model.` prefix, and RoPE uses HF's rotate-half layout, so an HF
directory loads with no renaming or permuting; Meta's tensors are renamed and their q/k rows permuted from
interleaved pairs. Tensors are read one at a time and put straight into place: never two copies of a model.
"""

import json
import os
import shutil
from collections.abc import Iterable, Iterator

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from model import LORA_TARGETS, ModelArgs, Transformer, apply_lora

MAX_SHARD_BYTES = 5 * 1000**3  # what HF's save_pretrained uses by default ("5GB")


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_args(path: str) -> ModelArgs:
    """The model config of an HF (`config.json`) or Meta (`params.json`) checkpoint directory."""
    hf_config_file, meta_params = os.path.join(path, "config.json"), os.path.join(path, "params.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    if os.path.isfile(hf_config_file):
        config = _read_json(hf_config_file)
        try:
            return args_from_hf_config(config)
        except KeyError as e:
            raise ValueError(f"{hf_config_file}: missing field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{hf_config_file}: {e}") from None
    if os.path.isfile(meta_params):
        params = _read_json(meta_params)
        vocab = params.get("vocab_size", -1)
        if vocab <= 0:  # LLaMA-1's params.json says -1: the tokenizer decides
            vocab = _sentencepiece_size(os.path.join(path, "tokenizer.model"), meta_params)
        try:
            return args_from_meta_params(params, vocab)
        except KeyError as e:
            raise ValueError(f"{meta_params}: missing field {e.args[0]!r}") from None
    raise FileNotFoundError(f"{path}: neither config.json (Hugging Face) nor params.json (Meta) found")


def args_from_hf_config(config: dict) -> ModelArgs:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported (only plain RoPE)")
    return ModelArgs(
        dim=config["hidden_size"],
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"),
        head_dim=config.get("head_dim"),
        hidden_dim=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        max_seq_len=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=_first(config.get("eos_token_id", 2)),
        pad_token_id=config.get("pad_token_id"),
    )


def _first(x: int | list[int]) -> int:
    return x[0] if isinstance(x, list) else x


def args_from_meta_params(params: dict, vocab_size: int) -> ModelArgs:
    dim = params["dim"]
    # Meta's FeedForward: 2/3 of 4*dim, times an optional multiplier, rounded up to multiple_of.
    hidden = int(2 * 4 * dim / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    return ModelArgs(
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        hidden_dim=hidden,
        vocab_size=params["vocab_size"] if params.get("vocab_size", -1) > 0 else vocab_size,
        norm_eps=params.get("norm_eps", 1e-6),
        rope_theta=params.get("rope_theta", 10000.0),
    )


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _sentencepiece_size(tokenizer_path: str, params_path: str) -> int:
    from sentencepiece import SentencePieceProcessor

    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{params_path}: vocab_size is -1 and {tokenizer_path} is missing")
    return SentencePieceProcessor(model_file=tokenizer_path).vocab_size()


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vocab_size: int | None = None,
) -> Transformer:
    """Loads an HF or Meta LLaMA directory. The model is built on the meta device and each tensor is
    moved straight into place, so peak memory is one model plus one tensor. `vocab_size` larger than the
    checkpoint's (for the added `[PAD]`) grows the embeddings with mean rows."""
    checkpoint_args = read_args(path)
    model_args = ModelArgs(**vars(checkpoint_args))
    if vocab_size is not None and vocab_size != checkpoint_args.vocab_size:
        if vocab_size < checkpoint_args.vocab_size:
            raise ValueError(
                f"{path}: vocab_size {vocab_size} is smaller than the checkpoint's {checkpoint_args.vocab_size}"
            )
        model_args.vocab_size = vocab_size
    with torch.device("meta"):
        model = Transformer(model_args)
    for name, tensor in checked_tensors(path, checkpoint_args, model):
        module_name, _, attr = name.rpartition(".")
        tensor = tensor.to(device=device, dtype=dtype)  # no copy if already right: memory-mapped .bin stays so
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor))
    if model_args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def check_weights(path: str, checkpoint_args: ModelArgs, model_args: ModelArgs) -> None:
    """Every tensor's name and shape, from the file headers alone: a mismatch costs a second, not a model load."""
    with torch.device("meta"):
        model = Transformer(model_args)
    for _ in checked_tensors(path, checkpoint_args, model, read_data=False):
        pass


def checked_tensors(
    path: str, checkpoint_args: ModelArgs, model: Transformer, read_data: bool = True, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, Tensor]]:
    """(parameter name, tensor) for every parameter of `model` from the checkpoint at path, each checked for
    its name and shape; embeddings of the checkpoint's vocabulary grow to the model's (the added `[PAD]`), after
    conversion to `dtype` if given. With read_data=False nothing but the file headers is read (see iter_checkpoint)."""
    # A tied lm_head is embed_tokens itself, so not named again; LoRA adapters are no part of a base checkpoint.
    expected = {name: p for name, p in model.named_parameters() if ".lora_" not in name}
    found = set()
    for name, tensor in iter_checkpoint(path, checkpoint_args, read_data):
        if name == "lm_head.weight" and checkpoint_args.tie_word_embeddings:
            continue
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a LLaMA model")
        if dtype is not None:
            tensor = tensor.to(dtype)
        if name in ("embed_tokens.weight", "lm_head.weight") and tensor.shape[0] == checkpoint_args.vocab_size:
            tensor = add_pad_rows(tensor, expected[name].shape[0])
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} but the config expects "
                f"{tuple(expected[name].shape)}"
            )
        found.add(name)
        yield name, tensor
    if missing := [name for name in expected if name not in found]:
        raise ValueError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")


def add_pad_rows(weight: Tensor, rows: int) -> Tensor:
    """Grows an embedding or output matrix to `rows` rows; new rows are the mean of the existing ones."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)])


def iter_checkpoint(path: str, args: ModelArgs, read_data: bool = True) -> Iterator[tuple[str, Tensor]]:
    """Yields (our parameter name, CPU tensor) one tensor at a time, so a caller can place each tensor
    where it belongs (or shard it) before the next is read: never two copies of the model in memory.
    With read_data=False the tensors are on the meta device, from the file headers alone: every name and
    shape (and a truncated file) can be checked in a second at any model size, before anything slow runs."""
    meta = [f for f in sorted(os.listdir(path)) if f.startswith("consolidated.") and f.endswith(".pth")]
    if os.path.isfile(os.path.join(path, "config.json")) and (files := hf_weight_files(path)):
        for f in files:
            yield from _read_weight_file(os.path.join(path, f), read_data)
    elif os.path.isfile(os.path.join(path, "params.json")) and meta:
        yield from _iter_meta(path, meta, args, read_data)
    else:
        raise FileNotFoundError(
            f"{path}: no weights found (model*.safetensors, pytorch_model*.bin or consolidated.*.pth)"
        )


def hf_weight_files(path: str) -> list[str]:
    """The weight files of a Hugging Face directory: its safetensors shards, else its pytorch_model*.bin shards
    (those of the index, if there is one); none if it has neither."""
    files = sorted(os.listdir(path))
    if safetensors := [f for f in files if f.endswith(".safetensors")]:
        return _shard_files(path, safetensors, "model.safetensors.index.json")
    bins = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    return _shard_files(path, bins, "pytorch_model.bin.index.json") if bins else []


def weight_index(path: str) -> dict[str, tuple[str, Tensor]]:
    """Our parameter name -> (the file that holds it, its meta tensor) for a Hugging Face directory, from the
    file headers alone: for reading its tensors one at a time in any order with read_tensor."""
    if not os.path.isfile(os.path.join(path, "config.json")) or not (files := hf_weight_files(path)):
        raise FileNotFoundError(
            f"{path}: not a Hugging Face model directory (config.json and model*.safetensors or pytorch_model*.bin)"
        )
    index = {}
    for f in files:
        file_path = os.path.join(path, f)
        index.update({name: (file_path, tensor) for name, tensor in _read_weight_file(file_path, read_data=False)})
    return index


def read_tensor(file_path: str, name: str) -> Tensor:
    """One tensor, by our parameter name, of a safetensors or pytorch_model*.bin file, in memory of its own: a
    .bin's memory map is let go, so reading a model tensor by tensor in any order holds only the tensors kept."""
    for _, tensor in _read_weight_file(file_path, read_data=True, only=name):
        return tensor if file_path.endswith(".safetensors") else tensor.clone()
    raise ValueError(f"{file_path}: no tensor {hf_key(name)!r}")


def _read_weight_file(file_path: str, read_data: bool, only: str | None = None) -> Iterator[tuple[str, Tensor]]:
    if file_path.endswith(".safetensors"):
        yield from _read_safetensors(file_path, read_data, only)
        return
    for name, tensor in _iter_bins(os.path.dirname(file_path), [os.path.basename(file_path)], read_data):
        if only is None or name == only:
            yield name, tensor


def _shard_files(path: str, found: list[str], index_name: str) -> list[str]:
    index_path = os.path.join(path, index_name)
    if not os.path.isfile(index_path):
        return found
    wanted = sorted(set(_read_json(index_path)["weight_map"].values()))
    for f in wanted:
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"{index_path}: lists {f}, which is missing")
    return wanted


def _hf_name(name: str) -> str | None:
    """HF LlamaForCausalLM key -> ours; None for keys that carry no weights we use (rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name.removeprefix("model.")


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(file_path: str, read_data: bool, only: str | None = None) -> Iterator[tuple[str, Tensor]]:
    """Reads each tensor (or the one named `only`) straight into fresh memory with readinto. The format is an
    8-byte header length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data. Not memory-mapping
    the file matters: mapped pages count as resident on top of the copies, which would double peak memory while
    loading."""
    size = os.path.getsize(file_path)
    with open(file_path, "rb") as f:
        try:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file_path}: not a safetensors file ({e})") from None
        data_start = 8 + header_len
        header.pop("__metadata__", None)
        for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise ValueError(f"{file_path}: truncated: tensor {key!r} ends at byte {data_start + end} of {size}")
            name = _hf_name(key)
            if name is None or (only is not None and name != only):
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{file_path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            device = "cpu" if read_data else "meta"
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]], device=device)
            if tensor.numel() * tensor.element_size() != end - begin:
                raise ValueError(f"{file_path}: tensor {key!r}: {end - begin} bytes for shape {info['shape']}")
            if read_data:
                f.seek(data_start + begin)
                f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            yield name, tensor


def _iter_bins(path: str, files: list[str], read_data: bool) -> Iterator[tuple[str, Tensor]]:
    for f in files:
        state = _torch_load(os.path.join(path, f))
        for key in list(state):
            tensor = state.pop(key)  # drop our reference as we go: peak memory stays one shard file
            if (name := _hf_name(key)) is not None:
                yield name, tensor if read_data else tensor.to("meta")  # memory-mapped: to("meta") reads nothing


def _torch_load(file_path: str) -> dict[str, Tensor]:
    try:
        # weights_only: a checkpoint is data, and must never be allowed to run pickled code.
        return torch.load(file_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file_path}: not a weights-only PyTorch checkpoint ({first_line})") from None


def _iter_meta(path: str, files: list[str], args: ModelArgs, read_data: bool) -> Iterator[tuple[str, Tensor]]:
    # Model-parallel shards split some tensors across files; mmap keeps all shards open without reading them.
    shards = [_torch_load(os.path.join(path, f)) for f in files]
    for key in list(shards[0]):
        mapped = _meta_name(key)
        if mapped is None:
            continue  # e.g. rope.freqs, which we compute
        name, cat_dim = mapped
        parts = [shard.pop(key) if read_data else shard.pop(key).to("meta") for shard in shards]
        tensor = parts[0] if cat_dim is None or len(parts) == 1 else torch.cat(parts, dim=cat_dim)
        if name.endswith("q_proj.weight"):
            tensor = meta_to_hf_qk(tensor, args.n_heads)
        elif name.endswith("k_proj.weight"):
            tensor = meta_to_hf_qk(tensor, args.n_kv_heads)
        yield name, tensor


# Meta name suffix -> (our name suffix, dim along which model-parallel shards are concatenated or None)
_META_NAMES = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_META_TOP = {"tok_embeddings.weight": ("embed_tokens.weight", 1), "norm.weight": ("norm.weight", None)}
_META_TOP["output.weight"] = ("lm_head.weight", 0)


def _meta_name(name: str) -> tuple[str, int | None] | None:
    if name in _META_TOP:
        return _META_TOP[name]
    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in _META_NAMES:
        ours, dim = _META_NAMES[parts[2]]
        return f"layers.{parts[1]}.{ours}", dim
    return None


def meta_to_hf_qk(w: Tensor, n_heads: int) -> Tensor:
    """Permutes q/k rows from Meta's interleaved RoPE pairs to the rotate-half layout."""
    d, dim = w.shape
    return w.view(n_heads, d // n_heads // 2, 2, dim).transpose(1, 2).reshape(d, dim)


# ---------------------------------------------------------------------------------------------------------
# Writing


def save_hf_checkpoint(
    out_dir: str,
    args: ModelArgs,
    tensors: Iterable[tuple[str, Tensor]],
    tokenizer_path: str | None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """Writes an HF LLaMA directory (config.json, safetensors shards with an index past one shard, and the
    tokenizer files) from (our name, tensor) pairs, streamed: only one shard is held at a time."""
    os.makedirs(out_dir, exist_ok=True)
    shard: dict[str, Tensor] = {}
    shard_bytes, shard_files, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        tmp_name = f"model-{len(shard_files) + 1:05d}.safetensors.tmp"
        save_file(shard, os.path.join(out_dir, tmp_name), metadata={"format": "pt"})
        shard_files.append((tmp_name, list(shard)))
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[hf_key(name)] = tensor
        shard_bytes += size
    if shard or not shard_files:
        flush()

    for f in os.listdir(out_dir):  # shards of an earlier export here would be mixed with ours
        if f.startswith("model") and f.endswith((".safetensors", ".safetensors.index.json")):
            os.remove(os.path.join(out_dir, f))
    n = len(shard_files)
    for i, (tmp_name, keys) in enumerate(shard_files, start=1):
        final = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp_name), os.path.join(out_dir, final))
        weight_map.update({k: final for k in keys})
    if n > 1:
        total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    write_json(os.path.join(out_dir, "config.json"), hf_config(args, dtype))
    write_json(
        os.path.join(out_dir, "generation_config.json"),
        {
            "bos_token_id": args.bos_token_id,
            "eos_token_id": args.eos_token_id,
            "pad_token_id": args.pad_token_id,
        },
    )
    if tokenizer_path is not None:
        save_tokenizer_files(out_dir, tokenizer_path, args)


def hf_key(name: str) -> str:
    """Our parameter name -> its key in HF's LlamaForCausalLM."""
    return name if name == "lm_head.weight" else f"model.{name}"


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": args.eos_token_id,
        "pad_token_id": args.pad_token_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_tokenizer_files(out_dir: str, tokenizer_path: str, args: ModelArgs) -> None:
    """tokenizer.model plus the config that makes HF's LlamaTokenizer add BOS and know `[PAD]`."""
    if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(out_dir, "tokenizer.model")):
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": args.max_seq_len,
        **special,
    }
    if args.pad_token_id is not None and args.pad_token_id >= 0:
        config["pad_token"] = "[PAD]"
        special["pad_token"] = "[PAD]"
        config["added_tokens_decoder"] = {
            str(args.pad_token_id): {
                "content": "[PAD]",
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        }
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def write_json(path: str, obj: dict | list, indent: int = 2) -> None:
    """Indented JSON, written aside, flushed to disk and renamed into place: a reader, or a run resumed after a
    crash, never sees half a file."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# ---------------------------------------------------------------------------------------------------------
# LoRA adapters: PEFT's adapter directory (adapter_config.json, adapter_model.safetensors)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PREFIX = "base_model.model.model."  # PeftModel > LlamaForCausalLM > LlamaModel, in front of our names
# PEFT options that change what an adapter computes, with the value under which it computes what ours does.
PLAIN_LORA = {
    "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "lora_bias": False,
    "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    "trainable_token_indices": None, "target_parameters": None, "layer_replication": None,
}  # fmt: skip


def adapter_config(r: int, alpha: float, dropout: float, targets: list[str], base_model: str) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": list(targets),
        "inference_mode": True,
        "init_lora_weights": True,
        **PLAIN_LORA,
    }


def save_adapter(out_dir: str, config: dict, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Writes the adapters among (our name, tensor) pairs under PEFT's keys, in fp32, and the config."""
    os.makedirs(out_dir, exist_ok=True)
    adapters = {
        ADAPTER_PREFIX + name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in tensors
        if ".lora_" in name
    }
    tmp = os.path.join(out_dir, ADAPTER_WEIGHTS + ".tmp")
    save_file(adapters, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out_dir, ADAPTER_WEIGHTS))
    write_json(os.path.join(out_dir, ADAPTER_CONFIG), config)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(path: str) -> dict:
    """adapter_config.json of an adapter directory, checked to describe a plain LoRA adapter we can apply."""
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise ValueError(f"{config_path}: r must be a positive integer, got {config.get('r')!r}")
    if not isinstance(config.get("lora_alpha"), int | float):
        raise ValueError(f"{config_path}: lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    targets = config.get("target_modules")
    if not isinstance(targets, list) or not targets or not set(targets) <= set(LORA_TARGETS):
        raise ValueError(f"{config_path}: target_modules must be a list of {', '.join(LORA_TARGETS)}, got {targets!r}")
    for key, plain in PLAIN_LORA.items():
        value = config.get(key)
        if value is not None and value != plain and (value or plain):  # absent, null and empty mean the default
            raise ValueError(f"{config_path}: {key} {config[key]!r} is not supported (only {plain!r})")
    return config


def load_adapter(model: Transformer, path: str) -> dict:
    """Wraps the model's target projections in LoRA layers and loads the adapter's weights into them, each
    checked against the base's shapes; returns the adapter's config."""
    config = read_adapter_config(path)
    apply_lora(model, config["r"], config["lora_alpha"], 0.0, config["target_modules"])
    safetensors_file, bin_file = os.path.join(path, ADAPTER_WEIGHTS), os.path.join(path, "adapter_model.bin")
    if os.path.isfile(safetensors_file):
        file, tensors = safetensors_file, _read_safetensors(safetensors_file, read_data=True)
    elif os.path.isfile(bin_file):
        file, tensors = bin_file, _torch_load(bin_file).items()
    else:
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} (or adapter_model.bin)")
    expected = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    loaded = set()
    for key, tensor in tensors:
        name = key.removeprefix(ADAPTER_PREFIX)
        if name not in expected:
            raise ValueError(f"{file}: unexpected tensor {key!r} for LoRA on {', '.join(config['target_modules'])}")
        param = expected[name]
        if tensor.shape != param.shape:
            raise ValueError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)} but the base model expects "
                f"{tuple(param.shape)} (r {config['r']}): an adapter for another base model?"
            )
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    if missing := [n for n in expected if n not in loaded]:
        raise ValueError(f"{file}: missing tensor {ADAPTER_PREFIX + missing[0]!r} ({len(missing)} missing in all)")
    return config
