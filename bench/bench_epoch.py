"""A whole training epoch, whole process, wall clock: train.py against the original recipe on the Hugging Face
Trainer, and train.py on 2 processes against 1 process on the same cores.

    python bench/bench_epoch.py [--dim 512 --layers 6 --records 256 --runs 2]

The same random LLaMA (real 32000-piece tokenizer) and the first `--records` records of alpaca_sample.json,
global batch 16 (micro-batch 4), lr 2e-5, warmup 0.03, cosine, bf16, one epoch, no checkpoint. Sides:
- `trainer`: stanford_alpaca's train.py recipe on transformers' Trainer under `torchrun --nproc_per_node=2`
  (records padded per micro-batch, the loss averaged per micro-batch; DDP, since the Trainer's FSDP needs a GPU),
  tokenized by data.py, which gives the original pipeline's ids and labels (tests/test_data.py);
- `ours, 2 processes`: `torchrun --nproc_per_node=2 train.py` with --fsdp as given (default full_shard);
- `ours, 1 process`: `python train.py`, its one process using both cores.
Each side runs `--runs` times, alternating, and keeps its best wall time (start to exit, export included).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)
from checkpoint import save_hf_checkpoint  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402

TRAINER_RECIPE = """
import sys, torch, transformers
sys.path.insert(0, {root!r})
from data import load_dataset
from tokenizer import Tokenizer

model_dir, data_path, out = sys.argv[1:4]
tokenizer = Tokenizer(model_dir + "/tokenizer.model")
dataset = load_dataset(data_path, tokenizer, 512)
records = [dict(input_ids=torch.tensor(ids), labels=torch.tensor(dataset.labels(i)))
           for i, ids in enumerate(dataset.ids)]

def collate(instances):  # stanford_alpaca's DataCollatorForSupervisedDataset
    pad = torch.nn.utils.rnn.pad_sequence
    input_ids = pad([r["input_ids"] for r in instances], batch_first=True, padding_value=tokenizer.pad_id)
    labels = pad([r["labels"] for r in instances], batch_first=True, padding_value=-100)
    return dict(input_ids=input_ids, labels=labels, attention_mask=input_ids.ne(tokenizer.pad_id))

model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.resize_token_embeddings(tokenizer.vocab_size)  # the added [PAD]
args = transformers.TrainingArguments(
    output_dir=out, num_train_epochs=1, per_device_train_batch_size=4, gradient_accumulation_steps={accumulation},
    learning_rate=2e-5, weight_decay=0.0, warmup_steps=0.03, lr_scheduler_type="cosine", logging_steps=1,
    save_strategy="no", bf16=True, use_cpu=True, report_to=[], seed=42, dataloader_num_workers=0,
)
trainer = transformers.Trainer(model=model, args=args, train_dataset=records, data_collator=collate)
trainer.train()
trainer.save_model(out)
"""


def timed(cmd: list[str], threads: int) -> float:
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "XDG_CACHE_HOME": tempfile.mkdtemp()}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--records", type=int, default=256)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--fsdp", default="full_shard auto_wrap", help="train.py's --fsdp for the 2-process side")
    a = p.parse_args()
    args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.dim // 64, hidden_dim=a.dim * 8 // 3, vocab_size=32000)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        model, data = os.path.join(work, "model"), os.path.join(work, "data.json")
        save_hf_checkpoint(model, args, Transformer(args).named_parameters(), f"{SHARED}/llama_tokenizer.model")
        with open(os.path.join(SHARED, "alpaca_sample.json")) as f, open(data, "w") as out:
            json.dump(json.load(f)[: a.records], out)
        recipe = os.path.join(work, "trainer_recipe.py")
        with open(recipe, "w") as f:
            f.write(TRAINER_RECIPE.format(root=ROOT, accumulation=2))
        ours = [os.path.join(ROOT, "train.py"), "--model_name_or_path", model, "--data_path", data]
        ours += ["--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--save_strategy", "no"]
        sides = {
            "trainer": (torchrun + [recipe, model, data, os.path.join(work, "hf")], 1),
            "ours, 2 processes": (torchrun + ours + ["--gradient_accumulation_steps", "2", "--fsdp", a.fsdp,
                                                     "--output_dir", os.path.join(work, "two")], 1),
            "ours, 1 process": ([sys.executable] + ours + ["--gradient_accumulation_steps", "4",
                                                           "--output_dir", os.path.join(work, "one")], 2),
        }  # fmt: skip
        best = {}
        for _ in range(a.runs):
            for name, (cmd, threads) in sides.items():
                best[name] = min(best.get(name, float("inf")), timed(cmd, threads))
    print(f"model dim {a.dim}, {a.layers} layers; {a.records} records, global batch 16, one epoch, bf16")
    for name, seconds in best.items():
        print(f"{name:18s} {seconds:6.1f} s")
    print(f"ours (2 processes) / trainer speed: {best['trainer'] / best['ours, 2 processes']:.2f}x")
    print(f"2 processes / 1 process time: {best['ours, 2 processes'] / best['ours, 1 process']:.2f}x")


if __name__ == "__main__":
    main()
