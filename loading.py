"""Loading a checkpoint for decoding, as generate.py, serve.py, self_instruct.py and evaluate.py all do: the model
flags they share, the tokenizer checked against the model, a LoRA adapter merged, int8, the CPU layout and
--compile."""

import argparse
import os

import torch

from checkpoint import is_adapter_dir, load_adapter, load_model, read_adapter_config, read_model_args
from model import ModelArgs, Transformer, cap_cpu_kernel_caches, merge_lora
from optimize import CompiledSteps, quantize_int8, use_cpu_decoding_layout
from tokenizer import Tokenizer

DEFAULT_MODEL_PATH = "out"  # where train.py writes its final model by default
MODEL_FLAGS = ("model_path", "base_model", "device", "dtype", "quantize")  # what load_model_for_decoding reads


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that load_tokenizer and load_for_decoding read."""
    parser.add_argument(
        "--model_path",
        help="Hugging Face or Meta LLaMA directory, or a LoRA adapter directory (adapter_config.json) "
        f"(default: ./{DEFAULT_MODEL_PATH}, where train.py exports)",
    )
    parser.add_argument(
        "--base_model",
        help="when --model_path is a LoRA adapter (PEFT) directory: its base model (default: the adapter's "
        "base_model_name_or_path)",
    )
    parser.add_argument("--tokenizer", help="SentencePiece model (default: MODEL_PATH/tokenizer.model)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if there is one, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="weights and compute (default: bfloat16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8"],
        help="int8: weight-only int8 with a scale per output channel for every linear layer: half the bytes of "
        "bf16 to read per token, which pays most with --compile; the tokens may differ a little from the "
        "unquantized model's",
    )


def model_path_or_default(model_path: str | None) -> str:
    if model_path is not None:
        return model_path
    if not os.path.isdir(DEFAULT_MODEL_PATH):
        raise ValueError(f"no model in ./{DEFAULT_MODEL_PATH} (where train.py exports): pass --model_path DIR")
    return DEFAULT_MODEL_PATH


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def model_dirs(args: argparse.Namespace) -> tuple[str, str | None]:
    """The model directory and the LoRA adapter directory to apply to it (None: no adapter). --model_path may be
    a PEFT adapter directory; its base is then --base_model, or the one its config names."""
    base_model = args.base_model
    if not is_adapter_dir(args.model_path):
        if base_model is not None:
            raise ValueError(f"--base_model goes with a LoRA adapter directory; {args.model_path} is not one")
        return args.model_path, None
    base = base_model or read_adapter_config(args.model_path).get("base_model_name_or_path")
    if not base or not os.path.isdir(base):
        config_path = os.path.join(args.model_path, "adapter_config.json")
        where = f"--base_model {base}" if base_model else f"{config_path}: base_model_name_or_path {base!r}"
        raise ValueError(f"{where}: no such model directory (pass the base model with --base_model DIR)")
    return base, args.model_path


def load_tokenizer(args: argparse.Namespace) -> tuple[ModelArgs, Tokenizer]:
    model_path, _ = model_dirs(args)
    model_args = read_model_args(model_path)  # a bad directory or tokenizer fails fast, before the slow load
    tokenizer = Tokenizer(args.tokenizer or os.path.join(model_path, "tokenizer.model"))
    if tokenizer.n_words > model_args.vocab_size:
        raise ValueError(
            f"{tokenizer.model_path} has {tokenizer.n_words} pieces but the model in {model_path} only "
            f"{model_args.vocab_size} embedding rows: wrong tokenizer?"
        )
    return model_args, tokenizer


def load_model_for_decoding(args: argparse.Namespace) -> Transformer:
    """The model as the MODEL_FLAGS say: its adapter merged, int8 if asked; no layout or compiled step yet."""
    device = pick_device(args.device)
    if device.type == "cpu":
        cap_cpu_kernel_caches()  # each new prompt length would keep a few MB more
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model_path, adapter_path = model_dirs(args)
    model = load_model(model_path, dtype=dtype, device=device)
    if adapter_path is not None:
        load_adapter(model, adapter_path)
        merge_lora(model)  # the same answers, one product per projection, and the layouts below apply
    if args.quantize == "int8":
        quantize_int8(model)  # in place of the CPU layout: its own products read int8 weights
    return model


def model_flags(args: argparse.Namespace) -> list[str]:
    """The command-line flags that load the same model again (in the process that builds compiled steps)."""
    flags = []
    for name in MODEL_FLAGS:
        if getattr(args, name) is not None:
            flags += [f"--{name}", os.path.abspath(getattr(args, name)) if name.endswith(("path", "model")) else
                      str(getattr(args, name))]  # fmt: skip
    return flags


def load_for_decoding(
    args: argparse.Namespace, in_background: bool = False
) -> tuple[Transformer, CompiledSteps | None]:
    """The model, and with --compile its compiled decoding steps (optimize.CompiledSteps, for the engine). They
    are compiled when first needed, or with in_background by a process of their own while the model decodes
    uncompiled in the CPU layout meanwhile."""
    model = load_model_for_decoding(args)
    compiled = None
    if args.compile:
        compiled = CompiledSteps(model, model_flags(args) if in_background else None)
    if (compiled is None or in_background) and args.quantize is None:
        use_cpu_decoding_layout(model)  # after CompiledSteps has taken the plain weights' digest
    return model, compiled
