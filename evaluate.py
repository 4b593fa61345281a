"""Blind pairwise evaluation, the way Alpaca's headline result was measured: two models' answers to the same
instructions, compared pair by pair without knowing which model wrote which. By an LLM judge exactly as the
alpaca_eval package (0.6.6) does it, or by people in a browser (human_eval.py).

    python evaluate.py --model_path out               # answer the 252 self-instruct instructions, then judge them
                                                      # against text-davinci-003's answers
    python evaluate.py --model_outputs a.json --reference_outputs b.json --output_path results/a
    python evaluate.py --human --model_outputs a.json --output_path results/a     # people judge, on a local page
    python evaluate.py --human_report results/a

Inputs are AlpacaEval's model_outputs.json: a JSON list of {instruction, output, generator, dataset}, paired by
instruction. The judge writes <output_path>/<annotators_config>/annotations.json and leaderboard.csv, with
alpaca_eval's fields and numbers, and keeps every judgement in <output_path>/judge_cache.jsonl, so a killed run
resumes without paying for a judgement twice.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from checkpoint import write_json
from cli import ArgumentParser, check_ranges, exit_on_user_error
from data import format_prompt
from engine import check_prompt_lengths, generate
from http_client import error_message, is_worth_retrying, post_json, retry_pause
from loading import add_model_flags, load_for_decoding, load_tokenizer

EVAL_DIR = Path(__file__).with_name("eval")
EVAL_INSTRUCTIONS = EVAL_DIR / "user_oriented_instructions.jsonl"  # self-instruct's 252, AlpacaEval's selfinstruct
DAVINCI_ANSWERS = EVAL_DIR / "text-davinci-003_predictions.jsonl"
JUDGE_TEMPLATE = EVAL_DIR / "alpaca_eval_clf.txt"  # AlpacaEval 2.0's judge prompt, in ChatML
OPENAI_API_BASE = "https://api.openai.com/v1"

# alpaca_eval's two annotator configs send the same request and differ in how they read the answer: the
# probability that the judge names the first output (m) against the second (M), or which of the two is likelier.
ANNOTATORS_BINARIZE = {"weighted_alpaca_eval_gpt4_turbo": False, "alpaca_eval_clf_gpt4_turbo": True}
DEFAULT_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"  # AlpacaEval 2.0's
JUDGE_MODEL = "gpt-4-1106-preview"
JUDGE_SETTINGS = {"max_tokens": 1, "temperature": 1, "top_p": 1.0, "logprobs": True, "top_logprobs": 5}
# PairwiseAnnotator hands its annotators its own seed, 0; SingleAnnotator's default of 123 is never used.
SWAP_SEED = "0"
SWAP_COLUMN = "is_switched_outputs"  # alpaca_eval seeds each instruction's coin with this name in front

# How AlpacaEval answers for alpaca-7b (models_configs/alpaca-7b): sampling at 0.7, top_p 1, up to 2048 tokens.
GENERATION_TEMPERATURE = 0.7
MAX_NEW_TOKENS = 2048

REQUEST_TIMEOUT = 120.0  # seconds for one judge request: one token out, but a busy endpoint can queue
RETRY_DELAY = 1.0  # seconds before the first retry, doubling up to 60
MAX_TRIES = 8


# ---------------------------------------------------------------------------------------------------------
# Outputs: reading, pairing, and the self-instruct evaluation set


def read_outputs(path: str) -> list[dict]:
    """AlpacaEval's model_outputs.json: a list of {instruction, output, generator, ...}, one per instruction."""
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{instruction, output, generator}} objects")
    seen = set()
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {i} is not an object")
        for name in ("instruction", "output", "generator"):
            if not isinstance(record.get(name), str):
                raise ValueError(f"{path}: record {i} has no string '{name}'")
        if record["instruction"] in seen:
            raise ValueError(f"{path}: record {i} repeats an instruction: {record['instruction'][:80]!r}")
        seen.add(record["instruction"])
    return records


