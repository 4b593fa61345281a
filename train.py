"""Fine-tune LLaMA on Alpaca-format instruction data: torchrun, FSDP2, bf16, AdamW, warmup + cosine.

    torchrun --nproc_per_node=N train.py --model_name_or_path DIR --data_path alpaca_data.json --output_dir out
    python train.py ...   # one process, same flags

Flag names are those of the original Stanford Alpaca launch line (Hugging Face TrainingArguments), so that
line runs as written. Every rank holds only its FSDP shards of weights, gradients and optimizer state.
"""

import argparse
import contextlib
import ctypes
import json
import math
import os
import pickle
import re
import resource
import shutil
import sys
import time
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import Batch, epoch_steps, load_dataset, padding_fraction, rank_micro_batches
from lora_io_draft import adapter_config, save_adapter
from model import (
    LORA_TARGETS,
    LoRALinear,
    ModelArgs,
    Transformer,
    add_pad_rows,
    apply_lora,
    cap_cpu_kernel_caches,
    check_shape,
    count_parameters,
    document_mask,
    init_lora_,
    iter_checkpoint,
    merge_lora_tensors,
    read_args,
    save_hf_checkpoint,
    training_flops,
)
from tokenizer import Tokenizer

# Dense bf16 tensor-core peaks (no sparsity), for MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}


# ---------------------------------------------------------------------------------------------------------
# Command line

# With no --model_name_or_path: the embedded sample written by `python sample_data.py`, a tiny model trained
# from scratch, which wants a far larger learning rate and more epochs than fine-tuning LLaMA does. Flags
# given explicitly still win; with --model_name_or_path the defaults are the Alpaca recipe.
SAMPLE_DEFAULTS = dict(
    model_name_or_path="sample/model",
    data_path="sample/train.json",
    learning_rate=3e-3,
    num_train_epochs=3,
    per_device_train_batch_size=16,
    gradient_accumulation_steps=1,
    warmup_ratio=0.05,
    adam_beta2=0.95,  # LLaMA's pretraining value: from scratch, it learnt the sample's tasks in fewer steps
    model_max_length=256,
    save_strategy="no",
    logging_steps=10,
)


def module_list(value: str) -> list[str]:
    """'q_proj,v_proj', or alpaca-lora's '[q_proj,v_proj]' (quotes and spaces allowed)."""
    return [name.strip(" '\"") for name in value.strip().removeprefix("[").removesuffix("]").split(",")]


