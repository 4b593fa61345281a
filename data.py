"""Alpaca instruction data: JSON records -> prompts -> token ids and masked labels -> batches.

Tokenization follows the original Stanford pipeline exactly, mask boundary included; the result is cached
on disk so a second run starts at once. Batches come in two kinds: the original right-padded micro-batches,
and packed rows that hold several records each, with document boundaries the model must respect.

    python data.py alpaca_data.json --tokenizer tokenizer.model [--dump tokens.jsonl]

Record indices in messages and dumps count from 0, in file order.
"""

import hashlib
import itertools
import json
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from cli import ArgumentParser
from tokenizer import Tokenizer

IGNORE_INDEX = -100  # labels that are not supervised; also PyTorch cross_entropy's default ignore_index

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

CACHE_FORMAT = 1  # bump when the cached arrays or the tokenization recipe change
TOKENIZE_CHUNK = 4096  # records per encode_batch call: large enough to keep every core busy, small for the bar


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca source text; the with-input template whenever input != "" (even "No input")."""
    if input != "":
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ---------------------------------------------------------------------------------------------------------
# Reading and validating records


def _json_type(value: object) -> str:
    if isinstance(value, bool):  # before int: bool is an int in Python
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), "null")


def _check_record(record: object, where: str, need_output: bool) -> tuple[str, str, str]:
    """(instruction, input, output) of one record; `where` names the file and record for the error. Without
    need_output (prompts to answer), a missing output is ""."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with 'instruction', 'input', 'output', got {_json_type(record)}")
    for field in ("instruction", "output") if need_output else ("instruction",):
        if field not in record:
            raise ValueError(f"{where}: missing field '{field}' (expected a string)")
    for field in ("instruction", "input", "output"):
        if field in record and not isinstance(record[field], str):
            raise ValueError(f"{where}: field '{field}' must be a string, got {_json_type(record[field])}")
    return record["instruction"], record.get("input", ""), record.get("output", "")


def json_lines(text: str, path: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of a JSON Lines text; an error names the line."""
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines() breaks on.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line_no}: invalid JSON at column {e.colno}: {e.msg}") from None


def _parse_json_lines(text: str, path: str, need_output: bool) -> list[tuple[str, str, str]]:
    records = []
    for line_no, record in json_lines(text, path):
        records.append(_check_record(record, f"{path}: record {len(records)} (line {line_no})", need_output))
    return records


def _parse_json(text: str, path: str, need_output: bool) -> list[tuple[str, str, str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # Several objects one after another: JSON Lines under a .json name (as `datasets` writes them).
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            return _parse_json_lines(text, path, need_output)
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {_json_type(data)}")
    return [_check_record(record, f"{path}: record {i}", need_output) for i, record in enumerate(data)]


def decode_text(raw: bytes, path: str) -> str:
    """A file's bytes as UTF-8 text; an error names the line and column of the first bad byte."""
    try:
        return raw.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        byte = raw[e.start]
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{byte:02x} at line {line}, column {column})") from None


def parse_records(text: str, path: str, need_output: bool = True) -> list[tuple[str, str, str]]:
    """(instruction, input, output) of each record of an Alpaca JSON file (a list of objects) or a JSON Lines
    file (one object per line), validated. Without need_output (prompts to answer), the output may be absent."""
    parse = _parse_json_lines if path.endswith(".jsonl") else _parse_json
    records = parse(text, path, need_output)
    if not records:
        raise ValueError(f"{path}: no records (expected objects with 'instruction', 'input' and 'output')")
    return records


# ---------------------------------------------------------------------------------------------------------
# Tokenizing, with an on-disk cache


@dataclass
class Dataset:
    """Tokenized records that have at least one supervised token, in file order."""

    ids: list[np.ndarray]  # int32 views into one buffer: [BOS] + encode(source + output) + [EOS], truncated
    prompt_lens: np.ndarray  # masked leading positions: len([BOS] + encode(source)), at most len(ids[i])
    source_indices: np.ndarray  # index of each kept record in the data file
    untruncated_lens: np.ndarray  # len(ids[i]) before truncation to model_max_length
    dropped: int  # records dropped because no supervised token remained (the prompt fills the max length)

    def __len__(self) -> int:
        return len(self.ids)

    def n_supervised(self, i: int) -> int:
        """Supervised targets of record i once labels are shifted: the labels != -100 among positions 1.."""
        return len(self.ids[i]) - int(self.prompt_lens[i])

    def total_supervised(self) -> int:
        """Supervised targets of all records."""
        return sum(self.n_supervised(i) for i in range(len(self)))

    def labels(self, i: int) -> np.ndarray:
        """Record i's labels as the original pipeline built them: ids with the prompt masked, not shifted."""
        labels = self.ids[i].astype(np.int64)
        labels[: self.prompt_lens[i]] = IGNORE_INDEX
        return labels


