"""PEFT LoRA adapter directories: adapter_config.json and adapter_model.safetensors, written and read."""

import os
from collections.abc import Iterable

import torch
from safetensors.torch import save_file
from torch import Tensor

from model import LORA_TARGETS, Transformer, _read_json, _read_safetensors, _torch_load, _write_json, apply_lora

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
    _write_json(os.path.join(out_dir, ADAPTER_CONFIG), config)


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
