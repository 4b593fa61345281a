"""Stanford's release format: the fine-tuned model as a weight diff against LLaMA, which only someone who has
LLaMA can turn back into the model.

    python weight_diff.py make_diff --path_raw LLAMA_DIR --path_tuned TUNED_DIR --path_diff DIFF_DIR
    python weight_diff.py recover --path_raw LLAMA_DIR --path_diff DIFF_DIR --path_tuned OUT_DIR [--test_inference]

The command line and the arithmetic are stanford_alpaca's weight_diff.py, so that its diffs recover here and
ours there: the diff is a Hugging Face directory in fp32 that holds tuned - raw, with the tuned model's tokenizer
files, raw having first gained the `[PAD]` row that train.py adds (the mean of its rows) if its tokenizer has no
pad token. Unlike the original, the tensors stream one at a time (memory: one output shard and a few tensors,
not two fp32 models), and in place of a weight sum that only fits 7B, make_diff writes the SHA-256 of every tensor
that recover must produce (weight_diff.json); recover checks each one, and writes to OUT_DIR.partial, which takes
its name only once all have matched.
"""

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from checkpoint import (
    MAX_SHARD_BYTES,
    checked_tensors,
    hf_key,
    load_model,
    read_model_args,
    read_tensor,
    save_hf_checkpoint,
    weight_index,
    write_json,
)
from cli import ArgumentParser, exit_on_user_error, str2bool
from engine import generate
from loading import pick_device
from model import ModelArgs, Transformer
from tokenizer import Tokenizer

CHECKSUMS = "weight_diff.json"
TOKENIZER_FILES = ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
TOKENIZER_FILES += ["added_tokens.json"]
# The original's --test_inference prompt, its "\r\n" included.
TEST_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\r\n\r\n### Instruction:\r\nList three technologies that make life easier.\r\n\r\n### Response:"
)
ARCHITECTURE = ["dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "tie_word_embeddings"]


# ---------------------------------------------------------------------------------------------------------
# Reading both sides


def raw_vocab_size(path_raw: str, raw_args: ModelArgs) -> int:
    """raw's embedding rows once it has a pad token: one more (`[PAD]`) if neither its SentencePiece model nor its
    Hugging Face tokenizer files have one, as the original's smart_tokenizer_and_embedding_resize does."""
    tokenizer = Tokenizer(os.path.join(path_raw, "tokenizer.model"))
    special_tokens = os.path.join(path_raw, "special_tokens_map.json")
    has_pad = tokenizer.pad_id < tokenizer.n_words
    if os.path.isfile(special_tokens):
        with open(special_tokens, encoding="utf-8") as f:
            has_pad = has_pad or bool(json.load(f).get("pad_token"))
    return raw_args.vocab_size if has_pad else max(raw_args.vocab_size, tokenizer.n_words + 1)


def raw_tensors(path_raw: str, target: ModelArgs, read_data: bool = True) -> Iterator[tuple[str, Tensor]]:
    """raw's tensors in fp32, one at a time (any format checkpoint.load_model reads), checked against the shapes
    of the model of `target`, the embeddings with their `[PAD]` row. The row's mean is taken in fp32 on the CPU,
    as the original takes it, so the same raw always gives the same row."""
    raw_args = read_model_args(path_raw)
    for field in ARCHITECTURE:
        if getattr(raw_args, field) != getattr(target, field):
            raise ValueError(
                f"--path_raw {path_raw}: {field} {getattr(raw_args, field)}, but the fine-tuned model's is "
                f"{getattr(target, field)}: not the model it was fine-tuned from"
            )
    if (rows := raw_vocab_size(path_raw, raw_args)) != target.vocab_size:
        raise ValueError(
            f"--path_raw {path_raw}: {rows} embedding rows with its pad token, but the fine-tuned model has "
            f"{target.vocab_size}: not the model it was fine-tuned from"
        )
    with torch.device("meta"):
        model = Transformer(target)
    return checked_tensors(path_raw, raw_args, model, read_data, dtype=torch.float32)


def hf_tensors(path: str, target: ModelArgs, path_raw: str) -> dict[str, str]:
    """Our parameter name -> file for the Hugging Face directory at path, checked from the headers of both sides
    to hold exactly raw's tensors in their shapes before anything is computed."""
    index = weight_index(path)
    if target.tie_word_embeddings:
        index.pop("lm_head.weight", None)
    expected = dict(raw_tensors(path_raw, target, read_data=False))
    for name, (file, tensor) in index.items():
        if name not in expected:
            raise ValueError(f"{file}: unexpected tensor {hf_key(name)!r} for a LLaMA model")
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{file}: tensor {hf_key(name)!r} has shape {tuple(tensor.shape)}, but {path_raw}'s is "
                f"{tuple(expected[name].shape)}"
            )
    if missing := [name for name in expected if name not in index]:
        raise ValueError(f"{path}: missing tensor {hf_key(missing[0])!r} ({len(missing)} missing in all)")
    return {name: file for name, (file, _) in index.items()}


