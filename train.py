"""Fine-tune LLaMA on Alpaca-format instruction data: torchrun, FSDP2, bf16, AdamW, warmup + cosine.

    torchrun --nproc_per_node=N train.py --model_name_or_path DIR --data_path alpaca_data.json --output_dir out
    python train.py ...   # one process, same flags

Flag names are those of the original Stanford Alpaca launch line (Hugging Face TrainingArguments), so that
line runs as written. Every rank holds only its FSDP shards of weights, gradients and optimizer state.
This file is the command line, one optimizer step and the loop; distributed.py sets up FSDP,
train_checkpoint.py saves and resumes, plan.py schedules and plans (--dry_run).
"""

import argparse
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from checkpoint import adapter_config, check_weights, read_args, save_adapter, save_hf_checkpoint
from cli import ArgumentParser, str2bool
from data import Batch, Dataset, epoch_steps, load_dataset, rank_micro_batches
from distributed import (
    FSDP_STRATEGIES,
    build_model,
    full_tensors,
    init_adapters,
    keeps_weights_gathered,
    load_sharded_weights,
    on_rank0,
    rank0_decides,
    rank0_first,
    setup_distributed,
    tune_cpu_allocations,
    weights_finite,
    write_on_rank0,
)
from model import LORA_TARGETS, ModelArgs, Transformer, document_mask, merge_lora_tensors, training_flops
from plan import GPU_PEAK_FLOPS, Schedule, dry_run, peak_flops, peak_memory_gb, schedule
from tokenizer import Tokenizer
from train_checkpoint import (
    check_output_dir,
    check_resume,
    load_checkpoint,
    prepare_output_dir,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
)

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


REPORT_TO = ["none", "tensorboard", "wandb"]


