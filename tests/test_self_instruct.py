"""self_instruct.py against a restatement of stanford_alpaca's generate_instruction.py that scores with
rouge_score, behind a local HTTP server that serves canned completions; its local backend on the sample model."""

import argparse
import contextlib
import email.utils
import hashlib
import json
import os
import random
import re
import shutil
import socket
import string
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import ROOT, SHARED_DATA
from rouge_score import rouge_scorer

import self_instruct
import serve
from engine import Engine, generate_ids
from loading import load_for_decoding, load_tokenizer
from self_instruct import InstructionPool, Throttle, complete_locally, deduplicate, main, rouge_l

SEED_TASKS = str(SHARED_DATA / "seed_tasks.jsonl")

# ---------------------------------------------------------------------------------------------------------
# The reference: generate_instruction.py's prompt, post-processing and dedup, restated with rouge_score


def reference_prompt(header: str, tasks: list[dict]) -> str:
    prompt = header + "\n"
    for idx, task in enumerate(tasks):
        instruction = re.sub(r"\s+", " ", task["instruction"]).strip().rstrip(":")
        input = "<noinput>" if task["input"].lower() == "" else task["input"]
        prompt += "###\n"
        prompt += f"{idx + 1}. Instruction: {instruction}\n"
        prompt += f"{idx + 1}. Input:\n{input}\n"
        prompt += f"{idx + 1}. Output:\n{task['output']}\n"
    prompt += "###\n"
    prompt += f"{idx + 2}. Instruction:"
    return prompt


