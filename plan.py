"""The run on paper: its schedule (global batch, steps, warmup) from the flags and the data, what a device can do
(peak FLOP/s, memory), and --dry_run's plan of memory per rank and time before anything is built."""

import argparse
import contextlib
import math
import resource
import time
from dataclasses import dataclass

import torch

from data import Dataset, padding_fraction
from distributed import keeps_weights_gathered, meta_model
from model import ModelArgs, count_parameters, training_flops

GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}
PCIE_BYTES_PER_S = 25e9  # what a PCIe 4.0 x16 link moves in practice, for --cpu_offload's copies


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


@dataclass
class Schedule:
    global_batch: int  # records per optimizer step, over all ranks and micro-batches
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def global_batch_size(args: argparse.Namespace, world_size: int) -> int:
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size


def schedule(args: argparse.Namespace, n_records: int, world_size: int) -> Schedule:
    """Steps of a run over n_records; warmup is ceil(warmup_ratio x steps), as the Trainer counts it."""
    global_batch = global_batch_size(args, world_size)
    steps_per_epoch = math.ceil(n_records / global_batch)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    return Schedule(global_batch, steps_per_epoch, total_steps, math.ceil(args.warmup_ratio * total_steps))


def memory_per_rank(args: argparse.Namespace, a: ModelArgs, ranks: int, nodes: int) -> dict[str, float]:
    """Bytes per rank of each part of training, from the config alone."""
    act = 2 if args.bf16 else 4
    n_params, trained = count_parameters(a), trained_parameters(a, args)
    lora = args.lora_r is not None
    block = a.dim * a.head_dim * 2 * (a.n_heads + a.n_kv_heads) + 3 * a.dim * a.hidden_dim
    gathered = 2 * act * max(block, 2 * a.dim * a.vocab_size)  # the unsharded block in use and the prefetched one
    if keeps_weights_gathered(args.fsdp_strategy):
        gathered = act * n_params  # ZeRO-2 keeps every block gathered from its forward to its backward
    tokens = args.per_device_train_batch_size * args.model_max_length
    # Saved for backward per token and layer: norms in fp32, q/k/v/attention/o and the SwiGLU intermediates.
    per_layer = act * (19 * a.dim + 4 * a.hidden_dim) + 8 * a.dim + (lora_activations(a, args, act) if lora else 0)
    layers_kept = 1 if args.gradient_checkpointing else a.n_layers
    # FSDP keeps 1/ranks of the fp32 weights, gradients and both AdamW moments on each rank; accumulating without
    # a reduce-scatter adds each block's unsharded fp32 gradient until the last micro-step. A frozen base (LoRA)
    # is only its 1/ranks in the compute dtype; the adapters are trained weights as above.
    sharded = (16 * trained + (act * n_params if lora else 0)) / shard_ranks(args.fsdp_strategy, ranks, nodes)
    return {
        ("base + adapters, grads, AdamW" if lora else "weights, grads, AdamW"): sharded,
        "accumulated grads": 4 * trained if args.gradient_accumulation_steps > 1 else 0,
        "gathered blocks": gathered,
        "activations": tokens * (layers_kept * per_layer + a.n_layers * act * a.dim * args.gradient_checkpointing),
        "logits": 2 * 4 * min(4096, tokens) * a.vocab_size,  # one chunk of fp32 logits and its gradient
    }


def shard_ranks(strategy: str, ranks: int, nodes: int) -> int:
    """The ranks that share one copy of the sharded state: a machine's with hybrid strategies, else all."""
    return ranks // nodes if strategy.startswith("hybrid") else ranks


def weight_gathers(strategy: str, accumulation_steps: int) -> int:
    """All-gathers of the weights per optimizer step: forward and backward of each micro-batch, or once (ZeRO-2)."""
    return 1 if keeps_weights_gathered(strategy) else 2 * accumulation_steps


def trained_parameters(a: ModelArgs, args: argparse.Namespace) -> int:
    """All of them, or with LoRA the adapters'."""
    return sum(p.numel() for p in meta_model(a, args).parameters() if p.requires_grad)


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


def network_bytes(
    args: argparse.Namespace, strategy: str, n_params: int, trained: int, ranks: int, nodes: int
) -> float:
    """Bytes each machine sends to the others per optimizer step, with ring collectives (each ring crosses out
    of a machine once); only the `trained` parameters (all, or LoRA's adapters) have gradients."""
    if nodes == 1:
        return 0.0
    if strategy.startswith("hybrid"):
        # Within a machine the gradients are reduce-scattered; across machines only the fp32 gradient shards
        # are all-reduced between the replicas, once per step.
        return 2 * (nodes - 1) / nodes * 4 * trained
    gathers = weight_gathers(strategy, args.gradient_accumulation_steps)
    return (ranks - 1) / ranks * (gathers * (2 if args.bf16 else 4) * n_params + 4 * trained)