def module_list(value: str) -> list[str]:
    """'q_proj,v_proj', or alpaca-lora's '[q_proj,v_proj]' (quotes and spaces allowed)."""
    return [name.strip(" '\"") for name in value.strip().removeprefix("[").removesuffix("]").split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g("--seed", type=int, default=42)
    flag("--bf16", default=True, help="bf16 compute, fp32 master weights and gradient reduction")
    flag("--tf32", default=True, help="TF32 for the fp32 matmuls that remain (CUDA)")
    flag("--packing", default=True, help="pack records into rows (same records per step, no padding compute)")
    flag("--gradient_checkpointing", default=False, help="recompute each block's activations in backward")
    flag("--cpu_offload", default=False, help="keep parameters, gradients and optimizer state in CPU memory")
    flag("--compile", default=False, help="torch.compile each decoder block")
    flag("--skip_nonfinite", default=False, help="skip a step whose loss or gradient norm is not finite, not stop")
    g("--logging_steps", type=int, default=1)
    g("--report_to", nargs="+", default=["none"], choices=REPORT_TO, metavar="{none,tensorboard,wandb}",
      help="where each logged step also goes: tensorboard (events in output_dir/runs/), wandb (WANDB_MODE=offline "
      "works without a network), or none (default): metrics.jsonl only")  # fmt: skip
    g("--save_strategy", default="steps", choices=["steps", "epoch", "no"])
    g("--save_steps", type=int, default=2000)
    g("--save_total_limit", type=int, default=None)
    g("--resume_from_checkpoint", help="a checkpoint-<step> directory, or 'latest' in output_dir")
    g("--save_dtype", default="bfloat16", choices=["bfloat16", "float32"], help="dtype of the final export")
    g("--lora_r", type=int, help="train LoRA adapters of this rank, not the weights (alpaca-lora: 8); default: off")
    g("--lora_alpha", type=float, default=16, help="LoRA scaling is lora_alpha / lora_r")
    g("--lora_dropout", type=float, default=0.05, help="dropout on the adapters' input")
    g("--lora_target_modules", type=module_list, default="q_proj,v_proj", help="or alpaca-lora's '[q_proj,v_proj]'")
    flag("--save_merged", default=False, help="with LoRA, also export the merged model to output_dir/merged")
    g("--dry_run", action="store_true", help="print the memory, steps and time this run would take; train nothing")
    g("--dry_run_gpus", type=int, help="world size to plan for (default: this launch's)")
    g("--dry_run_nodes", type=int, default=1, help="machines the --dry_run_gpus are spread over (default: 1)")
    g("--dry_run_gpu", default="A100", help=f"device to plan for: cpu or one of {', '.join(GPU_PEAK_FLOPS)}")
    g("--dry_run_records", type=int, help="plan for this many records with the data's length distribution")
    g("--dry_run_gpu_memory_gb", type=float, default=80)
    g("--dry_run_mfu", type=float, default=0.45, help="MFU assumed for the time estimate")
    # Trainer flags of the original launch line. --fsdp picks the sharding strategy; the others are checked to ask for
    # what this loop does (each decoder layer wrapped; no DeepSpeed).
    g("--fsdp", default="full_shard auto_wrap")
    g("--fsdp_transformer_layer_cls_to_wrap", default="LlamaDecoderLayer")
    g("--deepspeed", help="not supported: use --cpu_offload")
    # Accepted for the original launch line and never read: the schedule is always warmup + cosine, and nothing is
    # evaluated during training.
    g("--lr_scheduler_type", default="cosine", choices=["cosine"])
    g("--evaluation_strategy", "--eval_strategy", default="no", choices=["no"])
    g("--per_device_eval_batch_size", type=int, default=4)
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
    words = args.fsdp.split()
    strategies = [word for word in words if word in FSDP_STRATEGIES]
    if len(strategies) != 1 or "auto_wrap" not in words or not set(words) <= {*FSDP_STRATEGIES, "auto_wrap", "offload"}:
        raise ValueError(
            f"--fsdp {args.fsdp!r}: expected one of {', '.join(FSDP_STRATEGIES)}, then auto_wrap (each decoder "
            "layer is its own FSDP unit), optionally offload"
        )
    args.fsdp_strategy = strategies[0]
    args.cpu_offload = args.cpu_offload or "offload" in words
    if args.cpu_offload and not args.dry_run and not torch.cuda.is_available():
        raise ValueError(
            "--cpu_offload: FSDP's CPU offload keeps the state in CPU memory and computes on a GPU, and this machine "
            "has none; without a GPU, training already runs in CPU memory: leave the flag out"
        )
    if args.fsdp_transformer_layer_cls_to_wrap not in ("LlamaDecoderLayer", "Block"):
        raise ValueError(
            f"--fsdp_transformer_layer_cls_to_wrap {args.fsdp_transformer_layer_cls_to_wrap!r}: "
            "each LLaMA decoder layer is always wrapped; expected LlamaDecoderLayer"
        )
    for package in set(args.report_to) - {"none"}:
        try:
            importlib.import_module(package)
        except ImportError:
            raise ValueError(
                f"--report_to {package}: the {package} package is not installed (pip install {package})"
            ) from None
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
    for name in ["dry_run_gpus", "dry_run_nodes", "dry_run_records"]:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise ValueError(f"--save_total_limit must be >= 1, got {args.save_total_limit}")
    if args.dry_run_nodes > 1 and (args.dry_run_gpus is None or args.dry_run_gpus % args.dry_run_nodes):
        raise ValueError(
            f"--dry_run_nodes {args.dry_run_nodes}: needs --dry_run_gpus, a multiple of it (the GPUs of all machines)"
        )
    if args.dry_run and args.dry_run_gpu not in [*GPU_PEAK_FLOPS, "cpu"]:
        raise ValueError(f"--dry_run_gpu {args.dry_run_gpu!r}: expected one of {', '.join(GPU_PEAK_FLOPS)}")
    if args.lora_r is not None:
        check_lora_args(args)
    elif args.save_merged:
        raise ValueError("--save_merged goes with --lora_r: without LoRA the export is the whole model already")


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
# One optimizer step


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
    # ZeRO-2 keeps the gathered weights from one micro-batch's forward to the last one's backward: one all-gather
    # per step instead of two per micro-batch, for the memory of the whole bf16 model on each rank.
    keep_gathered = keeps_weights_gathered(args.fsdp_strategy)
    for i, kwargs in enumerate(inputs):
        last = i == len(inputs) - 1
        model.set_requires_gradient_sync(last)
        if keep_gathered:
            model.set_reshard_after_backward(last)
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
# The run


def configure_device(device: torch.device, tf32: bool) -> None:
    if device.type == "cpu":
        tune_cpu_allocations()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        # cuDNN attention plans anew for every sequence length, a host cost per call, and packed or padded
        # micro-batches change length every time: flash/efficient attention do not.
        torch.backends.cuda.enable_cudnn_sdp(False)


def read_model_config(args: argparse.Namespace) -> tuple[Tokenizer, str, ModelArgs, ModelArgs]:
    """(tokenizer, its path, the checkpoint's config, the config trained): the model grows by the tokenizer's
    added `[PAD]` row (not with LoRA, which keeps the base's vocabulary) and to the context that
    --model_max_length asks for. The weights are checked against them from the file headers; a --dry_run of a
    preset name ("7B") has no weights to check."""
    preset = args.dry_run and not os.path.isdir(args.model_name_or_path)
    checkpoint_args = ModelArgs.from_name(args.model_name_or_path) if preset else read_args(args.model_name_or_path)
    tokenizer_path = args.tokenizer_path or os.path.join(args.model_name_or_path, "tokenizer.model")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.n_words > checkpoint_args.vocab_size:
        raise ValueError(
            f"{tokenizer_path}: {tokenizer.n_words} pieces, but the model's vocab_size is {checkpoint_args.vocab_size}"
        )
    if checkpoint_args.tie_word_embeddings:
        raise ValueError(f"{args.model_name_or_path}: tied input/output embeddings are not supported for training")
    model_args = ModelArgs(**vars(checkpoint_args))
    if args.lora_r is None:
        model_args.vocab_size = max(checkpoint_args.vocab_size, tokenizer.vocab_size)
        model_args.pad_token_id = tokenizer.pad_id
    model_args.max_seq_len = max(model_args.max_seq_len, args.model_max_length)
    if not preset:
        check_weights(args.model_name_or_path, checkpoint_args, model_args)
    return tokenizer, tokenizer_path, checkpoint_args, model_args


def train(args: argparse.Namespace) -> None:
    rank, world_size, device = setup_distributed()
    configure_device(device, args.tf32)
    # Every input is checked before anything slow starts, and nothing is written until all have passed.
    if not args.dry_run:
        check_output_dir(args.output_dir)
    tokenizer, tokenizer_path, checkpoint_args, model_args = read_model_config(args)
    # Rank 0 decides, so that every rank resumes the same checkpoint (output_dir must be on a shared filesystem).
    resume = None if args.dry_run else rank0_decides(lambda: resolve_resume(args))
    resume_state = read_trainer_state(resume) if resume else {}
    if resume:
        check_resume(resume, resume_state, model_args, args, world_size)
    dataset = rank0_first(lambda: load_dataset(args.data_path, tokenizer, args.model_max_length))
    # Padding is masked out of the loss and attention, so with LoRA, which has no `[PAD]` row, any id serves
    # (alpaca-lora's 0, <unk>).
    pad_id = tokenizer.pad_id if args.lora_r is None else tokenizer.unk_id
    if args.dry_run:
        if rank == 0:
            dry_run(args, model_args, dataset, world_size, pad_id)
        return
    if resume and resume_state["records"] != len(dataset):
        raise ValueError(
            f"{resume}: trained on {resume_state['records']} records, but {args.data_path} gives {len(dataset)} "
            f"with --model_max_length {args.model_max_length}: a step number would no longer mean the same records"
        )

    plan = schedule(args, len(dataset), world_size)
    start_step = resume_state.get("global_step", 0)
    on_rank0(lambda: prepare_output_dir(args.output_dir, start_step))
    if rank == 0:
        print(
            f"{len(dataset)} records ({dataset.dropped} dropped: no supervised token), {world_size} ranks on "
            f"{device.type}, global batch {plan.global_batch}, {plan.total_steps} steps ({plan.warmup_steps} warmup)",
            file=sys.stderr,
        )
    torch.manual_seed(args.seed)
    model = build_model(model_args, args, device)
    load_sharded_weights(model, args.model_name_or_path, checkpoint_args)
    if args.lora_r is not None:
        init_adapters(model, args.seed)
    optimizer = make_optimizer(model, args)
    if resume:
        load_checkpoint(model, optimizer, resume)
        if rank == 0:
            print(f"resumed from {resume} at step {start_step}", file=sys.stderr)

    run = Run(args, model_args, dataset, plan, device, pad_id, Reporters(args) if rank == 0 else None)
    try:
        run_steps(model, optimizer, run, start_step, last_checkpoint=resume)
    finally:
        if run.reporters is not None:
            run.reporters.close()
    export(model, run, tokenizer_path)


@dataclass
class Run:
    """What stays fixed over a run, once every input has been checked."""

    args: argparse.Namespace
    model_args: ModelArgs
    dataset: Dataset
    plan: Schedule
    device: torch.device
    pad_id: int
    reporters: "Reporters | None"  # rank 0's; None on the other ranks

    def trainer_state(self) -> dict:
        """What a checkpoint records so that a resumed run can check it continues the same run."""
        records, world_size = len(self.dataset), dist.get_world_size()
        state = {
            "global_batch": self.plan.global_batch,
            "seed": self.args.seed,
            "records": records,
            "world_size": world_size,
        }
        if self.args.lora_r is not None:
            state["lora_alpha"] = self.args.lora_alpha  # r and the targets show in the tensors' names and shapes
        return state


@dataclass
class Window:
    """What the steps since the last log line did, for their throughput and MFU."""

    start: float
    tokens: int = 0
    supervised: int = 0
    flops: float = 0.0


def run_steps(model: Transformer, optimizer, run: Run, start_step: int, last_checkpoint: str | None) -> None:
    """The optimizer steps from start_step on: each step's records in the seed's order for its epoch, logs every
    --logging_steps, a checkpoint by --save_strategy."""
    args, dataset, plan, device = run.args, run.dataset, run.plan, run.device
    rank, world_size = dist.get_rank(), dist.get_world_size()
    peak = peak_flops(device)
    bar = tqdm(total=plan.total_steps, initial=start_step, desc="train", disable=rank != 0, dynamic_ncols=True)
    order, order_epoch = None, -1
    window = Window(time.perf_counter())
    model.train()
    for step in range(start_step, plan.total_steps):
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_steps(len(dataset), plan.global_batch, args.seed, epoch), epoch
        records = order[step_in_epoch]
        micro_batches = rank_micro_batches(
            dataset, records, rank, world_size, args.per_device_train_batch_size, args.packing,
            args.model_max_length, run.pad_id,
        )  # fmt: skip
        n_supervised = sum(dataset.n_supervised(i) for i in records)
        lr = lr_at(step, plan.total_steps, plan.warmup_steps, args.learning_rate)
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
            if rank == 0:
                bar.write(f"warning: {problem}; step skipped, weights unchanged (--skip_nonfinite)", file=sys.stderr)
        lengths = [len(dataset.ids[i]) for i in records]
        window.tokens += sum(lengths)
        window.supervised += n_supervised
        window.flops += training_flops(run.model_args, lengths, n_supervised, frozen_weights=args.lora_r is not None)
        bar.update(1)
        if done % args.logging_steps == 0 or done == plan.total_steps:
            log_metrics(done, done / plan.steps_per_epoch, loss, lr, grad_norm, window, peak, run, bar)
            window = Window(time.perf_counter())
        end_of_epoch = done % plan.steps_per_epoch == 0
        if (args.save_strategy == "steps" and done % args.save_steps == 0) or (
            args.save_strategy == "epoch" and end_of_epoch
        ):
            last_checkpoint = save_checkpoint(model, optimizer, done, args, run.trainer_state(), device)
    bar.close()


def log_metrics(step: int, epoch: float, loss: float, lr: float, grad_norm: float, window: Window,
                peak: float | None, run: Run, bar: tqdm) -> None:  # fmt: skip
    """One line of output_dir/metrics.jsonl, and one on the progress bar, from rank 0."""
    elapsed = time.perf_counter() - window.start
    record = {
        "step": step,
        "epoch": round(epoch, 4),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "supervised_tokens": window.supervised,
        "seconds": elapsed,
        "supervised_tokens_per_s": window.supervised / elapsed,
        "tokens_per_s": window.tokens / elapsed,
        "mfu": window.flops / elapsed / (peak * dist.get_world_size()) if peak else None,
        "peak_memory_gb": peak_memory_gb(run.device),
    }
    if dist.get_rank() != 0:
        return
    with open(os.path.join(run.args.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    run.reporters.log(record)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    mfu = f" mfu {record['mfu']:.1%}" if peak else ""
    bar.write(
        f"step {step} epoch {record['epoch']:.2f} loss {loss:.4f} lr {lr:.3e} grad_norm {grad_norm:.3f} "
        f"{record['supervised_tokens_per_s']:.0f} sup tok/s{mfu} mem {record['peak_memory_gb']:.2f} GB"
    )


class Reporters:
    """--report_to: every metrics.jsonl record also goes, as the scalars train/<field> at its step (lr as
    train/learning_rate, the Trainer's name), to TensorBoard and/or Weights & Biases. Rank 0's only. Each package is
    imported here, so that --report_to none costs nothing."""

    def __init__(self, args: argparse.Namespace):
        self.tensorboard = self.wandb = None
        if "tensorboard" in args.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=os.path.join(args.output_dir, "runs"))
        if "wandb" in args.report_to:
            import wandb

            self.wandb = wandb.init(dir=args.output_dir, config=vars(args))

    def log(self, record: dict) -> None:
        scalars = {f"train/{'learning_rate' if k == 'lr' else k}": v for k, v in record.items() if k != "step"}
        scalars = {tag: value for tag, value in scalars.items() if value is not None}  # mfu of an unknown device
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, record["step"])
            self.tensorboard.flush()  # a run that stops still shows every step it logged
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def export(model: Transformer, run: Run, tokenizer_path: str) -> None:
    """The trained weights, gathered from every rank and written by rank 0 to output_dir: a Hugging Face
    directory, or with LoRA a PEFT adapter directory (and with --save_merged the merged model in merged/)."""
    if not weights_finite(model, run.device):
        raise ValueError(f"the weights after step {run.plan.total_steps} are not finite: not exported")
    args, device = run.args, run.device
    dtype = getattr(torch, args.save_dtype)
    if args.lora_r is None:
        save = partial(save_hf_checkpoint, args.output_dir, run.model_args, tokenizer_path=tokenizer_path, dtype=dtype)
        write_on_rank0(save, full_tensors(model, device))
    else:
        config = adapter_config(
            args.lora_r,
            args.lora_alpha,
            args.lora_dropout,
            args.lora_target_modules,
            os.path.abspath(args.model_name_or_path),  # generate.py may run from another directory
        )
        write_on_rank0(partial(save_adapter, args.output_dir, config), full_tensors(model, device, trainable_only=True))
        if args.save_merged:
            merged_dir = os.path.join(args.output_dir, "merged")
            save = partial(save_hf_checkpoint, merged_dir, run.model_args, tokenizer_path=tokenizer_path, dtype=dtype)
            write_on_rank0(save, merge_lora_tensors(full_tensors(model, device), args.lora_alpha / args.lora_r))
    if dist.get_rank() == 0:
        print(f"saved {args.output_dir}", file=sys.stderr)
    # The ranks leave together: one that tore its process group down while rank 0 was still writing the export
    # could abort at exit (gloo, after a torchrun restart).
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
    # Everything is written and the process group is gone. A rank could still abort in the interpreter's teardown
    # (a C++ thread destroyed while joinable), failing a finished run; leaving without that teardown cannot.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
