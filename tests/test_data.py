"""data.py: token ids and labels against an independent reference, packing, sharding, caching, bad input."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import IGNORE_INDEX, Batch, Dataset, epoch_steps, load_dataset, padding_fraction, rank_micro_batches
from model import ModelArgs, Transformer, document_mask
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 512

# Verbatim from SPEC "Data semantics", the Stanford originals.
REFERENCE_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
REFERENCE_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model: Path) -> Tokenizer:
    return Tokenizer(str(tokenizer_model))


@pytest.fixture(scope="module")
def sample_dataset(alpaca_sample: Path, tokenizer: Tokenizer, tmp_path_factory) -> Dataset:
    return load_dataset(str(alpaca_sample), tokenizer, MAX_LEN, cache_dir=str(tmp_path_factory.mktemp("cache")))


def make_dataset(lengths: list[int], prompt_lens: list[int], vocab: int, seed: int = 0) -> Dataset:
    """Random records over a small vocabulary (ids 3..vocab-2), each starting with BOS = 1."""
    rng = np.random.default_rng(seed)
    ids = [np.concatenate([[1], rng.integers(3, vocab - 1, n - 1)]).astype(np.int32) for n in lengths]
    n = len(lengths)
    return Dataset(ids, np.array(prompt_lens), np.arange(n), np.array(lengths), dropped=0)


# ---------------------------------------------------------------------------------------------------------
# 1. The original pipeline, reimplemented with transformers' tokenizer


def reference_pipeline(records: list[dict], tokenizer_model: Path, tmp_dir: Path) -> tuple[list, list]:
    """Stanford's preprocess(), written from SPEC on top of transformers' tokenizer."""
    from transformers import AutoTokenizer

    shutil.copy(tokenizer_model, tmp_dir / "tokenizer.model")
    hf = AutoTokenizer.from_pretrained(tmp_dir)
    # Without a tokenizer_config.json it adds no BOS (so we prepend it, as LlamaTokenizer did) and behaves
    # like plain SentencePiece, including the dummy-prefix and whitespace cases.
    assert hf("I believe the meaning of life is").input_ids == [306, 4658, 278, 6593, 310, 2834, 338]
    assert hf("  two  spaces", add_special_tokens=False).input_ids == [259, 1023, 29871, 8162]
    assert hf(" lead\n\nx", add_special_tokens=False).input_ids == [29871, 3275, 13, 13, 29916]
    assert (hf.bos_token_id, hf.eos_token_id, hf.eos_token) == (1, 2, "</s>")

    def tokenize(strings: list[str]) -> list[list[int]]:  # _tokenize_fn: BOS, truncation at model_max_length
        return [([hf.bos_token_id] + ids)[:MAX_LEN] for ids in hf(strings, add_special_tokens=False).input_ids]

    sources = [
        REFERENCE_PROMPT_INPUT.format_map(r) if r.get("input", "") != "" else REFERENCE_PROMPT_NO_INPUT.format_map(r)
        for r in records
    ]
    targets = [f"{r['output']}{hf.eos_token}" for r in records]
    input_ids = tokenize([s + t for s, t in zip(sources, targets, strict=True)])
    labels = [list(ids) for ids in input_ids]
    for label, source_ids in zip(labels, tokenize(sources), strict=True):
        label[: len(source_ids)] = [IGNORE_INDEX] * len(source_ids)
    return input_ids, labels


def test_templates_are_the_originals():
    assert data.PROMPT_INPUT == REFERENCE_PROMPT_INPUT
    assert data.PROMPT_NO_INPUT == REFERENCE_PROMPT_NO_INPUT
    assert data.format_prompt("Do it.") == REFERENCE_PROMPT_NO_INPUT.format(instruction="Do it.")
    with_input = REFERENCE_PROMPT_INPUT.format(instruction="Do it.", input="No input")
    assert data.format_prompt("Do it.", "No input") == with_input


def test_ids_and_labels_match_the_reference_on_every_sample_record(
    alpaca_sample, tokenizer_model, sample_dataset, tokenizer, tmp_path
):
    records = json.loads(alpaca_sample.read_text())
    ref_ids, ref_labels = reference_pipeline(records, tokenizer_model, tmp_path)
    ds = sample_dataset
    assert len(ds) == len(records) == 2000 and ds.dropped == 0
    assert ds.source_indices.tolist() == list(range(2000))
    for i in range(len(records)):
        assert ds.ids[i].tolist() == ref_ids[i], f"record {i}: input_ids differ"
        assert ds.labels(i).tolist() == ref_labels[i], f"record {i}: labels differ"
        assert ds.ids[i].dtype == np.int32

    truncated = [i for i in range(len(ds)) if ds.untruncated_lens[i] > MAX_LEN]
    assert len(truncated) == 79
    assert all(len(ds.ids[i]) == MAX_LEN and ds.ids[i][-1] != tokenizer.eos_id for i in truncated)
    assert all(ds.ids[i][-1] == tokenizer.eos_id for i in set(range(len(ds))) - set(truncated))

    # The placeholder inputs get the with-input template: 19 start with "No input" (SOURCES.md's count),
    # 49 in all once variants like "Noinput" and "<noinput>" are counted.
    no_input = [i for i, r in enumerate(records) if r["input"].startswith("No input")]
    placeholder = re.compile(r"\W*no\s*input\W*(required\.)?|N/A", re.IGNORECASE)
    placeholders = [i for i, r in enumerate(records) if placeholder.fullmatch(r["input"])]
    assert (len(no_input), len(placeholders)) == (19, 49)
    assert all("### Input:" in tokenizer.decode(ds.ids[i].tolist()) for i in placeholders)

    # The mask boundary quirk is exercised: where the output merges with the prompt's final ':', the
    # source's own tokens are not a prefix of the record's, yet the mask still covers len(source) tokens.
    merged = [
        i
        for i, r in enumerate(records)
        if tokenizer.encode(data.format_prompt(r["instruction"], r["input"]), bos=True)
        != ds.ids[i][: ds.prompt_lens[i]].tolist()
    ]
    assert 0 < len(merged) < 0.1 * len(records)


def test_n_supervised_counts_the_shifted_targets(sample_dataset):
    ds = sample_dataset
    for i in range(len(ds)):
        assert ds.n_supervised(i) == int((ds.labels(i)[1:] != IGNORE_INDEX).sum()) > 0


# ---------------------------------------------------------------------------------------------------------
# 2. Packing leaks nothing across documents


def test_packed_loss_equals_one_record_at_a_time():
    max_len, vocab, pad_id = 64, 96, 95
    # A full-length record, one with a single supervised target, and assorted others.
    lengths = [64, 9, 30, 17, 40, 5, 23, 33, 12, 48, 7, 26]
    prompt_lens = [20, 8, 10, 3, 39, 2, 11, 1, 6, 30, 4, 25]
    ds = make_dataset(lengths, prompt_lens, vocab)
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=vocab, max_seq_len=128)
    model = Transformer(args).float().eval()
    step = np.random.default_rng(1).permutation(len(ds))

    with torch.no_grad():
        expected = 0.0
        for i in range(len(ds)):
            tokens = torch.from_numpy(ds.ids[i].astype(np.int64))[None]
            labels = torch.from_numpy(ds.labels(i))
            shifted = torch.cat([labels[1:], torch.tensor([IGNORE_INDEX])])[None]
            expected += model(tokens, labels=shifted).item()

        def total_loss(packing: bool, world_size: int, use_mask: bool = True) -> float:
            loss = 0.0
            for rank in range(world_size):
                for b in rank_micro_batches(ds, step, rank, world_size, 2, packing, max_len, pad_id):
                    if packing and use_mask:
                        loss += model(b.input_ids, b.positions, document_mask(b.document_ids), labels=b.labels).item()
                    else:
                        loss += model(b.input_ids, labels=b.labels).item()
            return loss

        for packing in (True, False):
            for world_size in (1, 2):
                assert total_loss(packing, world_size) == pytest.approx(expected, rel=1e-5)
        # The check has teeth: the same packed rows attended causally across documents are 10x further off.
        assert abs(total_loss(True, 1, use_mask=False) - expected) > 1e-4 * expected


def test_packed_batch_layout():
    ds = make_dataset([5, 3, 4], [2, 1, 3], vocab=50)
    (batch,) = rank_micro_batches(ds, np.array([0, 1, 2]), 0, 1, 4, True, 16, pad_id=49)
    # First-fit decreasing puts all three in one row, longest first; padding to the longest row (none here).
    ids = [ds.ids[i].tolist() for i in (0, 2, 1)]
    assert batch.input_ids.tolist() == [ids[0] + ids[1] + ids[2]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert batch.document_ids.tolist() == [[0] * 5 + [1] * 4 + [2] * 3]
    # Targets: record 0 supervises its tokens 2..4 (at positions 1..3), record 2 its token 3 (at position 2),
    # record 1 its tokens 1..2; each document's last position has no target.
    x = batch.input_ids[0].tolist()
    assert batch.labels.tolist() == [[-100, x[2], x[3], x[4], -100, -100, -100, x[8], -100, x[10], x[11], -100]]
    assert (batch.n_tokens, batch.n_supervised) == (12, 3 + 1 + 2)
    assert all(t.dtype == torch.long for t in (batch.input_ids, batch.labels, batch.positions, batch.document_ids))


# ---------------------------------------------------------------------------------------------------------
# 3. How much compute goes to padding


def test_padding_fraction_on_the_sample(sample_dataset, tokenizer, capsys):
    fractions = {
        packing: padding_fraction(sample_dataset, 128, 4, packing, MAX_LEN, tokenizer.pad_id, seed=42)
        for packing in (False, True)
    }
    with capsys.disabled():
        print(
            f"\nalpaca_sample.json, micro-batch 4, global batch 128, max length {MAX_LEN}: padding fraction "
            f"{fractions[False]:.2%} padded, {fractions[True]:.2%} packed"
        )
    assert fractions[True] <= 0.05
    assert fractions[False] > 3 * fractions[True]


# ---------------------------------------------------------------------------------------------------------
# 4. Sharding, shuffling, resuming


def records_in(batch: Batch, pad_id: int, lookup: dict[bytes, int]) -> list[int]:
    """The records in a micro-batch, recognised by their tokens (the sample's records are all distinct)."""
    found = []
    for r in range(batch.input_ids.shape[0]):
        row = batch.input_ids[r].numpy().astype(np.int32)
        docs = np.zeros(len(row)) if batch.document_ids is None else batch.document_ids[r].numpy()
        for doc in np.unique(docs):
            tokens = row[(docs == doc) & (row != pad_id)]
            if len(tokens):
                found.append(lookup[tokens.tobytes()])
    return found


@pytest.fixture(scope="module")
def lookup(sample_dataset) -> dict[bytes, int]:
    table = {ids.tobytes(): i for i, ids in enumerate(sample_dataset.ids)}
    assert len(table) == len(sample_dataset)
    return table


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_every_step_exactly(sample_dataset, tokenizer, lookup, packing, world_size):
    ds, pad_id = sample_dataset, tokenizer.pad_id
    epochs = []
    for epoch in (0, 1):
        steps = epoch_steps(len(ds), 128, seed=7, epoch=epoch)
        assert [len(step) for step in steps] == [128] * 15 + [80]  # the short last step is kept
        seen = []
        for step in steps:
            per_rank = [
                rank_micro_batches(ds, step, rank, world_size, 4, packing, MAX_LEN, pad_id)
                for rank in range(world_size)
            ]
            assert len({len(batches) for batches in per_rank}) == 1, "ranks disagree on the number of micro-batches"
            step_seen, rank_tokens = [], []
            for rank, batches in enumerate(per_rank):
                rank_records = [i for b in batches for i in records_in(b, pad_id, lookup)]
                if not packing:
                    assert rank_records == step[rank::world_size].tolist()
                step_seen += rank_records
                rank_tokens.append(sum(b.n_tokens for b in batches))
                for b in batches:
                    assert b.input_ids.shape[1] <= MAX_LEN
                    assert b.n_supervised == int((b.labels != IGNORE_INDEX).sum())
                    assert b.n_tokens == int((b.input_ids != pad_id).sum())
                    assert (b.positions is None) == (b.document_ids is None) == (not packing)
            assert sorted(step_seen) == sorted(step.tolist()), "a record is missing or in two places"
            step_supervised = sum(b.n_supervised for batches in per_rank for b in batches)
            assert step_supervised == sum(ds.n_supervised(i) for i in step)
            if packing:  # balanced: ranks differ by less than one row's worth of tokens
                assert max(rank_tokens) - min(rank_tokens) <= MAX_LEN
            seen += step_seen
        assert sorted(seen) == list(range(len(ds)))
        epochs.append([step.tolist() for step in steps])
    assert epochs[0] != epochs[1], "the second epoch must reshuffle"


def test_a_rank_short_of_records_gets_all_padding_micro_batches():
    pad_id = 49
    ds = make_dataset([6, 4, 9, 3, 5], [2, 1, 3, 1, 2], vocab=50)
    step = np.arange(5)
    padded = [rank_micro_batches(ds, step, rank, 4, 1, False, 16, pad_id) for rank in range(4)]
    packed = [rank_micro_batches(ds, step, rank, 3, 4, True, 16, pad_id) for rank in range(3)]  # 27 tokens: 2 rows
    assert [len(batches) for batches in padded] == [2, 2, 2, 2]
    assert [len(batches) for batches in packed] == [1, 1, 1]
    dummies = [b for batches in padded + packed for b in batches if b.n_tokens == 0]
    assert len(dummies) == 3 + 1
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, hidden_dim=64, vocab_size=50))
    for b in dummies:
        assert b.input_ids.tolist() == [[pad_id]] and b.labels.tolist() == [[IGNORE_INDEX]] and b.n_supervised == 0
        # The model runs on it (so FSDP's collectives line up) and it contributes exactly nothing.
        mask = None if b.document_ids is None else document_mask(b.document_ids)
        loss = model(b.input_ids, b.positions, mask, labels=b.labels)
        loss.backward()
        assert loss.item() == 0.0
        assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_same_seed_same_batches_and_resuming_mid_epoch(sample_dataset, tokenizer):
    ds, n = sample_dataset, len(sample_dataset)
    plan = epoch_steps(n, 128, seed=3, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(plan, epoch_steps(n, 128, seed=3, epoch=2), strict=True))
    assert sorted(np.concatenate(plan).tolist()) == list(range(n))
    assert not np.array_equal(np.concatenate(plan), np.concatenate(epoch_steps(n, 128, seed=4, epoch=2)))
    assert not np.array_equal(np.concatenate(plan), np.concatenate(epoch_steps(n, 128, seed=3, epoch=1)))

    def batches(steps, packing):
        return [rank_micro_batches(ds, s, 1, 2, 4, packing, MAX_LEN, tokenizer.pad_id) for s in steps]

    for packing in (False, True):
        uninterrupted = batches(plan, packing)
        resumed = batches(epoch_steps(n, 128, seed=3, epoch=2)[11:], packing)  # a fresh process, at step 11
        assert len(resumed) == len(uninterrupted) - 11
        for step_a, step_b in zip(uninterrupted[11:], resumed, strict=True):
            for a, b in zip(step_a, step_b, strict=True):
                assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
                assert (a.n_tokens, a.n_supervised) == (b.n_tokens, b.n_supervised)
                if packing:
                    assert torch.equal(a.positions, b.positions) and torch.equal(a.document_ids, b.document_ids)