def _dataset_from_arrays(
    tokens: np.ndarray,
    lengths: np.ndarray,
    prompt_lens: np.ndarray,
    source_indices: np.ndarray,
    untruncated_lens: np.ndarray,
    dropped: int,
) -> Dataset:
    ids = np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []
    return Dataset(ids, prompt_lens, source_indices, untruncated_lens, int(dropped))


def _tokenize(records: list[tuple[str, str, str]], tokenizer: Tokenizer, max_len: int, name: str) -> Dataset:
    kept, prompt_lens, source_indices, untruncated_lens = [], [], [], []
    with tqdm(total=len(records), desc=f"tokenizing {name}", unit=" records", leave=False, disable=None) as bar:
        for start in range(0, len(records), TOKENIZE_CHUNK):
            chunk = records[start : start + TOKENIZE_CHUNK]
            sources = [format_prompt(instruction, input) for instruction, input, _ in chunk]
            texts = [source + output for source, (_, _, output) in zip(sources, chunk, strict=True)]
            # The source is tokenized on its own, as the original did: where the output's first characters
            # merge with the prompt's final ':' the mask boundary is off by that token. That is the recipe.
            text_ids, source_ids = tokenizer.encode_batch(texts), tokenizer.encode_batch(sources)
            for offset, (ids, source) in enumerate(zip(text_ids, source_ids, strict=True)):
                ids = [tokenizer.bos_id, *ids, tokenizer.eos_id]
                truncated = ids[:max_len]  # a truncated record loses its EOS, as in the original
                prompt_len = min(1 + len(source), len(truncated))
                if prompt_len == len(truncated):
                    continue
                kept.append(truncated)
                prompt_lens.append(prompt_len)
                source_indices.append(start + offset)
                untruncated_lens.append(len(ids))
            bar.update(len(chunk))
    lengths = np.array([len(ids) for ids in kept], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(kept), dtype=np.int32, count=int(lengths.sum()))
    return _dataset_from_arrays(
        tokens,
        lengths,
        np.array(prompt_lens, dtype=np.int64),
        np.array(source_indices, dtype=np.int64),
        np.array(untruncated_lens, dtype=np.int64),
        len(records) - len(kept),
    )


def _cache_path(raw: bytes, data_path: str, tokenizer: Tokenizer, max_len: int, cache_dir: str | None) -> str:
    if cache_dir is None:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache_dir = os.path.join(cache_home, "alpaca_tokens")
    key = hashlib.sha256()
    with open(tokenizer.model_path, "rb") as f:
        key.update(hashlib.sha256(f.read()).digest())
    key.update(hashlib.sha256(raw).digest())
    key.update(f"{CACHE_FORMAT}\0{max_len}\0{PROMPT_INPUT}\0{PROMPT_NO_INPUT}".encode())
    stem = os.path.splitext(os.path.basename(data_path))[0]
    return os.path.join(cache_dir, f"{stem}-{key.hexdigest()[:24]}.npz")


def _read_cache(path: str) -> Dataset | None:
    try:
        with np.load(path) as z:
            arrays = {name: z[name] for name in z.files}
        return _dataset_from_arrays(**arrays)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        print(f"warning: {path}: unreadable token cache, tokenizing again ({e})", file=sys.stderr)
        return None


def _write_cache(path: str, dataset: Dataset) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                tokens=np.concatenate(dataset.ids),
                lengths=np.array([len(ids) for ids in dataset.ids], dtype=np.int64),
                prompt_lens=dataset.prompt_lens,
                source_indices=dataset.source_indices,
                untruncated_lens=dataset.untruncated_lens,
                dropped=np.array(dataset.dropped),
            )
        os.replace(tmp, path)  # atomic: ranks that load at the same time never see half a file
    except OSError as e:
        # No cache only costs time on the next run; a read-only home must not stop training.
        print(f"warning: cannot write the token cache {path} ({e.strerror})", file=sys.stderr)
        if os.path.exists(tmp):
            os.remove(tmp)


def read_records(data_path: str) -> list[tuple[str, str, str]]:
    """(instruction, input, output) of every record of an Alpaca JSON or JSON Lines file, validated."""
    with open(data_path, "rb") as f:
        return parse_records(decode_text(f.read(), data_path), data_path)