def str2bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise ValueError(message)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = partial(p.add_argument, type=str2bool, nargs="?", const=True, metavar="BOOL")
    g = p.add_argument
    g("--model_name_or_path", help="HF or Meta LLaMA directory (default: the sample, with SAMPLE_DEFAULTS)")
    g("--data_path", help="Alpaca JSON or JSON Lines")
    g("--tokenizer_path", help="SentencePiece model (default: tokenizer.model in the model directory)")
    g("--output_dir", default="out")
    g("--model_max_length", type=int, default=512)
    g("--num_train_epochs", type=float, default=3)
    g("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (overrides epochs)")
    g("--per_device_train_batch_size", type=int, default=4, help="records (padded) or rows (packed) per micro-batch")
    g("--gradient_accumulation_steps", type=int, default=8)
    g("--learning_rate", type=float, default=2e-5)
    g("--weight_decay", type=float, default=0.0)
    g("--adam_beta1", type=float, default=0.9)
    g("--adam_beta2", type=float, default=0.999)
    g("--adam_epsilon", type=float, default=1e-8)
    g("--max_grad_norm", type=float, default=1.0)
    g("--warmup_ratio", type=float, default=0.03)
    g("--lr_scheduler_type", default="cosine", choices=["cosine"])
    g("--seed", type=int, default=42)
    flag("--bf16", default=True, help="bf16 compute, fp32 master weights and gradient reduction")
    flag("--tf32", default=True, help="TF32 for the fp32 matmuls that remain (CUDA)")
    flag("--packing", default=True, help="pack records into rows (same records per step, no padding compute)")
    flag("--gradient_checkpointing", default=False, help="recompute each block's activations in backward")
    flag("--cpu_offload", default=False, help="keep parameters, gradients and optimizer state in CPU memory")
    flag("--compile", default=False, help="torch.compile each decoder block")
    flag("--skip_nonfinite", default=False, help="skip a step whose loss or gradient norm is not finite, not stop")
    g("--logging_steps", type=int, default=1)
    g("--save_strategy", default="steps", choices=["steps", "epoch", "no"])
    g("--save_steps", type=int, default=2000)
    g("--save_total_limit", type=int, default=None)
    g("--resume_from_checkpoint", help="a checkpoint-<step> directory, or 'latest' in output_dir")
    g("--save_dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype of the final export")
    g("--lora_r", type=int, help="train LoRA adapters of this rank, not the weights (alpaca-lora: 8); default: off")
    g("--lora_alpha", type=float, default=16, help="LoRA scaling is lora_alpha / lora_r")
    g("--lora_dropout", type=float, default=0.05, help="dropout on the adapters' input")
    g(
        "--lora_target_modules",
        type=module_list,
        default="q_proj,v_proj",
        help="e.g. q_proj,v_proj or '[q_proj,v_proj]'",
    )
    flag("--save_merged", default=False, help="with LoRA, also export the merged model to output_dir/merged")
    g("--dry_run", action="store_true", help="print the memory, steps and time this run would take; train nothing")
    g("--dry_run_gpus", type=int, help="world size to plan for (default: this launch's)")
    g("--dry_run_gpu", default="A100", help=f"device to plan for: cpu or one of {', '.join(GPU_PEAK_FLOPS)}")
    g("--dry_run_records", type=int, help="plan for this many records with the data's length distribution")
    g("--dry_run_gpu_memory_gb", type=float, default=80)
    g("--dry_run_mfu", type=float, default=0.45, help="MFU assumed for the time estimate")
    # Trainer flags of the original launch line, accepted where they change nothing here.
    g("--fsdp", default="full_shard auto_wrap")
    g("--fsdp_transformer_layer_cls_to_wrap", default="LlamaDecoderLayer")
    g("--evaluation_strategy", "--eval_strategy", default="no")
    g("--per_device_eval_batch_size", type=int, default=4)
    g("--deepspeed", help="not supported: use --cpu_offload")
    args = p.parse_args(argv)
    if args.model_name_or_path is None:
        p.set_defaults(**SAMPLE_DEFAULTS)
        args = p.parse_args(argv)
    if args.data_path is None:
        raise ValueError("--data_path is required with --model_name_or_path")
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.deepspeed:
        raise ValueError(
            f"--deepspeed {args.deepspeed}: DeepSpeed is not used here; its CPU offload of parameters and "
            "optimizer state is --cpu_offload True (FSDP CPU offload)"
        )
    fsdp = set(args.fsdp.split())
    if not fsdp <= {"full_shard", "auto_wrap", "offload"}:
        raise ValueError(f"--fsdp {args.fsdp!r}: only 'full_shard auto_wrap' (optionally 'offload') is supported")
    args.cpu_offload = args.cpu_offload or "offload" in fsdp
    if args.fsdp_transformer_layer_cls_to_wrap not in ("LlamaDecoderLayer", "Block"):
        raise ValueError(
            f"--fsdp_transformer_layer_cls_to_wrap {args.fsdp_transformer_layer_cls_to_wrap!r}: "
            "each LLaMA decoder layer is always wrapped; expected LlamaDecoderLayer"
        )
    if args.evaluation_strategy != "no":
        raise ValueError(f"--evaluation_strategy {args.evaluation_strategy!r}: only 'no' is supported")
    positive = ["per_device_train_batch_size", "gradient_accumulation_steps", "model_max_length", "logging_steps"]
    positive += ["save_steps"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    for name in ["learning_rate", "num_train_epochs", "adam_epsilon", "max_grad_norm"]:
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0 <= args.warmup_ratio < 1:
        raise ValueError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {args.weight_decay}")
    for name in ["adam_beta1", "adam_beta2"]:
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    for name in ["dry_run_gpus", "dry_run_records"]:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise ValueError(f"--save_total_limit must be >= 1, got {args.save_total_limit}")
    if args.lora_r is not None:
        check_lora_args(args)
    elif args.save_merged:
        raise ValueError("--save_merged goes with --lora_r: without LoRA the export is the whole model already")
    if args.dry_run and args.dry_run_gpu not in [*GPU_PEAK_FLOPS, "cpu"]:
        raise ValueError(f"--dry_run_gpu {args.dry_run_gpu!r}: expected one of {', '.join(GPU_PEAK_FLOPS)}")


def check_lora_args(args: argparse.Namespace) -> None:
    if args.lora_r <= 0:
        raise ValueError(f"--lora_r must be a positive integer, got {args.lora_r}")
    if not args.lora_alpha > 0:
        raise ValueError(f"--lora_alpha must be positive, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise ValueError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if unknown := [m for m in args.lora_target_modules if m not in LORA_TARGETS]:
        raise ValueError(
            f"--lora_target_modules: unknown module {unknown[0]!r}; expected some of {', '.join(LORA_TARGETS)}"
        )
    args.lora_target_modules = list(dict.fromkeys(args.lora_target_modules))  # each once, in the order given


# ---------------------------------------------------------------------------------------------------------
# Distributed setup, model and weights


def tune_cpu_allocations() -> None:
    """For training on the CPU, two changes to how memory is reused:
    - glibc serves large allocations from its heap and keeps what is freed, instead of mapping each one afresh
      and unmapping it when freed. Otherwise every large temporary of a step (logits, gathered weights,
      gradients) is paid again in page faults, which made large copies 3-8x slower and a step 1.3x slower. The
      price is memory that stays resident once used (BENCHMARKS.md).
    - oneDNN and ideep keep 64 compiled matmuls instead of 1024 (model.cap_cpu_kernel_caches). Each new
      micro-batch length adds a few, up to ~10 MB each: a 2-process epoch of padded batches grew to 12.9 GB per
      rank with neither capped, and with ideep's uncapped to 4.4 GB by step 24 (3.2 GB capped, and flat).
    Elsewhere than glibc, the first does nothing."""
    cap_cpu_kernel_caches()
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun's environment if present, else a one-process group, so there is one code path (FSDP)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    device_id = device if backend == "nccl" else None
    if "RANK" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun keeps one store across its restarts (torch 2.13), where restarted ranks can read the
        # addresses that the ranks they replace published, and fail to connect. Counting each rank's starts
        # in the store gives all the ranks of one attempt the same fresh prefix.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=default_pg_timeout
        )
        attempt = store.add(f"train.py/starts/rank{rank}", 1)
        store = dist.PrefixStore(f"train.py/attempt{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, device_id=device_id)
    else:
        dist.init_process_group(backend, device_id=device_id)
    return rank, world_size, device


def on_rank0(fn):
    """fn() on rank 0 only. An error there is raised on every rank, so none is left waiting in a collective."""
    result, error = None, [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ValueError(error[0])
    return result


def rank0_first(fn):
    """fn() on rank 0, then on the others (which then find what rank 0 cached)."""
    result = on_rank0(fn)
    return result if dist.get_rank() == 0 else fn()


def meta_model(model_args: ModelArgs, args: argparse.Namespace) -> Transformer:
    """The model on the meta device. With LoRA the base is frozen and kept in the compute dtype (bf16: no fp32
    copy, no gradient, no optimizer state for it), and only the adapters, in fp32, train."""
    with torch.device("meta"):
        model = Transformer(model_args)
        if args.lora_r is not None:
            model.to(torch.bfloat16 if args.bf16 else torch.float32)
            apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    return model


def build_model(model_args: ModelArgs, args: argparse.Namespace, device: torch.device) -> Transformer:
    """On the meta device, sharded with FSDP2 block by block, then given (uninitialised) memory for this
    rank's shards only."""
    model = meta_model(model_args, args)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
    shard = partial(
        fully_shard,
        mesh=init_device_mesh(device.type, (dist.get_world_size(),)),
        mp_policy=mp or MixedPrecisionPolicy(),
        offload_policy=CPUOffloadPolicy() if args.cpu_offload else OffloadPolicy(),
    )
    for block in model.layers:
        if args.gradient_checkpointing:
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        if args.compile:
            block.compile()
        shard(block)
    shard(model)
    model.to_empty(device="cpu" if args.cpu_offload else device)
    return model


def check_weights(path: str, checkpoint_args: ModelArgs, model_args: ModelArgs) -> None:
    """Every tensor's name and shape against the config, from the file headers alone: a mismatch costs a
    second, not a model load, and load_weights then reads only what this has vouched for."""
    with torch.device("meta"):
        expected = dict(Transformer(model_args).named_parameters())
    found = set()
    for name, tensor in iter_checkpoint(path, checkpoint_args, read_data=False):
        if name not in expected:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a LLaMA model")
        if name in ("embed_tokens.weight", "lm_head.weight"):
            tensor = add_pad_rows(tensor, expected[name].shape[0])
        check_shape(name, tensor, expected[name].shape, path)
        found.add(name)
    if missing := sorted(set(expected) - found):
        raise ValueError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")


def load_weights(model: Transformer, path: str, checkpoint_args: ModelArgs) -> None:
    """Streams the checkpoint tensor by tensor; each rank keeps only its shard of each."""
    params = dict(model.named_parameters())
    for name, full in iter_checkpoint(path, checkpoint_args):
        param = params[name]
        if name in ("embed_tokens.weight", "lm_head.weight"):
            full = add_pad_rows(full, param.shape[0])
        copy_shard(param, full)


def init_adapters(model: Transformer, seed: int) -> None:
    """Each LoRA pair drawn whole from the seed on every rank, which keeps its shard: the starting adapters do
    not depend on the world size."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            lora_A, lora_B = torch.empty(module.lora_A.weight.shape), torch.empty(module.lora_B.weight.shape)
            init_lora_(lora_A, lora_B)
            copy_shard(module.lora_A.weight, lora_A)
            copy_shard(module.lora_B.weight, lora_B)


def copy_shard(param: DTensor, full: Tensor) -> None:
    local = distribute_tensor(
        full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
    )
    with torch.no_grad():
        param.to_local().copy_(local.to_local())


def weights_finite(model: Transformer, device: torch.device) -> bool:
    """Whether every rank's shards hold only finite values; the same answer on every rank."""
    finite = torch.stack([p.to_local().isfinite().all() for p in model.parameters()]).all()
    finite = finite.to(device, torch.int32)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def full_tensors(model: Transformer, device: torch.device, trainable_only: bool = False):
    """(name, full tensor) for every parameter (or every trained one), all-gathered; every rank must iterate it
    in step."""
    for name, param in model.named_parameters():
        if param.requires_grad or not trainable_only:
            yield name, param.detach().to(device).full_tensor()


def write_on_rank0(write, tensors) -> None:
    """write(tensors) on rank 0; the other ranks take part in the all-gathers and drop what they get."""
    if dist.get_rank() == 0:
        write(tensors)
    else:
        for _ in tensors:
            pass


# ---------------------------------------------------------------------------------------------------------
# Schedule, optimizer and one step


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from 0, then cosine to 0, as in the
    original run (transformers' get_cosine_schedule_with_warmup, so the first step has lr 0)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: Transformer, args: argparse.Namespace) -> torch.optim.AdamW:
    trained = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in trained if p.ndim >= 2]
    vectors = [p for p in trained if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": args.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=True
    )


def model_inputs(batch: Batch, device: torch.device) -> dict[str, Tensor | None]:
    move = lambda t: (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)  # noqa: E731
    kwargs = {"tokens": move(batch.input_ids), "labels": move(batch.labels), "positions": None, "mask": None}
    if batch.document_ids is not None:  # packed rows: positions restart and attention stops at each document
        kwargs["positions"] = move(batch.positions)
        kwargs["mask"] = document_mask(move(batch.document_ids))
    return kwargs


def train_step(model, optimizer, micro_batches, n_supervised: int, lr: float, args, device) -> tuple[float, float]:
    """Forward/backward over this rank's micro-batches, then one AdamW update. The loss of every token is
    divided by the supervised tokens of the whole step on all ranks; FSDP averages gradients over ranks, so
    multiply by the world size to get a plain sum. Returns (loss per supervised token, grad norm), the same on
    every rank; when either is not finite the update is skipped on every rank, so no weight is touched."""
    scale = dist.get_world_size() / n_supervised
    summed_loss = torch.zeros((), device=device)
    # Every input goes to the device before any compute is queued: a copy issued between micro-steps would
    # wait for the GPU to drain and leave it idle while the next forward is being launched.
    inputs = [model_inputs(batch, device) for batch in micro_batches]
    for i, kwargs in enumerate(inputs):
        model.set_requires_gradient_sync(i == len(inputs) - 1)
        loss = model(**kwargs)
        (loss * scale).backward()
        summed_loss += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    dist.all_reduce(summed_loss)
    loss, grad_norm = torch.stack([summed_loss / n_supervised, grad_norm.to(device)]).tolist()
    if math.isfinite(loss) and math.isfinite(grad_norm):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: output_dir/checkpoint-<step>/, written aside, verified, then renamed, so that the newest
# checkpoint-<step> is always a complete one


def checkpoint_dirs(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints, oldest first: a directory is renamed to checkpoint-<step> only once whole."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), f) for f in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", f))]
    return [(step, os.path.join(output_dir, f)) for step, f in sorted(found)]


def check_output_dir(output_dir: str) -> None:
    """That output_dir is, or can be made, a writable directory, checked without creating anything: a run
    that fails its checks leaves nothing behind."""
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--output_dir {output_dir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output_dir {output_dir}: {existing} is not writable")


def prepare_output_dir(output_dir: str, start_step: int) -> None:
    """On rank 0 once every check has passed: creates output_dir and removes what a killed run left half
    written or half deleted, and the metrics it logged past the step this run starts from."""
    os.makedirs(output_dir, exist_ok=True)
    for name in os.listdir(output_dir):
        if re.fullmatch(r"checkpoint-\d+\.(partial|old)", name):
            shutil.rmtree(os.path.join(output_dir, name))
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics) as f:
            # A line without its newline is one that a kill cut short.
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start_step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What a DCP index (.metadata) is made of: its own dataclasses, torch.Size, dtypes and layouts, paths.
CHECKPOINT_INDEX_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ["Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                 "ChunkStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"]
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
}  # fmt: skip


class CheckpointIndexUnpickler(pickle.Unpickler):
    """DCP reads a checkpoint's index with a bare pickle.load, which calls whatever a crafted file names. This
    admits only the classes an index is made of, and runs first: DCP then reads a file that can call nothing
    else."""

    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in CHECKPOINT_INDEX_CLASSES or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def verify_checkpoint(path: str) -> Metadata:
    """Reads the index safely and checks that every byte range it lists is on disk."""
    index_file = os.path.join(path, ".metadata")
    try:
        with open(index_file, "rb") as f:
            index = CheckpointIndexUnpickler(f).load()
    except FileNotFoundError:
        raise ValueError(f"{path}: not a training checkpoint (no .metadata)") from None
    except Exception as e:  # a damaged or crafted pickle fails in many ways, all of which mean the same here
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{index_file}: not a checkpoint index ({reason})") from None
    if not isinstance(index, Metadata):
        raise ValueError(f"{index_file}: not a checkpoint index")
    ends: dict[str, int] = {}
    for info in index.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in ends.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ValueError(f"{file}: missing, but the checkpoint index lists it")
        if os.path.getsize(file) < end:
            raise ValueError(f"{file}: truncated: {os.path.getsize(file)} bytes, the index needs {end}")
    return index


TRAINER_STATE_FIELDS = ("global_step", "global_batch", "seed", "records")
# A checkpoint holds what training changes: with LoRA the adapters and their optimizer state, not the base.
# Loading one then leaves the frozen base as it is (strict=False); check_resume has found every trained tensor.
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def read_trainer_state(path: str) -> dict:
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        raise ValueError(f"{path}: not a complete checkpoint (no trainer_state.json)")
    with open(state_file) as f:
        try:
            state = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{state_file}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in TRAINER_STATE_FIELDS):
        raise ValueError(f"{state_file}: expected the integer fields {', '.join(TRAINER_STATE_FIELDS)}")
    return state