def merged_instruction(instruction: str, input: str) -> str:
    """An instruction with its input, as AlpacaEval's selfinstruct set holds it (and its judge sees it)."""
    return instruction + "\n\n" + input if input else instruction


def eval_instructions() -> list[tuple[str, str]]:
    """The 252 self-instruct user-oriented (instruction, input) pairs, in order."""
    with open(EVAL_INSTRUCTIONS, encoding="utf-8") as f:
        tasks = [json.loads(line) for line in f]
    return [(task["instruction"], task["instances"][0]["input"]) for task in tasks]


def davinci_outputs() -> list[dict]:
    """text-davinci-003's answers to the 252 as model outputs, stripped as alpaca_eval strips answers."""
    with open(DAVINCI_ANSWERS, encoding="utf-8") as f:
        answers = [json.loads(line)["response"] for line in f]
    return [
        {"instruction": merged_instruction(*pair), "output": answer.strip(), "generator": "text-davinci-003",
         "dataset": "selfinstruct"}
        for pair, answer in zip(eval_instructions(), answers, strict=True)
    ]  # fmt: skip


def pair_outputs(model: list[dict], reference: list[dict], model_name: str, reference_name: str) -> list[dict]:
    """One pair per instruction, in the reference's order, output_1 the reference's as in alpaca_eval; their
    datasets as `dataset` where the two files agree on every one, else as dataset_1 and dataset_2."""
    by_instruction = {record["instruction"]: record for record in model}
    reference_instructions = {record["instruction"] for record in reference}
    for records, others, name, other in ((reference, by_instruction, reference_name, model_name),
                                         (model, reference_instructions, model_name, reference_name)):  # fmt: skip
        missing = [r["instruction"] for r in records if r["instruction"] not in others]
        if missing:
            raise ValueError(
                f"{len(missing)} instruction(s) of {name} are not in {other}, e.g. {missing[0][:80]!r}: "
                "both files must answer the same instructions"
            )
    pairs = []
    for ref in reference:
        answer = by_instruction[ref["instruction"]]
        pair = {"instruction": ref["instruction"], "output_1": ref["output"], "generator_1": ref["generator"]}
        pair |= {"dataset_1": ref["dataset"]} if "dataset" in ref else {}
        pair |= {"output_2": answer["output"], "generator_2": answer["generator"]}
        pairs.append(pair | ({"dataset_2": answer["dataset"]} if "dataset" in answer else {}))
    if all(p.get("dataset_1", 0) == p.get("dataset_2", 1) for p in pairs):
        pairs = [{("dataset" if k.startswith("dataset") else k): v for k, v in p.items()} for p in pairs]
    return pairs


# ---------------------------------------------------------------------------------------------------------
# The judge's prompt and the preference it gives


def is_swapped(instruction: str) -> bool:
    """alpaca_eval's coin for an instruction: True shows the model's output first (as m) and the reference's
    second; the preference read from the judge is then mirrored (3 - p)."""
    return random.Random(SWAP_COLUMN + instruction + SWAP_SEED).choices([False, True], k=1)[0]


def judge_messages(template: str, instruction: str, output_1: str, output_2: str) -> list[dict]:
    """The chat messages alpaca_eval sends: each placeholder's first occurrence replaced in turn (an output that
    holds the text "{output_2}" is filled in too, as there), the prompt stripped, its ChatML split into messages."""
    prompt = template
    for name, value in (("instruction", instruction), ("output_1", output_1), ("output_2", output_2)):
        prompt = prompt.replace("{" + name + "}", value, 1)
    messages = []
    for part in prompt.strip().split("<|im_start|>")[1:]:
        role, content = part.split("\n", 1)
        messages.append({"content": content.split("<|im_end|>", 1)[0].strip(), "role": role.strip()})
    return messages


