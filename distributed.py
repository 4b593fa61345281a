"""FSDP2 under torchrun: the process group (or a one-process group without torchrun), the model sharded block
by block with its weights streamed into each rank's shards, and the full tensors gathered back for export."""

import argparse
import contextlib
import ctypes
import os
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from checkpoint import checked_tensors
from model import LoRALinear, ModelArgs, Transformer, apply_lora, cap_cpu_kernel_caches, init_lora_


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


def tune_cpu_allocations() -> None:
    """For training on the CPU, two changes to how memory is reused (BENCHMARKS.md has the figures):
    - glibc serves large allocations from its heap and keeps what is freed, instead of mapping each one afresh
      and unmapping it when freed, which paid every large temporary of a step again in page faults. The price
      is memory that stays resident once used. Elsewhere than glibc, this does nothing.
    - oneDNN and ideep keep 64 compiled matmuls, not 1024 (model.cap_cpu_kernel_caches): each new micro-batch
      length adds a few MB."""
    cap_cpu_kernel_caches()
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def on_rank0(fn):
    """fn() on rank 0 only. An error there is raised on every rank, so none is left waiting in a collective."""
    result, error = None, [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            error = [str(e)]
        except Exception as e:  # an unforeseen one still must not leave the other ranks waiting
            error = [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise ValueError(error[0])
    return result


def rank0_decides(fn):
    """fn() on rank 0, its result given to every rank: one answer where ranks on different machines might see
    different files."""
    result = [on_rank0(fn)]
    dist.broadcast_object_list(result, src=0)
    return result[0]


def rank0_first(fn):
    """fn() on rank 0, then on the others (which then find what rank 0 cached)."""
    result = on_rank0(fn)
    return result if dist.get_rank() == 0 else fn()


# The Trainer's --fsdp names. ZeRO-2 (shard_grad_op) does not reshard the weights after forward, so backward
# gathers nothing again; hybrid shards within a machine and replicates across machines, so that only gradients
# cross the network between them.
FSDP_STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "hybrid_shard_zero2")


def keeps_weights_gathered(strategy: str) -> bool:
    """ZeRO-2 (shard_grad_op, hybrid_shard_zero2): the weights stay gathered from forward to backward."""
    return strategy in ("shard_grad_op", "hybrid_shard_zero2")


def device_mesh(device: torch.device, strategy: str) -> DeviceMesh:
    """1-D over all ranks, or for hybrid strategies 2-D: (machines, ranks per machine), torchrun's
    LOCAL_WORLD_SIZE being the ranks of one machine."""
    world_size = dist.get_world_size()
    if not strategy.startswith("hybrid"):
        return init_device_mesh(device.type, (world_size,))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if world_size % per_node:
        raise ValueError(f"--fsdp {strategy}: every machine must run the same number of processes (--nproc_per_node)")
    return init_device_mesh(device.type, (world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def meta_model(model_args: ModelArgs, args: argparse.Namespace) -> Transformer:
    """The model on the meta device. With LoRA (--lora_r) the base is frozen and kept in the compute dtype (bf16:
    no fp32 copy, no gradient, no optimizer state for it), and only the adapters, in fp32, train."""
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
        mesh=device_mesh(device, args.fsdp_strategy),
        reshard_after_forward=not keeps_weights_gathered(args.fsdp_strategy),
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


def load_sharded_weights(model: Transformer, path: str, checkpoint_args: ModelArgs) -> None:
    """Streams the checkpoint tensor by tensor; each rank keeps only its shard of each."""
    params = dict(model.named_parameters())
    for name, full in checked_tensors(path, checkpoint_args, model):
        copy_shard(params[name], full)


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
    """This rank's shard of the full tensor into param, in param's dtype."""
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