# ---------------------------------------------------------------------------------------------------------
# Reading: JSON Lines, the cache


def test_json_lines_read_like_json(alpaca_sample, tokenizer, tmp_path):
    records = json.loads(alpaca_sample.read_text())[:40]
    (tmp_path / "a.json").write_text(json.dumps(records))
    # JSON Lines with `input` absent where it is empty, a blank line and Windows line ends.
    lines = [json.dumps({k: v for k, v in r.items() if v != ""}) for r in records]
    (tmp_path / "a.jsonl").write_text("\r\n".join(lines[:10]) + "\r\n\r\n" + "\n".join(lines[10:]) + "\n")
    (tmp_path / "b.json").write_text("\n".join(lines))  # JSON Lines under a .json name, as `datasets` writes
    loaded = [
        load_dataset(str(tmp_path / name), tokenizer, MAX_LEN, cache_dir=str(tmp_path / "cache"))
        for name in ("a.json", "a.jsonl", "b.json")
    ]
    for ds in loaded[1:]:
        assert [ids.tolist() for ids in ds.ids] == [ids.tolist() for ids in loaded[0].ids]
        assert ds.prompt_lens.tolist() == loaded[0].prompt_lens.tolist()


def test_the_cache_is_reused_and_keyed_by_content_and_max_length(alpaca_sample, tokenizer, tmp_path, monkeypatch):
    calls = []
    encode_batch = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda self, texts: calls.append(1) or encode_batch(self, texts))
    records = json.loads(alpaca_sample.read_text())[:30]
    path, cache = tmp_path / "d.json", tmp_path / "cache"
    path.write_text(json.dumps(records))

    def load(max_len: int = MAX_LEN) -> Dataset:
        return load_dataset(str(path), tokenizer, max_len, cache_dir=str(cache))

    first = load()
    assert calls and len(list(cache.glob("*.npz"))) == 1
    calls.clear()
    second = load()
    assert not calls, "a second load must come from the cache"
    assert [ids.tolist() for ids in second.ids] == [ids.tolist() for ids in first.ids]
    for field in ("prompt_lens", "source_indices", "untruncated_lens"):
        assert np.array_equal(getattr(second, field), getattr(first, field))
    assert second.ids[0].dtype == np.int32 and second.dropped == first.dropped

    load(max_len=256)
    assert calls, "model_max_length is part of the key"
    calls.clear()
    records[0]["output"] += " One more sentence."
    path.write_text(json.dumps(records))
    assert load().ids[0].tolist() != first.ids[0].tolist() and calls, "the data's content is part of the key"
    assert len(list(cache.glob("*.npz"))) == 3

    calls.clear()
    for cached in cache.glob("*.npz"):
        cached.write_bytes(b"not an npz file")
    assert load().ids[0].tolist() != first.ids[0].tolist() and calls, "a damaged cache is rebuilt"