def save_checkpoint(model, optimizer, step: int, args: argparse.Namespace, records: int, device) -> str:
    """Written aside as checkpoint-<step>.partial, verified, then renamed: a kill at any moment leaves the
    previous checkpoint or this one as the newest checkpoint-<step>, never a partial one under that name."""
    if not weights_finite(model, device):
        raise ValueError(f"step {step}: the weights are not finite; checkpoint-{step} not written")
    final = os.path.join(args.output_dir, f"checkpoint-{step}")
    partial_dir = final + ".partial"
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED_ONLY)
    # Tensors only (see load_checkpoint); DCP fsyncs every file it writes.
    dcp.save({"model": model_state, "optim": {"state": optim_state["state"]}}, checkpoint_id=partial_dir)
    with open(os.path.join(partial_dir, f"rng-{dist.get_rank()}.pt"), "wb") as f:
        torch.save(rng_state(), f)
        f.flush()
        os.fsync(f.fileno())
    dist.barrier()
    on_rank0(lambda: publish_checkpoint(partial_dir, final, step, args, records))
    return final


def publish_checkpoint(partial_dir: str, final: str, step: int, args: argparse.Namespace, records: int) -> None:
    """Rank 0: verifies what every rank wrote, writes trainer_state.json last, renames, then rotates."""
    world_size = dist.get_world_size()
    verify_checkpoint(partial_dir)
    for rank in range(world_size):
        if not os.path.isfile(os.path.join(partial_dir, f"rng-{rank}.pt")):
            raise ValueError(f"{partial_dir}: rank {rank} wrote no RNG state")
    state = {
        "global_step": step,
        "global_batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
        "seed": args.seed,
        "records": records,
        "world_size": world_size,
        "lora_alpha": args.lora_alpha if args.lora_r is not None else None,  # r and targets show in the shapes
    }
    with open(os.path.join(partial_dir, "trainer_state.json"), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(partial_dir)
    os.rename(partial_dir, final)
    fsync_dir(args.output_dir)  # the rename itself is on disk before an older checkpoint goes
    if args.save_total_limit:
        for _, old in checkpoint_dirs(args.output_dir)[: -args.save_total_limit]:
            # Out of the checkpoint-<step> names first: a kill halfway through rmtree leaves a .old, which
            # the next start removes, not a checkpoint that looks complete.
            os.rename(old, old + ".old")
            shutil.rmtree(old + ".old")


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def resolve_resume(args: argparse.Namespace) -> str | None:
    """The checkpoint this run starts from. 'latest' is the newest complete one in output_dir, or a fresh start
    if there is none, so that a relaunch (torchrun --max-restarts) runs the same command. Checkpoints in
    output_dir past the starting point belong to another run: rotation would delete this run's checkpoints
    around them, and a restart would take theirs for 'latest'."""
    found = checkpoint_dirs(args.output_dir)
    if args.resume_from_checkpoint is None:
        if found:
            raise ValueError(
                f"--output_dir {args.output_dir} already holds {found[-1][1]}: continue that run with "
                "--resume_from_checkpoint latest, or choose another --output_dir"
            )
        return None
    if args.resume_from_checkpoint == "latest":
        return found[-1][1] if found else None
    path = args.resume_from_checkpoint
    step = read_trainer_state(path)["global_step"]
    if later := [f for s, f in found if s > step]:
        raise ValueError(
            f"--resume_from_checkpoint {path}: --output_dir holds the later {later[-1]}, which a restart would "
            "resume instead: move it away first"
        )
    return path


def check_resume(path: str, state: dict, model_args: ModelArgs, args: argparse.Namespace, world_size: int) -> None:
    """Before anything slow: the checkpoint is whole and holds this model's tensors, and this launch continues
    its run with the same global batch (so that a step number keeps its records and learning rate) and seed."""
    saved, per_step = state["global_batch"], args.per_device_train_batch_size * world_size
    this_launch = per_step * args.gradient_accumulation_steps
    if saved % per_step:
        raise ValueError(
            f"{path}: trained with global batch {saved}, which {world_size} ranks x --per_device_train_batch_size "
            f"{args.per_device_train_batch_size} does not divide: choose a world size and micro-batch that do"
        )
    if saved != this_launch:
        raise ValueError(
            f"{path}: trained with global batch {saved}, this launch makes {this_launch}: pass "
            f"--gradient_accumulation_steps {saved // per_step} to continue the same run"
        )
    if state["seed"] != args.seed:
        raise ValueError(
            f"{path}: trained with --seed {state['seed']}; another seed reorders the records still to come"
        )
    if args.lora_r is not None and state.get("lora_alpha") != args.lora_alpha:
        was = "without LoRA" if state.get("lora_alpha") is None else f"with --lora_alpha {state['lora_alpha']}"
        raise ValueError(
            f"{path}: trained {was}; this launch has --lora_r {args.lora_r} --lora_alpha {args.lora_alpha}"
        )
    index = verify_checkpoint(path).state_dict_metadata
    params = {name: p for name, p in meta_model(model_args, args).named_parameters() if p.requires_grad}
    expected = {}
    for name, param in params.items():
        expected[f"model.{name}"] = param.shape
        expected[f"optim.state.{name}.exp_avg"] = expected[f"optim.state.{name}.exp_avg_sq"] = param.shape
        expected[f"optim.state.{name}.step"] = ()
    for key, shape in expected.items():
        entry = index.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise ValueError(f"{path}: no tensor {key!r}: not a checkpoint of this model")
        if tuple(entry.size) != tuple(shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(entry.size)}, this model's is {tuple(shape)}")


def load_checkpoint(model, optimizer, path: str) -> None:
    """Model and optimizer state, and this rank's RNG. Tensors only: DCP reads any other entry with
    torch.load(weights_only=False), which runs pickled code. The optimizer's hyperparameters are this launch's
    flags (and its learning rate is set at every step)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=TRAINED_ONLY)
    tensors = {"model": model_state, "optim": {"state": optim_state["state"]}}
    dcp.load(tensors, checkpoint_id=path)  # reads the index that check_resume has read safely
    optim_state["state"] = tensors["optim"]["state"]
    set_state_dict(
        model, optimizer, model_state_dict=tensors["model"], optim_state_dict=optim_state, options=TRAINED_ONLY
    )
    rng_file = os.path.join(path, f"rng-{dist.get_rank()}.pt")
    if os.path.isfile(rng_file):  # absent when resuming with more ranks than saved
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Measurement


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of this device: a table for GPUs, a measured bf16 matmul for the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)
    n, a = 1024, torch.randn(1024, 1024, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    a @ b
    start, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return peak_rss_bytes() / 1e9


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec, where ru_maxrss would carry
    over the peak of whatever process launched us."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, which has no /proc


# ---------------------------------------------------------------------------------------------------------
# Dry run: the plan on paper


def dry_run(args, model_args: ModelArgs, dataset, world_size: int, pad_id: int) -> None:
    """Memory per rank, steps and time of this run, from the config and the tokenized data alone."""
    a, gb = model_args, 1e9
    n_params = count_parameters(a)
    ranks = args.dry_run_gpus or world_size
    micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
    global_batch = micro * accumulation * ranks
    records = args.dry_run_records or len(dataset)
    steps_per_epoch = math.ceil(records / global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    lengths = [len(ids) for ids in dataset.ids]
    scale = records / len(dataset)  # --dry_run_records: the same length distribution, more records
    tokens_per_epoch = sum(lengths) * scale
    lora = args.lora_r is not None
    flops_per_epoch = training_flops(a, lengths, dataset.total_supervised(), frozen_weights=lora) * scale
    padding = padding_fraction(dataset, global_batch, micro, args.packing, args.model_max_length, pad_id, args.seed)

    # FSDP keeps 1/ranks of the fp32 weights, gradients and both AdamW moments on each rank; accumulating
    # without a reduce-scatter adds each block's unsharded fp32 gradient until the last micro-step. A frozen
    # base (LoRA) is only its 1/ranks in the compute dtype.
    act = 2 if args.bf16 else 4
    trained = sum(p.numel() for p in meta_model(a, args).parameters() if p.requires_grad)
    frozen = n_params if lora else 0
    sharded = (16 * trained + act * frozen) / ranks
    accumulated = 4 * trained if accumulation > 1 else 0
    block = a.dim * a.head_dim * 2 * (a.n_heads + a.n_kv_heads) + 3 * a.dim * a.hidden_dim
    gathered = 2 * act * max(block, 2 * a.dim * a.vocab_size)  # the unsharded block in use and the prefetched one
    tokens = micro * args.model_max_length
    # Saved for backward per token and layer: norms in fp32, q/k/v/attention/o and the SwiGLU intermediates.
    per_layer = act * (19 * a.dim + 4 * a.hidden_dim) + 8 * a.dim + (lora_activations(a, args, act) if lora else 0)
    layers_kept = 1 if args.gradient_checkpointing else a.n_layers
    activations = tokens * (layers_kept * per_layer + a.n_layers * act * a.dim * args.gradient_checkpointing)
    logits = 2 * 4 * min(4096, tokens) * a.vocab_size  # one chunk of fp32 logits and its gradient
    on_cpu = args.dry_run_gpu == "cpu"
    runtime = peak_rss_bytes() if on_cpu else 0  # python + torch
    total = sharded + accumulated + gathered + activations + logits + runtime
    peak = peak_flops(torch.device("cpu")) if on_cpu else GPU_PEAK_FLOPS[args.dry_run_gpu]
    epochs = total_steps / steps_per_epoch
    seconds = flops_per_epoch * epochs / (1 - padding) / (ranks * peak * args.dry_run_mfu)
    lora_line = (
        f"LoRA             r {args.lora_r} on {','.join(args.lora_target_modules)}: {trained / 1e6:.2f} M trained "
        f"parameters, the base frozen in {'bf16' if args.bf16 else 'fp32'}\n"
        if lora
        else ""
    )
    print(
        f"model            {n_params / 1e9:.3f} B parameters ({a.n_layers} layers, dim {a.dim}, vocab {a.vocab_size})\n"
        f"data             {records} records, {tokens_per_epoch / 1e6:.2f} M tokens per epoch (mean "
        f"{sum(lengths) / len(lengths):.0f}), {padding:.1%} padding {'packed' if args.packing else 'padded'}\n"
        f"batch            {micro} x {accumulation} accumulation x {ranks} ranks = {global_batch} records\n"
        f"steps            {total_steps} optimizer steps ({steps_per_epoch} per epoch), "
        f"{math.ceil(args.warmup_ratio * total_steps)} warmup\n"
        + lora_line
        + f"memory per rank  {'base + adapters' if lora else 'weights'}, grads, AdamW {sharded / gb:.2f} GB + "
        f"accumulated grads {accumulated / gb:.2f} GB + gathered blocks {gathered / gb:.2f} GB\n"
        f"                 + activations {activations / gb:.2f} GB + logits {logits / gb:.2f} GB"
        + (f" + runtime {runtime / gb:.2f} GB" if on_cpu else "")
        + f" = {total / gb:.2f} GB\n"
        f"compute          {flops_per_epoch * epochs / 1e15:.1f} PFLOP ({flops_per_epoch / tokens_per_epoch / 1e9:.1f} "
        f"GFLOP per token, {epochs:.2f} epochs)\n"
        f"time (estimate)  {seconds / 3600:.2f} h on {ranks} x {args.dry_run_gpu} at {args.dry_run_mfu:.0%} MFU"
    )
    if not on_cpu and total / gb > args.dry_run_gpu_memory_gb:
        hint = "more GPUs to shard over" if args.gradient_checkpointing else "--gradient_checkpointing True"
        print(f"                 more than {args.dry_run_gpu_memory_gb:.0f} GB: try {hint}")


def lora_activations(a: ModelArgs, args: argparse.Namespace, act: int) -> int:
    """What LoRA changes in one layer's saved activations per token. Frozen weights need no input kept for their
    gradient: the two norm products and the projections save none (5 x dim + hidden). Each adapted group of
    projections keeps its input again, each adapter its r-wide product, and dropout its output and mask."""
    targets = set(args.lora_target_modules)
    inputs = dict.fromkeys(["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], a.dim)
    inputs |= {"o_proj": a.n_heads * a.head_dim, "down_proj": a.hidden_dim}
    groups = [{"q_proj", "k_proj", "v_proj"}, {"o_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}]
    kept = sum(inputs[min(group)] for group in groups if group & targets)
    dropout = sum((act + 1) * inputs[t] for t in targets) if args.lora_dropout > 0 else 0
    return act * (kept - 5 * a.dim - a.hidden_dim + args.lora_r * len(targets)) + dropout


# ---------------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace) -> None:
    rank, world_size, device = setup_distributed()
    is_main = rank == 0
    if device.type == "cpu":
        tune_cpu_allocations()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        # cuDNN attention plans anew for every sequence length (~30 ms of CPU per call, measured on H100), and
        # packed or padded micro-batches change length every time: flash/efficient attention do not.
        torch.backends.cuda.enable_cudnn_sdp(False)
    # Every input is checked before anything slow starts, and nothing is written until all have passed.
    if not args.dry_run:
        check_output_dir(args.output_dir)
    dry = args.dry_run and not os.path.isdir(args.model_name_or_path)
    checkpoint_args = ModelArgs.from_name(args.model_name_or_path) if dry else read_args(args.model_name_or_path)
    tokenizer_path = args.tokenizer_path or os.path.join(args.model_name_or_path, "tokenizer.model")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.n_words > checkpoint_args.vocab_size:
        raise ValueError(
            f"{tokenizer_path}: {tokenizer.n_words} pieces, but the model's vocab_size is {checkpoint_args.vocab_size}"
        )
    if checkpoint_args.tie_word_embeddings:
        raise ValueError(f"{args.model_name_or_path}: tied input/output embeddings are not supported for training")
    model_args = ModelArgs(**vars(checkpoint_args))
    model_args.max_seq_len = max(model_args.max_seq_len, args.model_max_length)
    if args.lora_r is None:
        model_args.vocab_size = max(checkpoint_args.vocab_size, tokenizer.vocab_size)
        model_args.pad_token_id = pad_id = tokenizer.pad_id
    else:
        # LoRA keeps the base's vocabulary: padding is masked out of the loss and attention, so any id serves
        # (alpaca-lora's 0, <unk>).
        pad_id = tokenizer.unk_id
    if not dry:
        check_weights(args.model_name_or_path, checkpoint_args, model_args)
    resume = None if args.dry_run else resolve_resume(args)
    resume_state = read_trainer_state(resume) if resume else {}
    if resume:
        check_resume(resume, resume_state, model_args, args, world_size)

    dataset = rank0_first(lambda: load_dataset(args.data_path, tokenizer, args.model_max_length))
    if args.dry_run:
        if is_main:
            dry_run(args, model_args, dataset, world_size, pad_id)
        return
    if resume and resume_state["records"] != len(dataset):
        raise ValueError(
            f"{resume}: trained on {resume_state['records']} records, but {args.data_path} gives {len(dataset)} "
            f"with --model_max_length {args.model_max_length}: a step number would no longer mean the same records"
        )

    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    steps_per_epoch = math.ceil(len(dataset) / global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    start_step = resume_state.get("global_step", 0)
    on_rank0(lambda: prepare_output_dir(args.output_dir, start_step))
    if is_main:
        print(
            f"{len(dataset)} records ({dataset.dropped} dropped: no supervised token), {world_size} ranks on "
            f"{device.type}, global batch {global_batch}, {total_steps} steps ({warmup_steps} warmup)",
            file=sys.stderr,
        )

    torch.manual_seed(args.seed)
    model = build_model(model_args, args, device)
    load_weights(model, args.model_name_or_path, checkpoint_args)
    if args.lora_r is not None:
        init_adapters(model, args.seed)
    optimizer = make_optimizer(model, args)
    if resume:
        load_checkpoint(model, optimizer, resume)
        if is_main:
            print(f"resumed from {resume} at step {start_step}", file=sys.stderr)
    last_checkpoint = resume

    peak = peak_flops(device)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not is_main, dynamic_ncols=True)
    plan, plan_epoch = None, -1
    window_start, window_tokens, window_supervised, window_flops = time.perf_counter(), 0, 0, 0.0
    model.train()
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if epoch != plan_epoch:
            plan, plan_epoch = epoch_steps(len(dataset), global_batch, args.seed, epoch), epoch
        records = plan[step_in_epoch]
        micro_batches = rank_micro_batches(
            dataset, records, rank, world_size, args.per_device_train_batch_size, args.packing,
            args.model_max_length, pad_id,
        )  # fmt: skip
        n_supervised = sum(dataset.n_supervised(i) for i in records)
        lr = lr_at(step, total_steps, warmup_steps, args.learning_rate)
        loss, grad_norm = train_step(model, optimizer, micro_batches, n_supervised, lr, args, device)
        done = step + 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            problem = f"step {done}: loss {loss}, gradient norm {grad_norm}"
            if not args.skip_nonfinite:
                bar.close()  # the error then starts a line of its own
                raise ValueError(
                    f"{problem}; stopped before updating the weights. Last complete checkpoint: "
                    f"{last_checkpoint or 'none'}. Lower --learning_rate, or skip such steps with --skip_nonfinite"
                )
            if is_main:
                bar.write(f"warning: {problem}; step skipped, weights unchanged (--skip_nonfinite)", file=sys.stderr)
        lengths = [len(dataset.ids[i]) for i in records]
        window_tokens += sum(lengths)
        window_supervised += n_supervised
        window_flops += training_flops(model_args, lengths, n_supervised, frozen_weights=args.lora_r is not None)
        bar.update(1)
        if done % args.logging_steps == 0 or done == total_steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": done,
                "epoch": round(step / steps_per_epoch + 1 / steps_per_epoch, 4),
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "supervised_tokens": window_supervised,
                "seconds": elapsed,
                "supervised_tokens_per_s": window_supervised / elapsed,
                "tokens_per_s": window_tokens / elapsed,
                "mfu": window_flops / elapsed / (peak * world_size) if peak else None,
                "peak_memory_gb": peak_memory_gb(device),
            }
            if is_main:
                with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                mfu = f" mfu {record['mfu']:.1%}" if peak else ""
                bar.write(
                    f"step {done} epoch {record['epoch']:.2f} loss {loss:.4f} lr {lr:.3e} grad_norm "
                    f"{record['grad_norm']:.3f} {record['supervised_tokens_per_s']:.0f} sup tok/s{mfu} "
                    f"mem {record['peak_memory_gb']:.2f} GB"
                )
            window_start, window_tokens, window_supervised, window_flops = time.perf_counter(), 0, 0, 0.0
        end_of_epoch = done % steps_per_epoch == 0
        if (args.save_strategy == "steps" and done % args.save_steps == 0) or (
            args.save_strategy == "epoch" and end_of_epoch
        ):
            last_checkpoint = save_checkpoint(model, optimizer, done, args, len(dataset), device)
    bar.close()

    if not weights_finite(model, device):
        raise ValueError(f"the weights after step {total_steps} are not finite: not exported")

    dtype = getattr(torch, args.save_dtype)
    if args.lora_r is None:
        save = partial(save_hf_checkpoint, args.output_dir, model_args, tokenizer_path=tokenizer_path, dtype=dtype)
        write_on_rank0(save, full_tensors(model, device))
    else:
        config = adapter_config(
            args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, args.model_name_or_path
        )
        write_on_rank0(partial(save_adapter, args.output_dir, config), full_tensors(model, device, trainable_only=True))
        if args.save_merged:
            merged_dir = os.path.join(args.output_dir, "merged")
            save = partial(save_hf_checkpoint, merged_dir, model_args, tokenizer_path=tokenizer_path, dtype=dtype)
            write_on_rank0(save, merge_lora_tensors(full_tensors(model, device), args.lora_alpha / args.lora_r))
    if is_main:
        print(f"saved {args.output_dir}", file=sys.stderr)
    # The ranks leave together: one that tore its process group down while rank 0 was still writing the export
    # once aborted at exit ("terminate called without an active exception", gloo, after a torchrun restart).
    dist.barrier()


def main() -> None:
    rank = int(os.environ.get("RANK", 0))
    try:
        args = parse_args()
        train(args)
    except (ValueError, OSError) as e:
        if rank != 0:
            # Every check fails alike on all ranks, and rank 0 reports it: when it exits, torchrun stops this
            # rank. Exiting first would have torchrun stop rank 0 before it has printed. An error of this rank
            # alone is reported after the wait.
            time.sleep(30)
        print(f"error: {e}" if rank == 0 else f"error on rank {rank}: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Everything is written and the process group is gone. Twice on 28 Nov a rank then aborted in the interpreter's
    # teardown ("terminate called without an active exception": a C++ thread destroyed while joinable), which
    # fails a finished run; leaving without that teardown cannot.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