def load_dataset(
    data_path: str, tokenizer: Tokenizer, model_max_length: int = 512, cache_dir: str | None = None
) -> Dataset:
    """Reads, validates and tokenizes an Alpaca JSON or JSON Lines file, or loads it from the cache.

    The cache (default ~/.cache/alpaca_tokens) is keyed by the content of the data file and the tokenizer
    model, model_max_length and the prompt templates, so a changed input never reuses stale tokens.
    """
    if model_max_length < 2:
        raise ValueError(f"model_max_length must be at least 2 (BOS and one token), got {model_max_length}")
    if not os.path.exists(data_path):
        raise FileNotFoundError(f"{data_path}: data file not found")
    with open(data_path, "rb") as f:
        raw = f.read()
    cache_path = _cache_path(raw, data_path, tokenizer, model_max_length, cache_dir)
    dataset = _read_cache(cache_path)
    if dataset is not None:
        return dataset
    records = parse_records(decode_text(raw, data_path), data_path)
    dataset = _tokenize(records, tokenizer, model_max_length, os.path.basename(data_path))
    if len(dataset) == 0:
        raise ValueError(
            f"{data_path}: all {len(records)} records were dropped: each prompt fills model_max_length "
            f"({model_max_length} tokens), leaving no response token to train on"
        )
    _write_cache(cache_path, dataset)
    return dataset


# ---------------------------------------------------------------------------------------------------------
# Batches


def epoch_steps(n_records: int, global_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The records of each optimizer step of one epoch, the same on every rank: a permutation seeded by
    (seed, epoch) cut into chunks of global_batch. The last chunk may be smaller; no record is dropped."""
    if global_batch < 1:
        raise ValueError(f"the global batch size must be at least 1, got {global_batch}")
    order = np.random.default_rng([seed, epoch]).permutation(n_records)
    return [order[i : i + global_batch] for i in range(0, n_records, global_batch)]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long, shifted: the target for position t (next token, same document) or -100
    positions: torch.Tensor | None  # (B, T) long, restarting at 0 per document; None when padded (0..T-1)
    document_ids: torch.Tensor | None  # (B, T) long, padding is a document of its own; None when padded
    n_tokens: int  # real (non-pad) tokens
    n_supervised: int  # labels != -100


def _make_batch(dataset: Dataset, rows: list[list[int]], pad_id: int, packing: bool) -> Batch:
    """One micro-batch of rows, each row one or more records side by side, padded on the right to the
    longest row. An empty row (a rank with nothing left this step) still gets one pad position to run on."""
    row_lens = [sum(len(dataset.ids[i]) for i in row) for row in rows]
    shape = (len(rows), max(1, *row_lens))
    input_ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    document_ids = np.zeros(shape, dtype=np.int64)
    n_supervised = 0
    for r, row in enumerate(rows):
        start = 0
        for doc, i in enumerate(row):
            ids, end = dataset.ids[i], start + len(dataset.ids[i])
            input_ids[r, start:end] = ids
            # Position t predicts token t + 1. A document's last position predicts nothing: the next token
            # belongs to another document.
            prompt_len = dataset.prompt_lens[i]
            labels[r, start + prompt_len - 1 : end - 1] = ids[prompt_len:]
            positions[r, start:end] = np.arange(len(ids))
            document_ids[r, start:end] = doc
            n_supervised += len(ids) - prompt_len
            start = end
        # Padding as a document of its own: each pad position attends to itself, never to an empty set of
        # keys (which would make attention NaN), and no real token attends to it.
        positions[r, start:] = np.arange(shape[1] - start)
        document_ids[r, start:] = len(row)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        positions=torch.from_numpy(positions) if packing else None,
        document_ids=torch.from_numpy(document_ids) if packing else None,
        n_tokens=sum(row_lens),
        n_supervised=int(n_supervised),
    )


def _pack_rows(dataset: Dataset, records: np.ndarray, max_len: int) -> list[list[int]]:
    """First-fit decreasing: records into as few rows of <= max_len tokens as it finds, fullest rows first."""
    lengths = {int(i): len(dataset.ids[i]) for i in records}
    rows, free = [], []
    for i in sorted(lengths, key=lambda i: -lengths[i]):  # stable: ties keep the step's order
        if lengths[i] > max_len:
            raise ValueError(f"record {dataset.source_indices[i]} has {lengths[i]} tokens, more than max_len {max_len}")
        fit = next((r for r, space in enumerate(free) if lengths[i] <= space), None)
        if fit is None:
            rows.append([i])
            free.append(max_len - lengths[i])
        else:
            rows[fit].append(i)
            free[fit] -= lengths[i]
    order = sorted(range(len(rows)), key=lambda r: free[r])  # rows of similar length share a micro-batch
    return [rows[r] for r in order]


def rank_micro_batches(
    dataset: Dataset,
    step_records: np.ndarray,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    packing: bool,
    max_len: int,
    pad_id: int,
) -> list[Batch]:
    """This rank's micro-batches for one optimizer step. Every rank returns as many micro-batches (FSDP runs
    the same forwards everywhere); a rank short of records gets all-padding ones with no supervised token.

    Padded: the rank's records are step_records[rank::world_size], micro_batch_size records per micro-batch.
    Packed: the whole step is packed into rows of <= max_len tokens, rows are dealt to ranks in snake order
    (fullest first) so that row counts differ by at most one and token counts stay close, and
    micro_batch_size rows make a micro-batch."""
    if micro_batch_size < 1:
        raise ValueError(f"the micro-batch size must be at least 1, got {micro_batch_size}")
    if packing:
        all_rows = _pack_rows(dataset, step_records, max_len)
        # Snake order 0, 1, .., W-1, W-1, .., 0, 0, 1, ..: each round evens out the previous one's lead.
        owner = [j % (2 * world_size) for j in range(len(all_rows))]
        owner = [o if o < world_size else 2 * world_size - 1 - o for o in owner]
        rows = [row for row, o in zip(all_rows, owner, strict=True) if o == rank]
        most_rows = math.ceil(len(all_rows) / world_size)
    else:
        rows = [[int(i)] for i in step_records[rank::world_size]]
        most_rows = math.ceil(len(step_records) / world_size)
    n_micro = math.ceil(most_rows / micro_batch_size)
    chunks = [rows[k * micro_batch_size : (k + 1) * micro_batch_size] for k in range(n_micro)]
    return [_make_batch(dataset, chunk or [[]], pad_id, packing) for chunk in chunks]


def padding_fraction(
    dataset: Dataset, global_batch: int, micro_batch_size: int, packing: bool, max_len: int, pad_id: int, seed: int
) -> float:
    """Share of the token positions in one epoch's micro-batches (on one rank) that are padding."""
    positions = real = 0
    for step in tqdm(
        epoch_steps(len(dataset), global_batch, seed, 0), desc="batching", unit=" steps", leave=False, disable=None
    ):
        for batch in rank_micro_batches(dataset, step, 0, 1, micro_batch_size, packing, max_len, pad_id):
            positions += batch.input_ids.numel()
            real += batch.n_tokens
    return 1 - real / positions


