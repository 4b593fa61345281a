"""Faults and bad input: a rank killed mid-run or mid-save, half-written checkpoints, a diverging loss, 30 bad
inputs, and resident memory over 300 steps and over steps of ever new lengths.

Under torchrun a failing worker makes torchrun print its own multi-line report, with a traceback of torchrun
itself: there the checks are that our one `error: ` line appears exactly once and that no traceback passes
through train.py.
"""

import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import sentencepiece as spm
import torch
from conftest import CACHE, ROOT, TRAIN, assert_same_weights, common, metrics, run, weights
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from checkpoint import save_hf_checkpoint
from data import PROMPT_INPUT, PROMPT_NO_INPUT
from model import ModelArgs, Transformer

GENERATE = os.path.join(ROOT, "generate.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": CACHE}

# 12 fp32 steps of ~0.3 s on 2 processes, a checkpoint every 2 steps (the last 2 kept), relaunchable as it is.
KILL_RUN = dict(
    max_steps=12, save_strategy="steps", save_steps=2, save_total_limit=2, per_device_train_batch_size=1,
    gradient_accumulation_steps=1, model_max_length=128, bf16=False, resume_from_checkpoint="latest",
)  # fmt: skip


def start_torchrun(args: list[str], max_restarts: int, stderr: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [f"--max-restarts={max_restarts}", TRAIN, *args]
    # stderr to a file: a pipe nobody reads while the test waits would fill up and stall the run.
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr.open("w"), env=ENV, cwd=ROOT)