def offload_bytes(args: argparse.Namespace, a: ModelArgs, ranks: int, nodes: int) -> float:
    """Bytes one rank copies between CPU and GPU memory per optimizer step with --cpu_offload: its shard of the
    weights up for every gather (forward and backward of each micro-batch, or once per step with
    shard_grad_op), in fp32 (a LoRA base in its compute dtype), and its fp32 gradient shard down once."""
    gathers = weight_gathers(args.fsdp_strategy, args.gradient_accumulation_steps)
    weight_bytes = 2 if args.lora_r is not None and args.bf16 else 4
    copies = gathers * weight_bytes * count_parameters(a) + 4 * trained_parameters(a, args)
    return copies / shard_ranks(args.fsdp_strategy, ranks, nodes)


def dry_run(args: argparse.Namespace, model_args: ModelArgs, dataset: Dataset, world_size: int, pad_id: int) -> None:
    """Memory per rank, steps and time of this run, from the config and the tokenized data alone."""
    a, gb = model_args, 1e9
    ranks = args.dry_run_gpus or world_size
    records = args.dry_run_records or len(dataset)
    plan = schedule(args, records, ranks)
    lengths = [len(ids) for ids in dataset.ids]
    scale = records / len(dataset)  # --dry_run_records: the same length distribution, more records
    tokens_per_epoch = sum(lengths) * scale
    lora = args.lora_r is not None
    flops_per_epoch = training_flops(a, lengths, dataset.total_supervised(), frozen_weights=lora) * scale
    micro = args.per_device_train_batch_size
    padding = padding_fraction(
        dataset, plan.global_batch, micro, args.packing, args.model_max_length, pad_id, args.seed
    )
    nodes = args.dry_run_nodes
    memory = memory_per_rank(args, a, ranks, nodes)
    on_cpu = args.dry_run_gpu == "cpu"
    offload_line = ""
    if args.cpu_offload and not on_cpu:
        host = memory.pop(next(iter(memory)))  # the sharded state lives in CPU memory, off the GPU
        copies = offload_bytes(args, a, ranks, nodes)
        offload_line = (
            f"--cpu_offload    {host / gb:.2f} GB of CPU memory per rank; {copies / gb:.1f} GB copied between CPU and "
            f"GPU per rank per step, {copies / PCIE_BYTES_PER_S:.1f} s at {PCIE_BYTES_PER_S / gb:.0f} GB/s\n"
        )
    if on_cpu:
        memory["runtime"] = peak_rss_bytes()  # python + torch
    total = sum(memory.values())
    parts = [f"{name} {size / gb:.2f} GB" for name, size in memory.items()]
    peak = peak_flops(torch.device("cpu")) if on_cpu else GPU_PEAK_FLOPS[args.dry_run_gpu]
    epochs = plan.total_steps / plan.steps_per_epoch
    seconds = flops_per_epoch * epochs / (1 - padding) / (ranks * peak * args.dry_run_mfu)
    lora_line = (
        f"LoRA             r {args.lora_r} on {','.join(args.lora_target_modules)}: "
        f"{trained_parameters(a, args) / 1e6:.2f} M trained parameters, the base frozen in "
        f"{'bf16' if args.bf16 else 'fp32'}\n"
        if lora
        else ""
    )
    print(
        f"model            {count_parameters(a) / 1e9:.3f} B parameters ({a.n_layers} layers, dim {a.dim}, "
        f"vocab {a.vocab_size})\n"
        f"data             {records} records, {tokens_per_epoch / 1e6:.2f} M tokens per epoch (mean "
        f"{sum(lengths) / len(lengths):.0f}), {padding:.1%} padding {'packed' if args.packing else 'padded'}\n"
        f"batch            {micro} x {args.gradient_accumulation_steps} accumulation x {ranks} ranks = "
        f"{plan.global_batch} records\n"
        f"steps            {plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch), "
        f"{plan.warmup_steps} warmup\n{lora_line}"
        f"memory per rank  {' + '.join(parts[:3])}\n"
        f"                 + {' + '.join(parts[3:])} = {total / gb:.2f} GB\n{offload_line}"
        f"compute          {flops_per_epoch * epochs / 1e15:.1f} PFLOP ({flops_per_epoch / tokens_per_epoch / 1e9:.1f} "
        f"GFLOP per token, {epochs:.2f} epochs)\n"
        f"time (estimate)  {seconds / 3600:.2f} h on {ranks} x {args.dry_run_gpu} at {args.dry_run_mfu:.0%} MFU"
    )
    if nodes > 1:
        n_params, trained, strategy = count_parameters(a), trained_parameters(a, args), args.fsdp_strategy
        flat = "full_shard" if strategy.startswith("hybrid") else "hybrid_shard"
        print(
            f"network per step {network_bytes(args, strategy, n_params, trained, ranks, nodes) / gb:.1f} GB out of "
            f"each of the {nodes} machines with {strategy} ({flat}: "
            f"{network_bytes(args, flat, n_params, trained, ranks, nodes) / gb:.1f} GB)"
        )
    if not on_cpu and total / gb > args.dry_run_gpu_memory_gb:
        hint = "more GPUs to shard over" if args.gradient_checkpointing else "--gradient_checkpointing True"
        print(f"                 more than {args.dry_run_gpu_memory_gb:.0f} GB: try {hint}")