# ---------------------------------------------------------------------------------------------------------
# Command line: statistics and a dump of the tokenized records


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description="Tokenize Alpaca data and print statistics.")
    parser.add_argument("data", help="Alpaca JSON (a list of records) or JSON Lines file")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--model_max_length", type=int, default=512)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument(
        "--global_batch_size", type=int, default=128, help="records per optimizer step, the pool packing draws on"
    )
    parser.add_argument("--cache_dir", help="where tokenized data is cached (default ~/.cache/alpaca_tokens)")
    parser.add_argument("--dump", metavar="FILE", help="write each kept record's input_ids and labels as JSON Lines")
    try:
        args = parser.parse_args(argv)
        tokenizer = Tokenizer(args.tokenizer)
        dataset = load_dataset(args.data, tokenizer, args.model_max_length, args.cache_dir)
        n_records = len(dataset) + dataset.dropped
        lengths = dataset.untruncated_lens
        n_truncated = int((lengths > args.model_max_length).sum())
        n_supervised = dataset.total_supervised()
        print(f"{args.data}: {n_records} records, {len(dataset)} kept")
        limit = args.model_max_length
        print(f"dropped: {dataset.dropped} (no supervised token left: the prompt alone fills {limit} tokens)")
        print(
            f"tokens per kept record, BOS and EOS included, before truncation: min {lengths.min()}, "
            f"median {np.median(lengths):g}, mean {lengths.mean():.1f}, max {lengths.max()}"
        )
        print(f"truncated to {args.model_max_length} tokens (losing their EOS): {n_truncated}")
        print(f"supervised targets: {n_supervised}")
        for packing in (False, True):
            fraction = padding_fraction(
                dataset,
                args.global_batch_size,
                args.per_device_train_batch_size,
                packing,
                args.model_max_length,
                tokenizer.pad_id,
                seed=42,  # the Trainer's default seed; the figure barely depends on it
            )
            how = "packed rows" if packing else "padded records"
            print(
                f"padding fraction, {how}, micro-batch {args.per_device_train_batch_size}, "
                f"global batch {args.global_batch_size}: {fraction:.2%}"
            )
        if args.dump:
            with open(args.dump, "w", encoding="utf-8") as f:
                for i in tqdm(
                    range(len(dataset)), desc=f"writing {args.dump}", unit=" records", leave=False, disable=None
                ):
                    record = {
                        "index": int(dataset.source_indices[i]),
                        "input_ids": dataset.ids[i].tolist(),
                        "labels": dataset.labels(i).tolist(),
                    }
                    f.write(json.dumps(record) + "\n")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