def read_preference(choice: dict, is_binarize: bool) -> float | None:
    """alpaca_eval's logprob_parser on the first token's top logprobs: 2 - P(m) / (P(m) + P(M)), or 1 if m is the
    likelier of the two and else 2. None if neither m nor M is among them (or the answer has no logprobs)."""
    try:
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        logprobs = {t["token"]: float(t["logprob"]) for t in top if t["token"] in ("m", "M")}
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not logprobs:
        return None
    m, big_m = logprobs.get("m", -math.inf), logprobs.get("M", -math.inf)
    if is_binarize:
        return 1.0 if m > big_m else 2.0
    top_logprob = max(m, big_m)
    log_total = top_logprob + math.log(math.exp(m - top_logprob) + math.exp(big_m - top_logprob))
    return 2 - math.exp(m - log_total)


# ---------------------------------------------------------------------------------------------------------
# Asking the judge: an OpenAI-compatible endpoint, requests in flight, a cache of every judgement


def post_json_retrying(url: str, body: dict, api_key: str | None) -> dict:
    """The JSON answer to one POST. Rate limits (honouring Retry-After), server errors and timeouts are retried
    with growing pauses; another HTTP error is a ValueError naming it."""
    for tries in range(1, MAX_TRIES + 1):
        status, raw, retry_after = post_json(url, body, api_key, REQUEST_TIMEOUT)
        if status == 200:
            try:
                return json.loads(raw)
            except ValueError:
                raise ValueError(f"{url}: the answer is not JSON: {raw[:100]!r}") from None
        message = error_message(raw)
        if not is_worth_retrying(status):
            raise ValueError(f"{url}: HTTP {status}: {message}")
        if tries < MAX_TRIES:
            time.sleep(retry_pause(tries, retry_after, time.time(), RETRY_DELAY))
    raise ValueError(f"{url}: gave up after {MAX_TRIES} tries (last: {status or 'no answer'}: {message})")


class JudgeCache:
    """Every judgement, one JSON line each, appended with one write and synced before the next: a killed run
    loses at most the requests still in flight, and a torn last line is ignored when read back."""

    def __init__(self, path: str):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the end of a line cut by a kill: that judgement is asked again
                    self.entries[entry["key"]] = entry

    @staticmethod
    def key(annotator: str, judge_model: str, instruction: str, output_1: str, output_2: str) -> str:
        parts = json.dumps([annotator, judge_model, instruction, output_1, output_2])
        return hashlib.sha256(parts.encode()).hexdigest()

    def add(self, entry: dict) -> None:
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode()
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.entries[entry["key"]] = entry


