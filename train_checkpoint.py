"""Training checkpoints: output_dir/checkpoint-<step>/ with torch.distributed.checkpoint (model and optimizer
shards, each rank's RNG, trainer_state.json). Each is written aside, verified, then renamed, so the newest
checkpoint-<step> is always a complete one; older ones are rotated away; a run resumes from one after checks
that it belongs to the same model, batch and seed."""

import argparse
import json
import os
import pickle
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from distributed import meta_model, on_rank0, weights_finite
from model import ModelArgs
from plan import global_batch_size


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


# A checkpoint holds what training changes: with LoRA the adapters and their optimizer state, not the base.
# Loading one then leaves the frozen base as it is (strict=False); check_resume has found every trained tensor.
TRAINED_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)


def check_resume(path: str, state: dict, model_args: ModelArgs, args: argparse.Namespace, world_size: int) -> None:
    """Before anything slow: the checkpoint is whole and holds this model's tensors, and this launch continues
    its run with the same global batch (so that a step number keeps its records and learning rate) and seed."""
    saved, per_step = state["global_batch"], args.per_device_train_batch_size * world_size
    this_launch = global_batch_size(args, world_size)
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


def save_checkpoint(model, optimizer, step: int, args: argparse.Namespace, run_state: dict, device) -> str:
    """Written aside as checkpoint-<step>.partial, verified, then renamed: a kill at any moment leaves the
    previous checkpoint or this one as the newest checkpoint-<step>, never a partial one under that name.
    run_state (global_batch, seed, records, world_size) goes into its trainer_state.json."""
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
    state = {"global_step": step, **run_state}
    on_rank0(lambda: publish_checkpoint(partial_dir, final, state, args))
    return final


def publish_checkpoint(partial_dir: str, final: str, state: dict, args: argparse.Namespace) -> None:
    """Rank 0: verifies what every rank wrote, writes trainer_state.json last, renames, then rotates."""
    verify_checkpoint(partial_dir)
    for rank in range(dist.get_world_size()):
        if not os.path.isfile(os.path.join(partial_dir, f"rng-{rank}.pt")):
            raise ValueError(f"{partial_dir}: rank {rank} wrote no RNG state")
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


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


TRAINER_STATE_FIELDS = ("global_step", "global_batch", "seed", "records")


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


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