def wait_for(condition, launcher: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert launcher.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def worker_pid(launcher: subprocess.Popen, rank: int, not_pid: int | None = None) -> int:
    """torchrun's worker process of this rank (other than not_pid), from /proc: its children, then their
    environment (which says RANK only once the child has exec'd the worker)."""

    def find() -> int | None:
        for children in glob.glob(f"/proc/{launcher.pid}/task/*/children"):
            for pid in map(int, Path(children).read_text().split()):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:  # gone meanwhile
                    continue
                if f"RANK={rank}".encode() in environ and pid != not_pid:
                    return pid
        return None

    wait_for(lambda: find() is not None, launcher)
    return find()


def checkpoint_model(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a training checkpoint, keyed as in the exported model.safetensors."""
    single_file = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(path, single_file)
    model = torch.load(single_file, weights_only=True)["model"]
    return {name if name == "lm_head.weight" else f"model.{name}": tensor for name, tensor in model.items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, small_data) -> Path:
    """What every interrupted run below must end with."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run(common(tiny_model, small_data, out, **KILL_RUN), nproc=2)
    return out


def test_a_killed_rank_restarts_resumes_and_ends_with_the_same_weights(tiny_model, small_data, uninterrupted, tmp_path):
    """SIGKILL to rank 1 mid-run under torchrun --max-restarts 1: torchrun restarts both ranks with the same
    command, which resumes from 'latest'."""
    out = tmp_path / "out"
    launcher = start_torchrun(common(tiny_model, small_data, out, **KILL_RUN), 1, tmp_path / "stderr.txt")
    wait_for(lambda: (out / "checkpoint-4").is_dir(), launcher)
    os.kill(worker_pid(launcher, rank=1), signal.SIGKILL)
    assert not (out / "model.safetensors").exists()  # mid-run: the export comes after step 12
    assert launcher.wait(timeout=300) == 0
    stderr = (tmp_path / "stderr.txt").read_text()
    resumed = re.findall(r"resumed from \S+/checkpoint-(\d+) at step \1\n", stderr)
    assert len(resumed) == 1 and 4 <= int(resumed[0]) < 12, stderr[-3000:]
    # The steps the killed attempt logged past its last checkpoint are logged again, not twice.
    assert [m["step"] for m in metrics(out)] == list(range(1, 13))
    for a, b in zip(metrics(uninterrupted), metrics(out), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    assert_same_weights(weights(uninterrupted), weights(out), 1e-6)


def test_a_kill_while_a_checkpoint_is_written_resumes_from_the_previous_one(
    tiny_model, small_data, uninterrupted, tmp_path
):
    """SIGKILL to rank 0 (the one that publishes) while checkpoint-N.partial exists. Saving takes ~200 ms
    here and the test polls every millisecond; should a kill still come too late, the next save is tried."""
    out = tmp_path / "out"
    launcher = start_torchrun(common(tiny_model, small_data, out, **KILL_RUN), 3, tmp_path / "stderr.txt")
    wait_for(lambda: (out / "checkpoint-2").is_dir(), launcher)
    rank0, caught = None, None
    for step in (4, 6, 8):
        rank0 = worker_pid(launcher, rank=0, not_pid=rank0)
        wait_for(lambda step=step: (out / f"checkpoint-{step}.partial").is_dir(), launcher)
        os.kill(rank0, signal.SIGKILL)
        if not (out / f"checkpoint-{step}").exists():
            caught = step
            break
    assert caught, "no kill landed while a checkpoint was being written"
    assert launcher.wait(timeout=300) == 0
    stderr = (tmp_path / "stderr.txt").read_text()
    assert re.findall(r"resumed from \S+ at step \d+\n", stderr)[-1].endswith(
        f"/checkpoint-{caught - 2} at step {caught - 2}\n"
    )
    assert_same_weights(weights(uninterrupted), weights(out), 1e-6)


def test_a_half_written_checkpoint_is_never_resumed(tiny_model, small_data, uninterrupted, tmp_path):
    """What a kill leaves mid-save (checkpoint-12.partial: no trainer_state.json, a truncated shard) and
    mid-rotation (a half-deleted checkpoint-8.old): 'latest' is checkpoint-10, the leftovers are removed, and
    the run ends as the uninterrupted one did."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted / "checkpoint-10", out / "checkpoint-10")
    partial = shutil.copytree(uninterrupted / "checkpoint-12", out / "checkpoint-12.partial")
    (partial / "trainer_state.json").unlink()
    shard = max(partial.glob("*.distcp"), key=os.path.getsize)
    os.truncate(shard, shard.stat().st_size // 2)
    half_deleted = shutil.copytree(uninterrupted / "checkpoint-10", out / "checkpoint-8.old")
    (half_deleted / ".metadata").unlink()
    result = run(common(tiny_model, small_data, out, **KILL_RUN), nproc=2)
    assert re.search(r"resumed from \S+/checkpoint-10 at step 10\n", result.stderr)
    assert [f for f in sorted(os.listdir(out)) if f.startswith("checkpoint")] == ["checkpoint-10", "checkpoint-12"]
    assert (out / "checkpoint-12" / "trainer_state.json").is_file()
    assert_same_weights(weights(uninterrupted), weights(out), 1e-6)


@pytest.mark.parametrize("skip", [False, True], ids=["stops", "skips"])
def test_a_diverging_run_never_saves_non_finite_weights(tiny_model, small_data, tmp_path, skip):
    """--learning_rate 1e30 from the first step: its update leaves huge but finite weights, with which the loss of
    step 2 overflows. Without --skip_nonfinite the run stops there naming the last good checkpoint; with it,
    steps 2-4 are skipped on both ranks and the weights of step 1 are what is saved and exported."""
    out = tmp_path / "out"
    flags = common(tiny_model, small_data, out, learning_rate=1e30, warmup_ratio=0, max_steps=4, bf16=False,
                   save_strategy="steps", save_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                   skip_nonfinite=skip)  # fmt: skip
    result = run(flags, nproc=2, check=False)
    step1 = checkpoint_model(out / "checkpoint-1")
    assert all(t.isfinite().all() for t in step1.values())
    if not skip:
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if "error: " in line]
        assert len(errors) == 1, result.stderr[-3000:]
        last = re.escape(f"Last complete checkpoint: {out}/checkpoint-1.")
        assert re.fullmatch(rf"error: step 2: loss (nan|inf), .*{last} .*", errors[0])
        assert f'File "{TRAIN}"' not in result.stderr
        assert not (out / "checkpoint-2").exists() and not (out / "model.safetensors").exists()
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert re.findall(r"warning: step (\d+): loss (?:nan|inf)", result.stderr) == ["2", "3", "4"]
        for saved in [checkpoint_model(out / "checkpoint-4"), weights(out)]:
            assert_same_weights(step1, saved, 0)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, small_data) -> str:
    """The tiny model with a 1000-piece SentencePiece vocabulary trained on the data. Its steps are 4x faster
    than with LLaMA's 32000 pieces, and it has no 8 MB embedding-sized blocks: with those, glibc's heap settles
    in 16 MB jumps over the first ~130 steps (then stays flat: measured to step 900), which is the allocator
    warming up, not a leak, and would blur the measure."""
    path = tmp_path_factory.mktemp("small_vocab_model")
    records = json.loads(Path(small_data).read_text())
    texts = [PROMPT_INPUT, PROMPT_NO_INPUT] + [" ".join(r.values()) for r in records]
    with open(path / "sentencepiece.model", "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=f, vocab_size=1000, byte_fallback=True, minloglevel=2
        )
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=1000)
    torch.manual_seed(0)
    save_hf_checkpoint(str(path), args, Transformer(args).named_parameters(), str(path / "sentencepiece.model"))
    return str(path)


def test_memory_stays_flat_over_300_steps(small_vocab_model, small_data, tmp_path):
    """Peak resident memory of rank 0 (VmHWM, logged every step) from step 30 to step 300."""
    flags = common(small_vocab_model, small_data, tmp_path, max_steps=300, model_max_length=128, bf16=False,
                   per_device_train_batch_size=1, gradient_accumulation_steps=1)  # fmt: skip
    run(flags, nproc=2)
    peak = {m["step"]: m["peak_memory_gb"] for m in metrics(tmp_path)}
    assert len(peak) == 300
    assert peak[300] <= 1.05 * peak[30], (peak[30], peak[300])


NEW_LENGTH_EVERY_STEP = """
import torch
from distributed import tune_cpu_allocations
from model import ModelArgs, Transformer
tune_cpu_allocations()
torch.manual_seed(0)
model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000)).to(torch.bfloat16)
optimizer = torch.optim.AdamW(model.parameters())
rss = []
for length in range(8, 158):
    tokens = torch.randint(0, 1000, (1, length))
    model(tokens, labels=tokens).backward()
    optimizer.step()
    optimizer.zero_grad()
    rss.append(int(open("/proc/self/statm").read().split()[1]))
print(rss[29], rss[-1])
"""


def test_memory_stays_flat_when_every_step_has_a_new_length():
    """bf16 matmuls on the CPU are compiled per shape and cached, up to 1024 of them in each of two caches
    unless distributed.tune_cpu_allocations caps them: 150 steps, each one token longer than the last. Uncapped,
    resident memory grew by 60% between step 30 and step 150."""
    out = subprocess.run([sys.executable, "-c", NEW_LENGTH_EVERY_STEP], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, check=True)  # fmt: skip
    at_30, at_150 = map(int, out.stdout.split())
    assert at_150 <= 1.05 * at_30, (at_30, at_150)


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line on stderr naming the problem, a non-zero exit, no traceback, nothing written


class RunsCode:
    """What a malicious pickle does: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def copy_model(source: str, target: Path, config_edit=None, remove=()) -> str:
    shutil.copytree(source, target)
    if config_edit is not None:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    for name in remove:
        (target / name).unlink()
    return str(target)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_model, small_data, tokenizer_model) -> SimpleNamespace:
    """Good inputs (the tiny model, 64 records, a checkpoint of a 1-process run with global batch 3) and one
    broken copy of each."""
    root = tmp_path_factory.mktemp("bad_inputs")
    b = SimpleNamespace(root=root, model=tiny_model, data=small_data, marker=root / "code_ran")
    records = json.loads(Path(small_data).read_text())
    (root / "malformed.json").write_text(json.dumps(records[:2])[:-1] + ",")
    (root / "no_instruction.json").write_text(json.dumps([records[0], {"input": "", "output": "y"}]))
    (root / "empty.json").write_text("[]")
    (root / "data63.json").write_text(json.dumps(records[:63]))
    (root / "not_sentencepiece.model").write_text("a text file, not a SentencePiece model\n")
    (root / "a_file").write_text("")
    (root / "empty_dir").mkdir()

    b.vocab_1000 = copy_model(tiny_model, root / "vocab_1000", lambda c: c.update(vocab_size=1000))
    b.config_not_json = copy_model(tiny_model, root / "config_not_json")
    (root / "config_not_json" / "config.json").write_text('{"hidden_size": 64,')
    b.no_hidden_size = copy_model(tiny_model, root / "no_hidden_size", lambda c: c.pop("hidden_size"))
    b.no_weights = copy_model(tiny_model, root / "no_weights", remove=["model.safetensors"])
    b.truncated = copy_model(tiny_model, root / "truncated")
    os.truncate(Path(b.truncated) / "model.safetensors", os.path.getsize(Path(b.truncated) / "model.safetensors") // 2)
    b.mismatch = copy_model(tiny_model, root / "mismatch", lambda c: c.update(intermediate_size=256))
    b.pickle = copy_model(tiny_model, root / "pickle", remove=["model.safetensors"])
    torch.save({"model.embed_tokens.weight": RunsCode(b.marker)}, root / "pickle" / "pytorch_model.bin")
    other = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=32000)
    save_hf_checkpoint(str(root / "other_model"), other, Transformer(other).named_parameters(), str(tokenizer_model))
    b.other_model = str(root / "other_model")

    b.trained = root / "trained"
    run(common(tiny_model, small_data, b.trained, max_steps=1, save_strategy="steps", save_steps=1, bf16=False,
               per_device_train_batch_size=1, gradient_accumulation_steps=3))  # fmt: skip
    b.checkpoint = str(b.trained / "checkpoint-1")
    b.evil_checkpoint = shutil.copytree(b.checkpoint, root / "evil_checkpoint")
    (b.evil_checkpoint / ".metadata").write_bytes(pickle.dumps(RunsCode(b.marker)))
    return b