# ---------------------------------------------------------------------------------------------------------
# 5. The command line: statistics, the dump, bad input


def run_cli(*args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "data.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_prints_statistics_and_dumps_each_kept_record(alpaca_sample, tokenizer_model, tokenizer, tmp_path):
    records = json.loads(alpaca_sample.read_text())[:20]
    records.insert(3, {"instruction": "word " * 300, "input": "", "output": "Too late."})  # prompt > 256 tokens
    path, cache, dump = tmp_path / "d.json", tmp_path / "cache", tmp_path / "dump.jsonl"
    path.write_text(json.dumps(records))
    result = run_cli(
        path, "--tokenizer", tokenizer_model, "--model_max_length", 256, "--cache_dir", cache, "--dump", dump
    )
    assert result.returncode == 0, result.stderr
    ds = load_dataset(str(path), tokenizer, 256, cache_dir=str(cache))
    n_truncated = int((ds.untruncated_lens > 256).sum())
    assert 0 < n_truncated < 20
    assert "21 records, 20 kept" in result.stdout
    assert "dropped: 1 (no supervised token left" in result.stdout
    assert f"max {ds.untruncated_lens.max()}" in result.stdout
    assert f"truncated to 256 tokens (losing their EOS): {n_truncated}" in result.stdout
    fractions = re.findall(
        r"padding fraction, (padded records|packed rows), micro-batch 4.*: \d+\.\d\d%", result.stdout
    )
    assert len(fractions) == 2

    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [line["index"] for line in lines] == [0, 1, 2] + list(range(4, 21))
    for i, line in enumerate(lines):
        assert line["input_ids"] == ds.ids[i].tolist()
        # Unshifted, as the original pipeline built them: the prompt masked, then the ids themselves.
        p = int(ds.prompt_lens[i])
        assert line["labels"] == [IGNORE_INDEX] * p + line["input_ids"][p:]


VALID = b'{"instruction": "Say hi.", "input": "", "output": "Hi."}'
# case: (file name, content or None for no file, what the message must say)
BAD_INPUTS = {
    "not a list": ("d.json", VALID, ["expected a JSON list of records, got an object"]),
    "record not an object": ("d.json", b"[" + VALID + b', "Say hi."]', ["record 1", "expected an object", "a string"]),
    "missing instruction": ("d.json", b"[" + VALID + b', {"output": "Hi."}]', ["record 1", "field 'instruction'"]),
    "output not a string": ("d.json", b'[{"instruction": "a", "output": 3}]', ["record 0", "'output'", "got a number"]),
    "input null": ("d.json", b'[{"instruction": "a", "input": null, "output": "b"}]', ["record 0", "'input'", "null"]),
    "syntax error": ("d.json", b"[\n" + VALID + b",\n" + VALID[:-1] + b"\n]", ["invalid JSON at line 4, column 1"]),
    "not UTF-8": ("d.json", b'[{"instruction": "caf\xe9", "output": "b"}]', ["not UTF-8", "0xe9 at line 1, column 22"]),
    "empty list": ("d.json", b"[ ]", ["no records"]),
    "missing file": ("d.json", None, ["data file not found"]),
    "bad JSON Lines line": ("d.jsonl", VALID + b"\n\n" + VALID[:-1] + b"\n", ["line 3", "invalid JSON"]),
    "JSON Lines field": ("d.jsonl", VALID + b'\n{"instruction": "a"}\n', ["record 1 (line 2)", "field 'output'"]),
    "all dropped": ("d.json", b"[" + VALID + b"]", ["all 1 records were dropped", "model_max_length (8 tokens)"]),
}


@pytest.fixture(scope="module")
def bad_input_runs(tokenizer_model, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """Every bad input through the command line, all at once: each run is mostly Python and torch starting."""
    running = {}
    for case, (name, content, _) in BAD_INPUTS.items():
        folder = tmp_path_factory.mktemp("bad_input")
        path = folder / name
        if content is not None:
            path.write_bytes(content)
        max_len = 8 if case == "all dropped" else MAX_LEN
        args = [path, "--tokenizer", tokenizer_model, "--model_max_length", max_len, "--cache_dir", folder]
        command = [sys.executable, str(ROOT / "data.py"), *map(str, args)]
        running[case] = (
            path,
            subprocess.Popen(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        )
    results = {}
    for case, (path, process) in running.items():
        _, stderr = process.communicate(timeout=120)
        results[case] = path, process.returncode, stderr
    return results


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_file_record_and_field(case, bad_input_runs):
    path, returncode, stderr = bad_input_runs[case]
    assert returncode != 0
    assert "Traceback" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(f"error: {path}: ")
    for part in BAD_INPUTS[case][2]:
        assert part in stderr, stderr