def sha256(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def written_aside(path: str) -> Iterator[str]:
    """path.partial to write into, renamed to path once the block has finished and removed if it has not: a
    failed or interrupted run leaves nothing that looks complete."""
    path = path.rstrip(os.sep)
    if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
        raise ValueError(f"{path} already exists: remove it or choose another path")
    partial = path + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # what an earlier run that was killed left
    os.makedirs(partial)
    try:
        yield partial
        if os.path.isdir(path):
            os.rmdir(path)  # empty (checked above)
        os.replace(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def copy_tokenizer_files(src: str, dst: str) -> None:
    copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
    if not copied:
        raise FileNotFoundError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for f in copied:
        shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))


# ---------------------------------------------------------------------------------------------------------
# The two tasks


@torch.inference_mode()
def make_diff(
    path_raw: str, path_tuned: str, path_diff: str, device: str = "cpu", max_shard_bytes: int = MAX_SHARD_BYTES
) -> None:
    """path_diff = path_tuned - path_raw in fp32, with path_tuned's config and tokenizer files, and the SHA-256 of
    each tensor that raw + diff gives."""
    tuned_args = read_model_args(path_tuned)
    files = hf_tensors(path_tuned, tuned_args, path_raw)
    checksums = {}

    def diffs() -> Iterator[tuple[str, Tensor]]:
        for name, raw in tqdm(raw_tensors(path_raw, tuned_args), total=len(files), desc="make_diff", unit="tensor"):
            raw = raw.to(device)
            diff = read_tensor(files[name], name).to(device, torch.float32).sub_(raw)  # in place: 2 tensors at a time
            checksums[hf_key(name)] = sha256(raw.add_(diff))  # what recover computes, bit for bit
            yield name, diff

    with written_aside(path_diff) as out:
        save_hf_checkpoint(out, tuned_args, diffs(), None, torch.float32, max_shard_bytes)
        copy_tokenizer_files(path_tuned, out)
        description = "SHA-256 of each tensor that recover computes (raw + diff in fp32), by its key in the model files"
        write_json(os.path.join(out, CHECKSUMS), {"description": description, "sha256": checksums})
    print(f"wrote {path_diff}: {len(checksums)} tensors", file=sys.stderr)


def read_checksums(path_diff: str) -> dict[str, str] | None:
    """The diff's SHA-256 per tensor; None for a diff without them (made by stanford_alpaca's weight_diff.py)."""
    file = os.path.join(path_diff, CHECKSUMS)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            checksums = json.load(f)["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: damaged ({e!r})") from None
    if not isinstance(checksums, dict):
        raise ValueError(f"{file}: damaged (sha256 is not an object)")
    return checksums