def train(b: SimpleNamespace, out: Path, **overrides) -> list[str]:
    """train.py's flags for the good inputs, with overrides."""
    flags = dict(per_device_train_batch_size=1, gradient_accumulation_steps=3, bf16=False) | overrides
    return common(b.model, b.data, out, **flags)


def resume(b: SimpleNamespace, out: Path, **overrides) -> list[str]:
    return train(b, out, resume_from_checkpoint=b.checkpoint, **overrides)


# case: (program, its arguments from (the inputs, a fresh output path), what the one line says, processes)
BAD_INPUTS = {
    "data file missing":
        (TRAIN, lambda b, o: train(b, o, data_path=b.root / "missing.json"), "missing.json: data file not found", 1),
    "data file missing, 2 processes":
        (TRAIN, lambda b, o: train(b, o, data_path=b.root / "missing.json"), "missing.json: data file not found", 2),
    "data not JSON":
        (TRAIN, lambda b, o: train(b, o, data_path=b.root / "malformed.json"), "malformed.json: invalid JSON at", 1),
    "record without instruction":
        (TRAIN, lambda b, o: train(b, o, data_path=b.root / "no_instruction.json"),
         "no_instruction.json: record 1: missing field 'instruction'", 1),
    "no records":
        (TRAIN, lambda b, o: train(b, o, data_path=b.root / "empty.json"), "empty.json: no records", 1),
    "tokenizer missing":
        (TRAIN, lambda b, o: train(b, o, tokenizer_path=b.root / "missing.model"),
         "missing.model: tokenizer model not found", 1),
    "tokenizer not SentencePiece":
        (TRAIN, lambda b, o: train(b, o, tokenizer_path=b.root / "not_sentencepiece.model"),
         "not_sentencepiece.model: not a SentencePiece model", 1),
    "tokenizer larger than the vocab":
        (TRAIN, lambda b, o: train(b, o, model_name_or_path=b.vocab_1000),
         "32000 pieces, but the model's vocab_size is 1000", 1),
    "model directory missing":
        (TRAIN, lambda b, o: train(b, o, model_name_or_path=b.root / "no_model"),
         "no_model: checkpoint directory not found", 1),
    "config.json not JSON":
        (TRAIN, lambda b, o: train(b, o, model_name_or_path=b.config_not_json), "config.json: not valid JSON", 1),
    "config without hidden_size":
        (TRAIN, lambda b, o: train(b, o, model_name_or_path=b.no_hidden_size),
         "config.json: missing field 'hidden_size'", 1),
    "weights missing":
        (TRAIN, lambda b, o: train(b, o, model_name_or_path=b.no_weights), "no_weights: no weights found", 1),
    "safetensors truncated":
        (TRAIN, lambda b, o: train(b, o, model_name_or_path=b.truncated), "model.safetensors: truncated: tensor", 1),
    "weights unlike the config":
        (TRAIN, lambda b, o: train(b, o, model_name_or_path=b.mismatch),
         "'layers.0.mlp.down_proj.weight' has shape (64, 128) but the config expects (64, 256)", 1),
    "pickle that runs code":
        (TRAIN, lambda b, o: train(b, o, model_name_or_path=b.pickle),
         "pytorch_model.bin: not a weights-only PyTorch checkpoint", 1),
    "resume from a non-checkpoint":
        (TRAIN, lambda b, o: train(b, o, resume_from_checkpoint=b.root / "empty_dir"),
         "empty_dir: not a complete checkpoint (no trainer_state.json)", 1),
    "checkpoint index that runs code":
        (TRAIN, lambda b, o: train(b, o, resume_from_checkpoint=b.evil_checkpoint),
         ".metadata: not a checkpoint index (posix.system is not part of a checkpoint index)", 1),
    "checkpoint of another model":
        (TRAIN, lambda b, o: resume(b, o, model_name_or_path=b.other_model), "this model's is (96, 64)", 1),
    "global batch changed":
        (TRAIN, lambda b, o: resume(b, o, gradient_accumulation_steps=1),
         "trained with global batch 3, this launch makes 1: pass --gradient_accumulation_steps 3", 1),
    "global batch not divisible by the world size":
        (TRAIN, lambda b, o: resume(b, o),
         "trained with global batch 3, which 2 ranks x --per_device_train_batch_size 1 does not divide", 2),
    "seed changed":
        (TRAIN, lambda b, o: resume(b, o, seed=8), "trained with --seed 7", 1),
    "data changed":
        (TRAIN, lambda b, o: resume(b, o, data_path=b.root / "data63.json"), "trained on 64 records, but", 1),
    "fresh start over a checkpoint":
        (TRAIN, lambda b, o: train(b, b.trained), "trained already holds", 1),
    "output dir under a file":
        (TRAIN, lambda b, o: train(b, b.root / "a_file" / "out"), "a_file is a file, not a directory", 1),
    "negative learning rate":
        (TRAIN, lambda b, o: train(b, o, learning_rate=-1), "--learning_rate must be > 0, got -1.0", 1),
    "save_steps 0":
        (TRAIN, lambda b, o: train(b, o, save_steps=0), "--save_steps must be >= 1, got 0", 1),
    "generate: model directory missing":
        (GENERATE, lambda b, o: ["--model_path", b.root / "no_model", "Hi"],
         "no_model: checkpoint directory not found", 1),
    "generate: bad temperature":
        (GENERATE, lambda b, o: ["--model_path", b.model, "--temperature", "-1", "Hi"],
         "--temperature must be >= 0", 1),
    "generate: prompt file missing":
        (GENERATE, lambda b, o: ["--model_path", b.model, "--prompts", b.root / "prompts.txt"], "prompts.txt", 1),
    "generate: pickle that runs code":
        (GENERATE, lambda b, o: ["--model_path", b.pickle, "Hi"],
         "pytorch_model.bin: not a weights-only PyTorch checkpoint", 1),
}  # fmt: skip


def files(*roots: Path) -> dict[Path, int]:
    return {p: p.stat().st_size for root in roots for p in root.rglob("*")}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(case, bad, tmp_path):
    program, arguments, expected, nproc = BAD_INPUTS[case]
    before = files(bad.root, tmp_path)
    if nproc == 1:
        cmd = [sys.executable, program]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", program]
    cmd += map(str, arguments(bad, tmp_path / "out"))
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert result.returncode != 0
    if nproc == 1:
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr[-3000:]
        assert expected in result.stderr and "Traceback" not in result.stderr
    else:
        errors = [line for line in result.stderr.splitlines() if "error: " in line]
        assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], result.stderr[-3000:]
        assert f'File "{program}"' not in result.stderr
    assert files(bad.root, tmp_path) == before  # not even an empty output_dir
    assert not bad.marker.exists()