def judge_pairs(pairs: list[dict], annotator: str, judge_model: str, args: argparse.Namespace) -> list[dict]:
    """alpaca_eval's annotations for the pairs, in their order: identical outputs get 1.5 without a call, the rest
    are judged (or read from the cache) with each instruction's seeded swap undone. A judge answer that names
    neither m nor M gives a preference of None, which the win rate leaves out, as alpaca_eval does."""
    template = JUDGE_TEMPLATE.read_text(encoding="utf-8")
    cache = JudgeCache(os.path.join(args.output_path, "judge_cache.jsonl"))
    keys = [JudgeCache.key(annotator, judge_model, p["instruction"], p["output_1"], p["output_2"]) for p in pairs]
    to_judge = [(p, k) for p, k in zip(pairs, keys, strict=True) if p["output_1"] != p["output_2"]]
    to_ask = list({k: (p, k) for p, k in to_judge if k not in cache.entries}.values())
    url = args.api_base.rstrip("/") + "/chat/completions"
    api_key = os.environ.get("OPENAI_API_KEY")

    def ask(pair: dict, key: str) -> None:
        first, second = pair["output_1"], pair["output_2"]
        if is_swapped(pair["instruction"]):
            first, second = second, first
        body = {"model": judge_model, "messages": judge_messages(template, pair["instruction"], first, second)}
        response = post_json_retrying(url, body | JUDGE_SETTINGS, api_key)
        choices = response.get("choices") if isinstance(response, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise ValueError(f"{url}: expected 'choices' in the answer, got {json.dumps(response)[:200]}")
        cache.add({"key": key, "raw_completion": choices[0], "usage": response.get("usage") or {}})

    if to_ask:
        print(f"judging {len(to_ask)} pairs with {judge_model} at {url} "
              f"({len(to_judge) - len(to_ask)} already judged, {len(pairs) - len(to_judge)} identical)",
              file=sys.stderr)  # fmt: skip
        run_in_flight(ask, to_ask, args.max_concurrency, cache)

    annotations, unparsed = [], 0
    for pair, key in zip(pairs, keys, strict=True):
        if pair["output_1"] == pair["output_2"]:
            annotations.append(pair | {"annotator": annotator, "preference": 1.5, "preference_raw_completion": None})
            continue
        raw = cache.entries[key]["raw_completion"]
        preference = read_preference(raw, ANNOTATORS_BINARIZE[annotator])
        if preference is None:
            unparsed += 1
        elif is_swapped(pair["instruction"]):
            preference = 3 - preference
        annotations.append(pair | {"annotator": annotator, "preference": preference, "preference_raw_completion": raw})
    if unparsed:
        print(f"{unparsed} judge answer(s) named neither output (no m or M among the top logprobs): not counted, "
              "as alpaca_eval does; annotations.json has them with preference null", file=sys.stderr)  # fmt: skip
    return annotations


def run_in_flight(ask, items: list[tuple], max_concurrency: int, cache: JudgeCache) -> None:
    """ask(*item) for every item, up to max_concurrency at once, with a progress bar of the judge's tokens.
    The first error stops the run (what was judged is kept) and is raised."""
    tokens = {"prompt_tokens": 0, "completion_tokens": 0}
    with (
        tqdm(total=len(items), desc="judging", unit="pair") as progress,
        ThreadPoolExecutor(max_workers=max_concurrency) as pool,
    ):
        pending = {pool.submit(ask, *item): item for item in items}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise future.exception()
                usage = cache.entries[item[1]]["usage"]
                for name in tokens:
                    tokens[name] += int(usage.get(name) or 0)
                progress.set_postfix_str(f"{tokens['prompt_tokens']:,} prompt + {tokens['completion_tokens']} "
                                         "completion tokens", refresh=False)  # fmt: skip
                progress.update()


# ---------------------------------------------------------------------------------------------------------
# The numbers: alpaca_eval's get_winrate


def win_rate(preferences: list[float]) -> dict:
    """alpaca_eval's metrics from preferences (1: the reference wins, 2: the model wins, 1.5: a draw): the mean
    and its standard error in percent, the counts, and the win rate of the preferences rounded to 1 or 2."""
    scores = [p - 1 for p in preferences]
    rounded = [0.5 if p == 1.5 else round(p) - 1 for p in preferences]  # alpaca_eval's ZeroOneScoringRule
    n = len(scores)
    return {
        "win_rate": 100 * statistics.fmean(scores),
        "standard_error": 100 * statistics.stdev(scores) / math.sqrt(n) if n > 1 else math.nan,
        "n_wins": sum(s > 0.5 for s in scores),
        "n_wins_base": sum(s < 0.5 for s in scores),
        "n_draws": sum(p == 1.5 for p in preferences),
        "n_total": n,
        "discrete_win_rate": 100 * statistics.fmean(rounded),
    }


LEADERBOARD_COLUMNS = ["win_rate", "standard_error", "mode", "avg_length", "n_wins", "n_wins_base", "n_draws",
                       "n_total", "discrete_win_rate"]  # fmt: skip


def write_leaderboard(path: str, generator: str, row: dict) -> list[dict]:
    """Adds (or replaces) the generator's row in the leaderboard.csv at path, sorted by win rate as alpaca_eval
    sorts it, so that runs of several models against one reference build one table. Returns the rows."""
    rows = {}
    if os.path.exists(path):
        with open(path, newline="", encoding="utf-8") as f:
            rows = {r[""]: r for r in csv.DictReader(f)}
    rows[generator] = {"": generator} | {name: row[name] for name in LEADERBOARD_COLUMNS}
    ordered = sorted(rows.values(), key=lambda r: -float(r["win_rate"]))
    temporary = path + ".tmp"
    with open(temporary, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["", *LEADERBOARD_COLUMNS])
        writer.writeheader()
        writer.writerows(ordered)
    os.replace(temporary, path)
    return ordered


def print_leaderboard(rows: list[dict]) -> None:
    print(f"{'':<28} {'win_rate':>9} {'std_err':>8} {'wins':>5} {'losses':>6} {'draws':>6} {'total':>6} "
          f"{'discrete':>9} {'avg_len':>8}")  # fmt: skip
    for r in rows:
        print(f"{r[''][:28]:<28} {float(r['win_rate']):>9.2f} {float(r['standard_error']):>8.2f} "
              f"{int(r['n_wins']):>5} {int(r['n_wins_base']):>6} {int(r['n_draws']):>6} {int(r['n_total']):>6} "
              f"{float(r['discrete_win_rate']):>9.2f} {int(r['avg_length']):>8}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Answering the 252 with our own model


def generate_outputs(args: argparse.Namespace) -> list[dict]:
    """Our model's answers to the self-instruct evaluation set, as AlpacaEval's alpaca-7b config decodes them: the
    Alpaca template (with its input section where there is an input), sampling at args.temperature with top_p 1,
    up to 2048 new tokens or what the context leaves. The same seed and batch size give the same answers."""
    pairs = eval_instructions()[: args.max_instances]
    prompts = [format_prompt(instruction, input) for instruction, input in pairs]
    model_args, tokenizer = load_tokenizer(args)
    check_prompt_lengths([tokenizer.encode(p, bos=True) for p in prompts], model_args.max_seq_len)
    model, compiled = load_for_decoding(args)
    name = os.path.basename(os.path.normpath(args.model_path))
    answers = []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="answering", unit="batch"):
        batch = prompts[start : start + args.batch_size]
        seed = args.seed + start // args.batch_size
        answers += generate(model, tokenizer, batch, MAX_NEW_TOKENS, args.temperature, 1.0, 0, seed, None, compiled)
    return [
        {"instruction": merged_instruction(*pair), "output": answer.strip(), "generator": name,
         "dataset": "selfinstruct"}
        for pair, answer in zip(pairs, answers, strict=True)
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--model_outputs", help="AlpacaEval model_outputs.json of the model to evaluate")
    add_model_flags(parser)
    parser.add_argument(
        "--reference_outputs",
        help="model_outputs.json of the model to compare with (default: text-davinci-003 on the 252 self-instruct "
        "user-oriented instructions, eval/)",
    )
    parser.add_argument(
        "--output_path",
        help="where the answers, judgements and leaderboard go (default: the model outputs' folder, or "
        "results/<model name> with --model_path)",
    )
    parser.add_argument(
        "--annotators_config", choices=list(ANNOTATORS_BINARIZE), default=DEFAULT_ANNOTATOR,
        help="alpaca_eval's judge config: the judge's probability of each output (AlpacaEval 2.0's default), or "
        "its likelier choice (clf)",
    )  # fmt: skip
    parser.add_argument("--judge_model", help=f"the judge's model name (default: the config's, {JUDGE_MODEL})")
    parser.add_argument(
        "--api_base",
        default=os.environ.get("OPENAI_BASE_URL") or OPENAI_API_BASE,
        help="the judge's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for serve.py or vLLM "
        f"(default: $OPENAI_BASE_URL, else {OPENAI_API_BASE}); the key is $OPENAI_API_KEY",
    )
    parser.add_argument("--max_concurrency", type=int, default=8, help="judge requests in flight (default: 8)")
    parser.add_argument("--max_instances", type=int, help="only the first N instructions (with --model_path)")
    parser.add_argument("--batch_size", type=int, default=8, help="answers generated together (default: 8)")
    parser.add_argument(
        "--temperature", type=float, default=GENERATION_TEMPERATURE,
        help=f"sampling temperature of the answers, 0 for greedy (default: {GENERATION_TEMPERATURE}, AlpacaEval's)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of the answers (default: 0)")
    parser.add_argument("--human", action="store_true", help="serve a page where people compare the pairs blind")
    parser.add_argument("--host", default="127.0.0.1", help="--human: address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="--human: port (default: 8001; 0: any free one)")
    parser.add_argument("--human_report", metavar="DIR", help="print the report of the human votes in DIR")
    parser.set_defaults(compile=False)  # loading.load_for_decoding reads it

    args = parser.parse_args(argv)
    if args.human_report is not None:
        return args
    if (args.model_outputs is None) == (args.model_path is None):
        raise ValueError("give the model's answers with --model_outputs FILE, or a model to answer with --model_path")
    check_ranges(
        args, {"max_concurrency": ">= 1", "batch_size": ">= 1", "max_instances": ">= 1", "temperature": ">= 0"}
    )
    if args.max_instances is not None and args.model_path is None:
        raise ValueError("--max_instances goes with --model_path (the answers of --model_outputs are all judged)")
    if args.output_path is None:
        if args.model_outputs is not None:
            args.output_path = os.path.dirname(os.path.abspath(args.model_outputs))
        else:
            args.output_path = os.path.join("results", os.path.basename(os.path.normpath(args.model_path)))
    return args


def run(args: argparse.Namespace) -> None:
    if args.human_report is not None:
        from human_eval import human_report

        print(human_report(args.human_report))
        return
    reference_name = args.reference_outputs or "text-davinci-003's answers (eval/)"
    reference = read_outputs(args.reference_outputs) if args.reference_outputs else davinci_outputs()
    needs_key = not args.human and args.api_base.rstrip("/") == OPENAI_API_BASE
    if needs_key and not os.environ.get("OPENAI_API_KEY"):
        raise ValueError(f"the judge at {OPENAI_API_BASE} needs OPENAI_API_KEY (or --api_base for another endpoint)")
    os.makedirs(args.output_path, exist_ok=True)
    if args.model_path is not None:
        model_outputs = generate_outputs(args)
        args.model_outputs = os.path.join(args.output_path, "model_outputs.json")
        write_json(args.model_outputs, model_outputs)
        print(f"wrote {len(model_outputs)} answers to {args.model_outputs}", file=sys.stderr)
        reference = [r for r in reference if r["instruction"] in {m["instruction"] for m in model_outputs}]
    else:
        model_outputs = read_outputs(args.model_outputs)
    pairs = pair_outputs(model_outputs, reference, args.model_outputs, reference_name)
    if args.human:
        serve_human(pairs, args)
        return
    annotations = judge_pairs(pairs, args.annotators_config, args.judge_model or JUDGE_MODEL, args)
    config_dir = os.path.join(args.output_path, args.annotators_config)
    os.makedirs(config_dir, exist_ok=True)
    write_json(os.path.join(config_dir, "annotations.json"), annotations)
    generator = model_outputs[0]["generator"] if len({m["generator"] for m in model_outputs}) == 1 else "Current model"
    preferences = [a["preference"] for a in annotations if a["preference"] is not None]
    if not preferences:
        raise ValueError(
            f"no judge answer named an output (m or M) among its top logprobs: is {args.judge_model or JUDGE_MODEL} "
            f"at {args.api_base} a model that follows AlpacaEval's judge prompt? ({config_dir}/annotations.json)"
        )
    row = win_rate(preferences)
    row |= {"mode": "community", "avg_length": int(statistics.fmean(len(m["output"]) for m in model_outputs))}
    print_leaderboard(write_leaderboard(os.path.join(config_dir, "leaderboard.csv"), generator, row))


def serve_human(pairs: list[dict], args: argparse.Namespace) -> None:
    from human_eval import build_human_server

    try:
        server = build_human_server(pairs, args.output_path, args.host, args.port)
    except OSError as e:
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    host, port = server.server_address[:2]
    print(f"{len(pairs)} pairs to compare blind at http://{host}:{port}/ (Ctrl-C stops; votes go to "
          f"{os.path.join(args.output_path, 'human_votes.jsonl')})", file=sys.stderr, flush=True)  # fmt: skip
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error():
        run(parse_args(argv))


if __name__ == "__main__":
    main()