@torch.inference_mode()
def recover(
    path_raw: str,
    path_diff: str,
    path_tuned: str,
    device: str = "cpu",
    test_inference: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> None:
    """path_tuned = path_raw + path_diff in fp32, with the diff's config and tokenizer files; each tensor checked
    against the diff's SHA-256, when it has them, before path_tuned takes its name."""
    diff_args = read_model_args(path_diff)
    files = hf_tensors(path_diff, diff_args, path_raw)
    checksums = read_checksums(path_diff)
    if checksums is not None and (unknown := checksums.keys() - {hf_key(name) for name in files}):
        raise ValueError(f"{path_diff}/{CHECKSUMS}: a checksum for {sorted(unknown)[0]!r}, which the diff lacks")

    def recovered() -> Iterator[tuple[str, Tensor]]:
        for name, raw in tqdm(raw_tensors(path_raw, diff_args), total=len(files), desc="recover", unit="tensor"):
            tensor = raw.to(device).add_(read_tensor(files[name], name).to(device, torch.float32))
            if checksums is not None and sha256(tensor) != checksums.get(hf_key(name)):
                raise ValueError(
                    f"{hf_key(name)} recovered does not match its SHA-256 in {path_diff}/{CHECKSUMS}: --path_raw "
                    f"{path_raw} is not the model the diff was made from, or the diff is damaged; nothing written"
                )
            yield name, tensor

    with written_aside(path_tuned) as out:
        save_hf_checkpoint(out, diff_args, recovered(), None, torch.float32, max_shard_bytes)
        copy_tokenizer_files(path_diff, out)
    if checksums is None:
        print(
            f"recovered {path_tuned}, NOT verified: {path_diff} has no {CHECKSUMS} (a diff made by stanford_alpaca's "
            "weight_diff.py, whose only check is a weight sum for Alpaca 7B)",
            file=sys.stderr,
        )
    else:
        print(f"recovered {path_tuned}: all {len(files)} tensors match the diff's SHA-256", file=sys.stderr)
    if test_inference:
        run_test_inference(path_tuned, device)


def run_test_inference(path: str, device: str) -> None:
    """The original's check that the model answers: 100 greedy tokens for a fixed prompt."""
    model = load_model(path, torch.float32, device)
    tokenizer = Tokenizer(os.path.join(path, "tokenizer.model"))
    completion = generate(model, tokenizer, [TEST_PROMPT], max_new_tokens=100, temperature=0.0)[0]
    print(f"Input: {TEST_PROMPT}\nCompletion: {completion}")


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = p.add_subparsers(dest="task", required=True, metavar="{make_diff,recover}")
    make = tasks.add_parser("make_diff", help="write the diff of a fine-tuned model against its base")
    make.add_argument("--path_raw", required=True, help="the base model: Hugging Face LLaMA directory")
    make.add_argument("--path_tuned", required=True, help="the fine-tuned model: Hugging Face directory")
    make.add_argument("--path_diff", required=True, help="the diff to write (a new directory)")
    rec = tasks.add_parser("recover", help="recover the fine-tuned model from the diff and its base")
    rec.add_argument("--path_raw", required=True, help="the base model: Hugging Face LLaMA directory")
    rec.add_argument("--path_diff", required=True, help="the diff (ours, or one made by stanford_alpaca's)")
    rec.add_argument("--path_tuned", required=True, help="the recovered model to write (a new directory)")
    rec.add_argument(
        "--test_inference", type=str2bool, nargs="?", const=True, default=False, metavar="BOOL",
        help="then answer the original's test prompt with 100 greedy tokens (loads the fp32 model: 27 GB for 7B)",
    )  # fmt: skip
    for task in (make, rec):
        task.add_argument("--device", default="cpu", help="where the sums are computed: cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        args = parse_args(argv)
        if args.task == "make_diff":
            make_diff(args.path_raw, args.path_tuned, args.path_diff, args.device)
        else:
            recover(args.path_raw, args.path_diff, args.path_tuned, args.device, args.test_inference)


if __name__ == "__main__":
    main()