def reference_post_process(num_prompt_instructions: int, response: dict) -> list[dict]:
    raw_instructions = re.split("###", f"{num_prompt_instructions + 1}. Instruction:" + response["text"])
    blacklist = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps"]
    blacklist += ["draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]
    instructions = []
    for idx, inst in enumerate(raw_instructions):
        if idx == len(raw_instructions) - 1 and response["finish_reason"] == "length":
            continue
        idx += num_prompt_instructions + 1
        splitted_data = re.split(rf"{idx}\.\s+(Instruction|Input|Output):", inst)
        if len(splitted_data) != 7:
            continue
        inst = splitted_data[2].strip()
        input = splitted_data[4].strip()
        input = "" if input.lower() == "<noinput>" else input
        output = splitted_data[6].strip()
        if len(inst.split()) <= 3 or len(inst.split()) > 150:
            continue
        if any(re.compile(rf"\b({w})\b", flags=re.IGNORECASE).search(inst) for w in blacklist):
            continue
        if inst.startswith("Write a program") or inst[0] in string.punctuation or not inst[0].isascii():
            continue
        instructions.append({"instruction": inst, "input": input, "output": output})
    return instructions


def reference_dedup(entries: list[dict], all_instructions: list[str], kept: list[dict]) -> None:
    """Appends the entries to keep to `kept` and their instructions to `all_instructions`."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    all_instruction_tokens = [scorer._tokenizer.tokenize(inst) for inst in all_instructions]
    for entry in entries:
        new_instruction_tokens = scorer._tokenizer.tokenize(entry["instruction"])
        rouge_scores = [rouge_scorer._score_lcs(new_instruction_tokens, t).fmeasure for t in all_instruction_tokens]
        most_similar = {all_instructions[i]: rouge_scores[i] for i in np.argsort(rouge_scores)[-10:][::-1]}
        if max(rouge_scores) > 0.7:
            continue
        entry = dict(entry, most_similar_instructions=most_similar, avg_similarity_score=float(np.mean(rouge_scores)))
        kept.append(entry)
        all_instructions.append(entry["instruction"])
        all_instruction_tokens.append(new_instruction_tokens)


def seed_tasks() -> list[dict]:
    with open(SEED_TASKS) as f:
        tasks = [json.loads(line) for line in f]
    return [{"instruction": t["instruction"], **t["instances"][0]} for t in tasks]


# ---------------------------------------------------------------------------------------------------------
# A canned OpenAI-compatible endpoint on 127.0.0.1


class CannedEndpoint:
    """POST /v1/completions and /v1/chat/completions answered by respond(request number, body) -> (status,
    response bytes[, headers]), numbered in the order they arrive. A request whose number is block_at waits
    (in_flight set) until `release` is set. Records each request's body, headers and path, the times it came
    and was answered (time.time()), and the most requests in flight at once."""

    def __init__(self, respond, block_at: int | None = None):
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.paths: list[str] = []
        self.arrived: list[float] = []
        self.answered: dict[int, float] = {}  # number -> time its answer was sent
        self.statuses: dict[int, int] = {}
        self.in_flight_now = self.most_in_flight = 0
        self.in_flight, self.release = threading.Event(), threading.Event()
        lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    endpoint.bodies.append(body)
                    endpoint.headers.append(dict(self.headers))
                    endpoint.paths.append(self.path)
                    endpoint.arrived.append(time.time())
                    number = len(endpoint.bodies)
                    endpoint.in_flight_now += 1
                    endpoint.most_in_flight = max(endpoint.most_in_flight, endpoint.in_flight_now)
                if self.path not in ("/v1/completions", "/v1/chat/completions"):
                    status, payload, headers = 404, b'{"error": {"message": "no such route"}}', []
                else:
                    status, payload, *headers = respond(number, body)
                if number == block_at:
                    endpoint.in_flight.set()
                    endpoint.release.wait(120)
                with lock:
                    endpoint.in_flight_now -= 1
                    endpoint.answered[number] = time.time()
                    endpoint.statuses[number] = status
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in (headers[0] if headers else {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client was killed while it waited
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    endpoints = []

    def start(respond, block_at=None):
        endpoints.append(CannedEndpoint(respond, block_at))
        return endpoints[-1]

    yield start
    for e in endpoints:
        e.close()


def completions(choices: list[dict]) -> tuple[int, bytes]:
    return 200, json.dumps({"object": "text_completion", "choices": choices}).encode()


def item(number: int, instruction: str, input: str = "<noinput>", output: str = "Done.") -> str:
    """One numbered item as the model writes it; the first one continues the prompt's "4. Instruction:"."""
    opening = "" if number == 4 else f"###\n{number}. Instruction:"
    return f"{opening} {instruction}\n{number}. Input:\n{input}\n{number}. Output:\n{output}\n"


SEED_0 = seed_tasks()[0]["instruction"]
CANNED = [  # (text, finish_reason): every filter, a cut item, misnumbering, near-duplicates
    (
        item(4, "Give three tips for staying healthy while working from home.")
        + item(15, "Rank these animals by size.", "ant, cow")  # "15." where 5 is expected: split at "5."
        + item(6, "Give three tips for staying healthy when working from home.")  # near-duplicate of 4
        + item(7, "Summarize the text.", "Cats chase mice.")  # 3 words
        + item(8, "Describe " + "the very long and winding road " * 30)  # over 150 words
        + item(9, "Draw a simple picture of a cat sitting on a mat.")
        + item(10, "Write a program that prints the first ten prime numbers.")
        + item(11, '"Explain" what the following proverb means to you.', "A stitch in time saves nine.")
        + item(12, "Écrivez un court poème sur la mer et le ciel.")
        + item(13, "Classify the sentiment of the following movie review.", "<NoInput>")
        + item(15, "Name two countries whose flags contain the color green."),  # 15 where 14 is expected
        "stop",
    ),
    (
        item(4, SEED_0.replace("roughly", "about"))  # near-duplicate of a seed task
        + item(5, "Convert the following temperature from Celsius to Fahrenheit.", "25 degrees Celsius")
        + item(6, "List the planets of the solar system in order from the sun.")
        + item(7, "Identify the main verb in the following sentence", "The dog ran home.")
        + item(8, "Translate the following sentence into French.", "Hello, my friend.", "Bonjour, mon"),
        "length",  # so the last item is cut: dropped though it parses
    ),
    (
        item(4, "Give three tips for staying healthy while working from home.")  # a repeat of the first
        + item(5, "Suggest a catchy name for a new bakery that sells only bread.")
        + item(6, "What are the main differences between a virus and a bacterium?")
        + item(7, "Rewrite the following sentence in the passive voice.", "The chef cooked a meal.")
        + "###\n8. Instruction: Explain why the sky is blue in one sentence.\n8. Output:\nScattering.\n",  # no input
        "stop",
    ),
]


def canned_in_turn(number: int, body: dict) -> tuple[int, bytes]:
    """Each prompt gets the next canned completion, in turn."""
    first = (number - 1) * len(body["prompt"])
    chosen = [CANNED[(first + i) % len(CANNED)] for i in range(len(body["prompt"]))]
    return completions([{"index": i, "text": t, "finish_reason": f} for i, (t, f) in enumerate(chosen)])


def run_main(args: list[str]) -> str | int | None:
    """main's exit code, or its one-line error message."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L and deduplication


def test_rouge_l_equals_rouge_score_on_1000_random_pairs(alpaca_sample):
    instructions = [r["instruction"] for r in json.loads(alpaca_sample.read_text())]
    instructions += [t["instruction"] for t in seed_tasks()]
    rng = random.Random(0)
    # Some long ones too (joined instructions, up to a few hundred tokens): their bit vectors span several words.
    texts = [" ".join(rng.sample(instructions, rng.randint(4, 12))) if i % 10 == 0 else rng.choice(instructions)
             for i in range(2000)] + ["", "?!", "a b c"]  # fmt: skip
    pairs = [(texts[2 * i], texts[2 * i + 1]) for i in range(1000)] + [(texts[-3], texts[-1]), (texts[-2], texts[0])]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = InstructionPool([])
    ours = rouge_l([pool.encode(a) for a, _ in pairs], [pool.encode(b) for _, b in pairs]).diagonal()
    theirs = [scorer.score(a, b)["rougeL"].fmeasure for a, b in pairs]
    assert max(len(pool.encode(t)) for t in texts) > 128
    assert np.abs(ours - np.array(theirs)).max() <= 1e-9
    assert np.count_nonzero(ours) > 800  # most pairs share a word or more


@pytest.mark.parametrize("per_call, max_pairs", [(1000, 1 << 18), (7, 500)])  # all in one call; in many
def test_deduplicate_keeps_what_the_original_keeps(alpaca_sample, per_call, max_pairs):
    rng = random.Random(1)
    records = json.loads(alpaca_sample.read_text())[:120]
    entries = []
    for record in records:  # each record, and now and then a near copy of an earlier one (a word dropped)
        entries.append({k: record[k] for k in ("instruction", "input", "output")})
        if rng.random() < 0.4:
            words = rng.choice(entries)["instruction"].split()
            del words[rng.randrange(len(words))]
            entries.append({"instruction": " ".join(words), "input": "", "output": "x"})
    seeds = [t["instruction"] for t in seed_tasks()]
    expected: list[dict] = []
    reference_dedup([dict(e) for e in entries], list(seeds), expected)
    pool = InstructionPool(seeds)
    kept = []
    for start in range(0, len(entries), per_call):
        kept += deduplicate([dict(e) for e in entries[start : start + per_call]], pool, max_pairs)
    assert 100 < len(expected) < len(entries)
    assert json.dumps(kept) == json.dumps(expected)  # the order of the dicts and every bit of the floats too


# ---------------------------------------------------------------------------------------------------------
# The whole loop over HTTP


def test_kept_records_equal_the_original_algorithms(endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server = endpoint(canned_in_turn)
    out = tmp_path / "gen"
    args = ["--api_base", server.url, "--model_name", "davinci", "--output_dir", str(out)]
    args += ["--seed_tasks_path", SEED_TASKS, "--num_instructions_to_generate", "100", "--max_requests", "3"]
    args += ["--request_batch_size", "2", "--seed", "0"]
    main(args)

    tasks = seed_tasks()
    header = (SHARED_DATA / "self_instruct_prompt.txt").read_text()
    by_instruction = {re.sub(r"\s+", " ", t["instruction"]).strip().rstrip(":"): t for t in tasks}
    expected: list[dict] = []
    all_instructions = [t["instruction"] for t in tasks]
    for number, body in enumerate(server.bodies, start=1):
        assert body["model"] == "davinci" and body["max_tokens"] == 3072 and body["n"] == 1
        assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["stop"] == ["\n20", "20.", "20."]
        assert len(body["prompt"]) == 2
        for prompt in body["prompt"]:
            examples = [by_instruction[m] for m in re.findall(r"^\d\. Instruction: (.*)$", prompt, re.M)]
            assert prompt == reference_prompt(header, examples) and len(examples) == 3
        choices = json.loads(canned_in_turn(number, body)[1])["choices"]
        reference_dedup([e for c in choices for e in reference_post_process(3, c)], all_instructions, expected)
    assert len(server.bodies) == 3
    assert server.headers[0]["Authorization"] == "Bearer sk-test"

    kept = json.loads((out / "regen.json").read_text())
    assert json.dumps(kept) == json.dumps(expected)
    instructions = [r["instruction"] for r in kept]
    assert "Give three tips for staying healthy while working from home." in instructions
    assert "Name two countries whose flags contain the color green." not in instructions  # misnumbered
    assert "Rank these animals by size.\n1" in instructions  # split at the "5." of "15.", as the original
    assert "Identify the main verb in the following sentence" in instructions
    assert not any("Translate" in i or "Draw" in i or "Écrivez" in i or "Write a program" in i for i in instructions)
    assert len(kept) == 9
    alpaca = json.loads((out / "alpaca_data.json").read_text())
    assert alpaca == [{k: r[k] for k in ("instruction", "input", "output")} for r in kept]
    from data import read_records  # what train.py --data_path reads

    assert len(read_records(str(out / "alpaca_data.json"))) == 9


def alpaca_completion(records: list[dict], prompt: str) -> dict:
    """Five Alpaca records as the model would write them, chosen by the prompt: the same prompt, the same text."""
    start = prompt_hash(prompt) % (len(records) - 5)
    text = "".join(item(4 + i, r["instruction"], r["input"] or "<noinput>", r["output"])
                   for i, r in enumerate(records[start : start + 5]))  # fmt: skip
    return {"text": text, "finish_reason": "stop"}


def prompt_hash(prompt: str) -> int:
    return int(hashlib.sha256(prompt.encode()).hexdigest(), 16)


def by_prompt(complete_prompt, delay=lambda number: 0.0):
    """A respond() whose answer to each prompt is complete_prompt(prompt) -> {text, finish_reason}, in the shape
    of the API the body is for (a chat body's prompt is its user message), with usage counted in words; it
    sleeps delay(request number) first."""

    def respond(number: int, body: dict) -> tuple[int, bytes]:
        time.sleep(delay(number))
        is_chat = "messages" in body
        prompts = [body["messages"][-1]["content"]] if is_chat else body["prompt"]
        answers = [complete_prompt(prompt) for prompt in prompts]
        if is_chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": a["text"]},
                        "finish_reason": a["finish_reason"]} for i, a in enumerate(answers)]  # fmt: skip
        else:
            choices = [{"index": i, **a} for i, a in enumerate(answers)]
        usage = {"prompt_tokens": sum(len(p.split()) for p in prompts),
                 "completion_tokens": sum(len(a["text"].split()) for a in answers)}  # fmt: skip
        return 200, json.dumps({"choices": choices, "usage": usage}).encode()

    return respond


def every_third_slow(number: int) -> float:
    """Request 1, 4, 7, ... is slow, so that the two after it, in flight beside it, answer first."""
    return 0.15 if number % 3 == 1 else 0.01


OUTPUT_FILES = ("regen.json", "regen_progress.json", "alpaca_data.json")


def test_requests_in_flight_give_the_sequential_output_byte_for_byte(endpoint, tmp_path, alpaca_sample):
    records = json.loads(alpaca_sample.read_text())
    server = endpoint(by_prompt(lambda prompt: alpaca_completion(records, prompt), every_third_slow))
    args = ["--api_base", server.url, "--seed_tasks_path", SEED_TASKS, "--num_instructions_to_generate", "80"]
    args += ["--request_batch_size", "2", "--seed", "5"]
    main(args + ["--output_dir", str(tmp_path / "one")])
    assert server.most_in_flight == 1
    sequential_requests = len(server.bodies)

    server.bodies.clear()
    server.answered.clear()
    main(args + ["--output_dir", str(tmp_path / "eight"), "--max_concurrency", "8"])
    assert server.most_in_flight >= 4
    answer_order = sorted(server.answered, key=server.answered.get)
    assert answer_order != sorted(answer_order)  # answers came back out of order
    assert len(server.bodies) >= sequential_requests >= 8  # and some past the end, not taken
    for name in OUTPUT_FILES:
        assert (tmp_path / "eight" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    progress = json.loads((tmp_path / "one" / "regen_progress.json").read_text())
    assert progress["requests"] == sequential_requests and progress["completion_tokens"] > 0
    assert len(json.loads((tmp_path / "one" / "regen.json").read_text())) >= 80


def test_resume_after_a_kill_in_flight_ends_with_the_uninterrupted_files(endpoint, tmp_path, alpaca_sample):
    records = json.loads(alpaca_sample.read_text())
    respond = by_prompt(lambda prompt: alpaca_completion(records, prompt), every_third_slow)
    args = ["--seed_tasks_path", SEED_TASKS, "--num_instructions_to_generate", "80", "--request_batch_size", "2"]
    args += ["--seed", "3", "--max_concurrency", "4"]

    server = endpoint(respond)
    main(args + ["--api_base", server.url, "--output_dir", str(tmp_path / "whole")])
    assert len(server.bodies) >= 10

    server = endpoint(respond, block_at=6)
    killed = tmp_path / "killed"
    command = [sys.executable, os.path.join(ROOT, "self_instruct.py"), *args, "--api_base", server.url]
    process = subprocess.Popen(command + ["--output_dir", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    assert server.in_flight.wait(300)
    time.sleep(0.5)  # the requests beside the blocked one answer, those before it are taken
    process.kill()
    process.wait()
    server.release.set()
    after_kill = json.loads((killed / "regen.json").read_text())
    taken = json.loads((killed / "regen_progress.json").read_text())["requests"]
    final = json.loads((tmp_path / "whole" / "regen.json").read_text())
    assert 0 < len(after_kill) < 80 and after_kill == final[: len(after_kill)]
    assert 2 <= taken < len(server.bodies) - 1  # lost: the blocked request, and those answered after it

    resumed = subprocess.run(command + ["--output_dir", str(killed)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for name in OUTPUT_FILES:
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_chat_sends_each_prompt_as_a_user_message_and_keeps_what_completions_keeps(endpoint, tmp_path, alpaca_sample):
    records = json.loads(alpaca_sample.read_text())

    def complete_prompt(prompt: str) -> dict:  # some answers cut at the length limit: their last item is dropped
        return alpaca_completion(records, prompt) | {"finish_reason": ["stop", "length"][prompt_hash(prompt) % 2]}

    server = endpoint(by_prompt(complete_prompt, lambda number: 0.01 * (number % 4)))
    args = ["--api_base", server.url, "--model_name", "gpt-4o-mini", "--seed_tasks_path", SEED_TASKS]
    args += ["--request_batch_size", "3", "--max_requests", "4", "--seed", "1", "--temperature", "0.7"]
    main(args + ["--output_dir", str(tmp_path / "completions")])
    assert server.paths == ["/v1/completions"] * 4
    prompts = [prompt for body in server.bodies for prompt in body["prompt"]]

    server.bodies.clear()
    server.paths.clear()
    main(args + ["--output_dir", str(tmp_path / "chat"), "--api_type", "chat", "--max_concurrency", "4"])
    assert server.paths == ["/v1/chat/completions"] * 12 and server.most_in_flight >= 2
    assert sorted(body.pop("messages")[0]["content"] for body in server.bodies) == sorted(prompts)
    settings = {"model": "gpt-4o-mini", "max_tokens": 3072, "temperature": 0.7, "top_p": 1.0, "n": 1}
    assert all(body == settings | {"stop": ["\n20", "20.", "20."]} for body in server.bodies)
    assert {complete_prompt(prompt)["finish_reason"] for prompt in prompts} == {"stop", "length"}
    for name in OUTPUT_FILES:
        assert (tmp_path / "chat" / name).read_bytes() == (tmp_path / "completions" / name).read_bytes(), name
    progress = json.loads((tmp_path / "chat" / "regen_progress.json").read_text())
    assert progress["prompt_tokens"] == sum(len(prompt.split()) for prompt in prompts)
    texts = [complete_prompt(prompt)["text"] for prompt in prompts]
    assert progress["completion_tokens"] == sum(len(text.split()) for text in texts)


# ---------------------------------------------------------------------------------------------------------
# Endpoint trouble and bad input: one line, nothing kept lost


def scripted(*responses):
    return lambda number, body: responses[min(number, len(responses)) - 1]


def test_retries_rate_limits_server_errors_and_shrinks_on_a_context_error(endpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(self_instruct, "RETRY_DELAY", 0.01)
    message = "This model's maximum context length is 4097 tokens. Please reduce your prompt; or completion length."
    too_long = json.dumps({"error": {"message": message}}).encode()
    ok = completions([{"text": CANNED[2][0], "finish_reason": "stop"}])
    server = endpoint(scripted((429, b"{}"), (503, b"busy"), (400, too_long), (400, too_long), ok))
    args = ["--api_base", server.url, "--output_dir", str(tmp_path), "--seed_tasks_path", SEED_TASKS]
    main(args + ["--request_batch_size", "1", "--max_requests", "1"])
    assert [b["max_tokens"] for b in server.bodies] == [3072, 3072, 3072, 2457, 1965]
    assert len(json.loads((tmp_path / "regen.json").read_text())) == 4


@pytest.mark.parametrize("form", ["seconds", "date"])
def test_a_429_is_retried_after_its_retry_after(endpoint, tmp_path, alpaca_sample, form):
    records = json.loads(alpaca_sample.read_text())
    answer = by_prompt(lambda prompt: alpaca_completion(records, prompt))
    not_before = []  # the time the 429 asks the client to wait for

    def respond(number: int, body: dict):
        if number > 1:
            return answer(number, body)
        if form == "seconds":
            retry_after, not_before[:] = "1", [time.time() + 1]
        else:  # an HTTP date, to the second: 1 to 2 s ahead
            retry_after = email.utils.formatdate(time.time() + 2, usegmt=True)
            not_before[:] = [email.utils.parsedate_to_datetime(retry_after).timestamp()]
        return 429, b'{"error": {"message": "Rate limit reached"}}', {"Retry-After": retry_after}

    server = endpoint(respond)
    args = ["--api_base", server.url, "--output_dir", str(tmp_path), "--seed_tasks_path", SEED_TASKS, "--seed", "0"]
    main(args + ["--request_batch_size", "1", "--max_requests", "3", "--max_concurrency", "2"])
    (retry,) = [n for n in range(2, len(server.bodies) + 1) if server.bodies[n - 1] == server.bodies[0]]
    assert server.arrived[retry - 1] >= not_before[0] and server.statuses[retry] == 200
    assert json.loads((tmp_path / "regen_progress.json").read_text())["requests"] == 3


def test_throttle_halves_once_per_burst_of_429s_and_grows_back_by_one():
    throttle = Throttle(8)
    with contextlib.ExitStack() as stack:
        cuts = [stack.enter_context(throttle.turn((0, i))) for i in range(8)]
        assert throttle.in_flight == 8
        for sent_with in cuts[:6]:  # the 429s of one burst: one cut
            throttle.rate_limited(sent_with, 0.0)
        assert throttle.limit == 4
    with throttle.turn((1, 0)) as sent_with:
        pass
    throttle.rate_limited(sent_with, 0.0)  # sent after the cut: cuts again
    assert throttle.limit == 2
    for limit in (3, 4, 5, 6, 7, 8):
        for _ in range(limit - 1):
            throttle.succeeded()
        assert throttle.limit == limit  # `limit - 1` answers in a row at limit - 1 add one
    for _ in range(20):
        throttle.succeeded()
    assert throttle.limit == 8


def test_throttle_lets_the_lowest_turn_go_first_pauses_all_and_cancels_on_close():
    throttle = Throttle(1)
    order = []

    def wait_for_turn(key):
        try:
            with throttle.turn(key):
                order.append(key)
        except self_instruct.Cancelled:
            order.append("cancelled")

    with throttle.turn((0, 0)) as sent_with:
        threads = [threading.Thread(target=wait_for_turn, args=(key,)) for key in [(3, 0), (1, 1), (2, 0), (1, 0)]]
        for thread in threads:
            thread.start()
        while len(throttle.waiting) < 4:
            time.sleep(0.01)
        throttle.rate_limited(sent_with, 0.3)
        paused_at = time.monotonic()
    for thread in threads:
        thread.join()
    assert time.monotonic() - paused_at >= 0.3
    assert order == [(1, 0), (1, 1), (2, 0), (3, 0)]
    throttle.close()
    wait_for_turn((4, 0))
    assert order[-1] == "cancelled"


def test_repeated_429s_lower_the_requests_in_flight(endpoint, tmp_path, alpaca_sample):
    """An endpoint that takes 2 requests at a time and answers 429 (Retry-After: 0) to a third. 8 in flight, even
    pausing as asked, would hammer it until a request gives up after 8 tries; the throttle settles near 2, and
    every request is answered."""
    records = json.loads(alpaca_sample.read_text())
    answer = by_prompt(lambda prompt: alpaca_completion(records, prompt))
    busy = threading.Semaphore(2)

    def respond(number: int, body: dict):
        if not busy.acquire(blocking=False):
            return 429, b'{"error": {"message": "Rate limit reached"}}', {"Retry-After": "0"}
        try:
            time.sleep(0.05)
            return answer(number, body)
        finally:
            busy.release()

    server = endpoint(respond)
    args = ["--api_base", server.url, "--output_dir", str(tmp_path), "--seed_tasks_path", SEED_TASKS, "--seed", "0"]
    args += ["--request_batch_size", "1", "--num_instructions_to_generate", "1000", "--max_requests", "24"]
    main(args + ["--max_concurrency", "8"])
    assert json.loads((tmp_path / "regen_progress.json").read_text())["requests"] == 24
    assert sum(status == 429 for status in server.statuses.values()) < 24  # 10 to 14 seen


@pytest.mark.parametrize(
    "response, message",
    [
        ((401, b'{"error": {"message": "Incorrect API key provided"}}'), "HTTP 401: Incorrect API key provided"),
        ((200, b"<html>hello</html>"), "the response is not JSON"),
        ((200, b'{"data": []}'), "expected 'choices'"),
        ((200, b'{"choices": [{"text": 3}]}'), "expected 'choices'"),
    ],
)
def test_endpoint_errors_end_in_one_line_and_keep_what_was_kept(endpoint, tmp_path, response, message):
    first = completions([{"text": CANNED[2][0], "finish_reason": "stop"}])
    server = endpoint(scripted(first, response))
    args = ["--api_base", server.url, "--output_dir", str(tmp_path), "--seed_tasks_path", SEED_TASKS]
    error = run_main(args + ["--request_batch_size", "1"])
    assert isinstance(error, str) and error.startswith("error: ") and message in error and "\n" not in error
    assert len(json.loads((tmp_path / "regen.json").read_text())) == 4  # the first request's


def test_wrong_route_unreachable_host_and_timeouts(endpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(self_instruct, "RETRY_DELAY", 0.01)
    args = ["--output_dir", str(tmp_path), "--seed_tasks_path", SEED_TASKS, "--request_batch_size", "1"]
    server = endpoint(scripted(completions([])))
    assert "HTTP 404: no such route" in run_main(args + ["--api_base", server.url + "/v2"])

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert "cannot reach the endpoint" in run_main(args + ["--api_base", f"http://127.0.0.1:{port}/v1"])

    monkeypatch.setattr(self_instruct, "REQUEST_TIMEOUT", 0.2)
    monkeypatch.setattr(self_instruct, "MAX_TRIES", 2)
    slow = endpoint(lambda number, body: (time.sleep(1), completions([]))[1])
    assert "gave up after 2 tries (last: no answer: timed out)" in run_main(args + ["--api_base", slow.url])


def test_bad_input_ends_in_one_line(tmp_path, endpoint):
    server = endpoint(canned_in_turn)
    base = ["--api_base", server.url, "--request_batch_size", "1"]
    lines = (SHARED_DATA / "seed_tasks.jsonl").read_text().splitlines()
    cases = {
        "not_jsonl": ("\n".join(lines[:2] + ["{'instruction': 'x'}"]), "line 3: invalid JSON"),
        "no_instances": ("\n".join(lines[:1] + [json.dumps({"instruction": "x", "id": 1})]), "line 2: expected a task"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        error = run_main(base + ["--seed_tasks_path", str(tmp_path / name), "--output_dir", str(tmp_path / "o")])
        assert f"{tmp_path / name}: {message}" in error
    (tmp_path / "a_file").write_text("")
    error = run_main(base + ["--seed_tasks_path", SEED_TASKS, "--output_dir", str(tmp_path / "a_file" / "out")])
    assert error.startswith("error: ") and "a_file" in error

    out = tmp_path / "gen"
    out.mkdir()
    for text, message in [("[{", "invalid JSON"), ('[{"instruction": "x", "input": ""}]', "record 0: expected")]:
        (out / "regen.json").write_text(text)
        error = run_main(base + ["--seed_tasks_path", SEED_TASKS, "--output_dir", str(out)])
        assert f"regen.json: {message}" in error and "\n" not in error
        assert (out / "regen.json").read_text() == text
    assert len(server.bodies) == 0
    assert "give one backend" in run_main(["--output_dir", str(out)])
    assert "--max_concurrency must be >= 1, got 0" in run_main(base + ["--max_concurrency", "0"])
    assert "invalid choice: 'edits'" in run_main(base + ["--api_type", "edits"])
    local = ["--model_path", str(tmp_path), "--api_type", "chat"]
    assert "--api_type is for --api_base" in run_main(local)


# ---------------------------------------------------------------------------------------------------------
# Our own checkpoint as the backend: the sample model


@pytest.fixture(scope="module")
def sample_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("sample")
    subprocess.run([sys.executable, os.path.join(ROOT, "sample_data.py"), "--out", str(out)], check=True,
                   capture_output=True)  # fmt: skip
    return str(out / "model")


def with_context(model_dir: str, path, context: int) -> str:
    """A copy of the model whose config allows `context` positions (RoPE has no table of positions to grow)."""
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = context
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_the_sample_models_context_is_too_short_for_the_prompt(sample_model, tmp_path):
    args = ["--model_path", sample_model, "--output_dir", str(tmp_path), "--seed_tasks_path", SEED_TASKS]
    error = run_main(args + ["--request_batch_size", "1", "--seed", "0"])
    assert "tokens long, but the model's context is 256" in error and "\n" not in error


def test_the_sample_model_runs_the_loop_end_to_end(sample_model, tmp_path, capsys):
    model = with_context(sample_model, tmp_path / "model", 1400)
    # The 6 shortest seed tasks: the prompts (at most 1,286 of the sample's tokens) leave room for 114 or more.
    lines = sorted((SHARED_DATA / "seed_tasks.jsonl").read_text().splitlines(), key=len)[:6]
    seeds = str(tmp_path / "seeds.jsonl")
    (tmp_path / "seeds.jsonl").write_text("\n".join(lines))
    args = ["--model_path", model, "--output_dir", str(tmp_path / "gen"), "--seed_tasks_path", seeds]
    main(args + ["--request_batch_size", "2", "--max_requests", "1", "--seed", "0"])
    report = capsys.readouterr().out
    assert re.search(r"kept \d+ of \d+ instructions parsed from 1 requests", report), report
    assert json.loads((tmp_path / "gen" / "regen_progress.json").read_text())["requests"] == 1
    assert isinstance(json.loads((tmp_path / "gen" / "alpaca_data.json").read_text()), list)


def test_local_completions_end_at_the_first_stop_string_or_the_context(sample_model, tmp_path):
    path = with_context(sample_model, tmp_path / "model", 64)
    model_args = argparse.Namespace(
        model_path=path, base_model=None, tokenizer=None, device=None, dtype=None, quantize=None, compile=False
    )
    _, tokenizer = load_tokenizer(model_args)
    model, _ = load_for_decoding(model_args)
    alone_model, _ = load_for_decoding(model_args)  # the engine owns its model's KV cache
    engine = Engine(model, tokenizer.eos_id, max_batch_size=2)
    engine.start()
    prompts = ["###\n1. Instruction: What is the largest of 3, 5?", "Count the numbers in 1, 8, 8."]
    steps = []
    model.register_forward_hook(lambda module, args, logits: steps.append(1))
    try:
        for prompt in prompts:
            (choice,), usage = complete_locally(engine, tokenizer, [prompt], 0.0, 1.0, None, stop=[])
            prompt_ids = tokenizer.encode(prompt, bos=True)
            (answer,) = generate_ids(alone_model, [prompt_ids], 3072, tokenizer.eos_id)  # greedy, alone
            assert usage == {"prompt_tokens": len(prompt_ids), "completion_tokens": len(answer)}
            assert choice["text"] == tokenizer.decode(answer)
            assert choice["finish_reason"] == ("length" if len(prompt_ids) + len(answer) == 64 else "stop")
            text = choice["text"]
            assert len(text) > 6
            stop = text[len(text) // 2 : len(text) // 2 + 2]
            steps.clear()
            (cut,), _ = complete_locally(engine, tokenizer, [prompt], 0.0, 1.0, None, stop=["\x00", stop])
            assert cut == {"text": text[: text.find(stop)], "finish_reason": "stop"}
            assert len(steps) < len(answer) - 1  # the answer stopped there, not only its text

        # Sampled calls from two threads at once, decoded side by side, answer as the same calls one at a time.
        one_at_a_time = [complete_locally(engine, tokenizer, prompts, 1.0, 0.9, seed, []) for seed in (1, 2)]
        with ThreadPoolExecutor(2) as pool:
            together = list(pool.map(lambda seed: complete_locally(engine, tokenizer, prompts, 1.0, 0.9, seed, []),
                                     (1, 2)))  # fmt: skip
        assert together == one_at_a_time and one_at_a_time[0] != one_at_a_time[1]
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------------------------
# The whole loop on one machine: serve.py over a local model, self_instruct.py against it


@pytest.fixture
def served(tmp_path, tokenizer_model, monkeypatch):
    """serve.py in this process over a tiny random LLaMA whose 704 positions hold a self-instruct prompt with
    the shortest seed tasks (up to about 670 tokens), recording the prompts it is sent, the most HTTP requests
    in flight at once, and the rows of each decoding step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32000, max_position_embeddings=704,
    )  # fmt: skip
    model = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model)
    shutil.copyfile(tokenizer_model, model / "tokenizer.model")

    record = argparse.Namespace(prompts=[], batch_rows=[], in_flight=0, most_in_flight=0)
    lock = threading.Lock()
    make_jobs, do_post = serve.make_jobs, serve.Handler.do_POST

    def recording_make_jobs(body, prompts, *args):
        record.prompts += prompts
        return make_jobs(body, prompts, *args)

    def counting_do_post(handler):
        with lock:
            record.in_flight += 1
            record.most_in_flight = max(record.most_in_flight, record.in_flight)
        try:
            do_post(handler)
        finally:
            with lock:
                record.in_flight -= 1

    monkeypatch.setattr(serve, "make_jobs", recording_make_jobs)
    monkeypatch.setattr(serve.Handler, "do_POST", counting_do_post)
    server = serve.build_server(serve.parse_args(["--model_path", str(model), "--port", "0"]))
    engine, decode = server.engine, server.engine.decode

    def recording_decode():
        record.batch_rows.append(len(engine.decoding))
        decode()

    monkeypatch.setattr(engine, "decode", recording_decode)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    record.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    record.tokenizer = server.tokenizer
    yield record
    server.shutdown()
    server.server_close()


def test_the_alpaca_data_loop_on_one_machine(served, tmp_path):
    lines = sorted((SHARED_DATA / "seed_tasks.jsonl").read_text().splitlines(), key=len)[:20]
    (tmp_path / "seeds.jsonl").write_text("\n".join(lines))
    args = ["--api_base", served.url, "--model_name", "model", "--seed_tasks_path", str(tmp_path / "seeds.jsonl")]
    args += ["--request_batch_size", "2", "--seed", "0"]

    main(args + ["--output_dir", str(tmp_path / "gen"), "--max_requests", "4", "--max_concurrency", "3"])
    assert served.most_in_flight >= 2 and max(served.batch_rows) > 2  # requests decoded together
    for name in OUTPUT_FILES:
        json.loads((tmp_path / "gen" / name).read_text())
    progress = json.loads((tmp_path / "gen" / "regen_progress.json").read_text())
    assert len(served.prompts) == 8 and progress["requests"] == 4
    assert progress["prompt_tokens"] == sum(len(served.tokenizer.encode(p, bos=True)) for p in served.prompts)
    assert 0 < progress["completion_tokens"] <= 8 * (704 - 500)

    # Chat: serve.py puts each prompt, as an instruction, in the Alpaca template.
    served.prompts.clear()
    main(args + ["--output_dir", str(tmp_path / "chat"), "--max_requests", "1", "--api_type", "chat"])
    progress = json.loads((tmp_path / "chat" / "regen_progress.json").read_text())
    assert len(served.prompts) == 2 and all(p.startswith("Below is an instruction") for p in served.prompts)
    assert progress["prompt_tokens"] == sum(len(served.tokenizer.encode(p, bos=True)) for p in served.prompts)
    assert progress["requests"] == 1 and progress["completion_tokens"] > 0
