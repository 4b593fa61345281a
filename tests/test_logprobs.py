"""serve.py's logprobs against transformers' log_softmax on the same fp32 weights, through the official openai
client: chat (logprobs, top_logprobs), completions (logprobs, echo, max_tokens 0, token-id prompts), streamed
chunks, stop strings, bad requests; and EleutherAI's lm-evaluation-harness scoring a multiple-choice task through
serve.py (`local-completions`) as its own `hf` backend scores it."""

import http.client
import json
import threading

import openai
import pytest
import torch
from transformers import LlamaForCausalLM

import serve
from data import format_prompt
from engine import Engine
from loading import load_for_decoding
from tokenizer import Tokenizer

TOL = 1e-4
PROMPTS = ["Once upon a time", "The capital of France is", "Hi"]


@pytest.fixture(scope="module")
def server(model_dir):
    """serve.py in this process, on a free loopback port, as its main() starts it."""
    server = serve.build_server(serve.parse_args(["--model_path", str(model_dir), "--port", "0"]))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def url(server):
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(str(model_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def reference(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def log_softmax(reference, ids: list[int]) -> torch.Tensor:
    """transformers' log_softmax over the vocabulary at every position of ids (len(ids), vocab), in fp32."""
    return reference(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)


@torch.inference_mode()
def greedy(reference, ids: list[int], n: int) -> list[int]:
    if n == 0:
        return []
    out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def spelled(tokenizer: Tokenizer, context: list[int], token: int) -> str:
    """What token adds to SentencePiece's decoding of context; a lone byte of a byte-fallback piece as OpenAI
    shows one ("\\xe2"); the piece's name for BOS and EOS."""
    if tokenizer.sp.IsByte(token):
        return "\\x" + tokenizer.sp.IdToPiece(token)[3:-1].lower()
    if tokenizer.sp.IsControl(token):
        return tokenizer.sp.IdToPiece(token)
    before = tokenizer.sp.Decode(context)
    after = tokenizer.sp.Decode(context + [token])
    assert after.startswith(before)
    return after[len(before) :]


def expected_top(tokenizer, row: torch.Tensor, k: int, context: list[int]) -> list[tuple[str, float]]:
    top = row.topk(k)
    return [(spelled(tokenizer, context, t), v) for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)]


def assert_close(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected)
    assert max((abs(a - b) for a, b in zip(got, expected, strict=True)), default=0) < TOL, (got, expected)


def chat(client, instruction, **settings):
    settings = {"max_tokens": 12, "temperature": 0} | settings
    messages = [{"role": "user", "content": instruction}]
    return client.chat.completions.create(model="any", messages=messages, **settings)


def complete(client, prompt, **settings):
    settings = {"max_tokens": 6, "temperature": 0} | settings
    return client.completions.create(model="any", prompt=prompt, **settings)


# ---------------------------------------------------------------------------------------------------------
# Chat


def test_chat_logprobs_equal_transformers(client, tokenizer, reference):
    instruction = "Give three tips for staying healthy."
    choice = chat(client, instruction, logprobs=True, top_logprobs=5).choices[0]
    prompt = tokenizer.encode(format_prompt(instruction), bos=True)
    answer = greedy(reference, prompt, 12)
    rows = log_softmax(reference, prompt + answer)[len(prompt) - 1 :]
    content = choice.logprobs.content
    assert len(content) == 12 and choice.finish_reason == "length"
    for step, (entry, token) in enumerate(zip(content, answer, strict=True)):
        context = answer[:step]  # an answer is decoded on its own, as its text is
        assert entry.token == spelled(tokenizer, context, token)
        assert entry.bytes == list(entry.token.encode())
        assert_close([entry.logprob], [rows[step, token].item()])
        top = expected_top(tokenizer, rows[step], 5, context)
        assert [t.token for t in entry.top_logprobs] == [text for text, _ in top]
        assert_close([t.logprob for t in entry.top_logprobs], [value for _, value in top])
    assert "".join(entry.token for entry in content) == choice.message.content == tokenizer.decode(answer)


def test_chat_logprobs_are_before_temperature(client, tokenizer, reference):
    """The judge's request (max_tokens 1, top_logprobs 5 of 20 here), sampled hot: the top tokens' logprobs are
    the model's own, not those of the distribution it drew from."""
    instruction = "Which output is better, m or M?"
    choice = chat(client, instruction, max_tokens=1, temperature=1.9, seed=3, logprobs=True, top_logprobs=20).choices[0]
    prompt = tokenizer.encode(format_prompt(instruction), bos=True)
    top = expected_top(tokenizer, log_softmax(reference, prompt)[-1], 20, [])
    (entry,) = choice.logprobs.content
    assert [t.token for t in entry.top_logprobs] == [text for text, _ in top]
    assert_close([t.logprob for t in entry.top_logprobs], [value for _, value in top])
    assert bytes(entry.bytes).decode(errors="replace") == choice.message.content  # a lone byte shows as U+FFFD
    # Without top_logprobs, each token still comes with its own logprob and an empty list.
    plain = chat(client, instruction, logprobs=True).choices[0]
    assert all(entry.top_logprobs == [] for entry in plain.logprobs.content)
    assert chat(client, instruction).choices[0].logprobs is None


def test_chat_stream_chunks_carry_their_tokens(client):
    expected = chat(client, PROMPTS[0], max_tokens=16, logprobs=True, top_logprobs=3).choices[0]
    chunks = list(chat(client, PROMPTS[0], max_tokens=16, logprobs=True, top_logprobs=3, stream=True))
    content = [entry for chunk in chunks if chunk.choices[0].logprobs for entry in chunk.choices[0].logprobs.content]
    assert content == expected.logprobs.content
    for chunk in chunks[1:]:  # after the role's chunk: each text chunk is the text of its tokens
        choice = chunk.choices[0]
        tokens = choice.logprobs.content if choice.logprobs else []
        assert (choice.delta.content or "") == "".join(entry.token for entry in tokens)


# ---------------------------------------------------------------------------------------------------------
# Completions


def check_legacy_logprobs(tokenizer, reference, logprobs, prompt_ids: list[int], answer: list[int], k: int, text: str):
    """Echoed completions: the prompt's tokens as the model saw them (the first unscored), then the answer's, in
    the legacy shape, against transformers; text_offset against SentencePiece's decoding of what comes before."""
    ids = prompt_ids + answer
    rows = log_softmax(reference, ids)
    n = len(prompt_ids)
    contexts = [prompt_ids[:j] for j in range(n)] + [answer[:s] for s in range(len(answer))]
    assert logprobs.tokens == [spelled(tokenizer, context, t) for context, t in zip(contexts, ids, strict=True)]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert_close(logprobs.token_logprobs[1:], [rows[j - 1, ids[j]].item() for j in range(1, len(ids))])
    for j in range(1, len(ids)):
        chosen = {logprobs.tokens[j]: rows[j - 1, ids[j]].item()}
        expected = dict(expected_top(tokenizer, rows[j - 1], k, contexts[j])) | chosen
        assert logprobs.top_logprobs[j].keys() == expected.keys()
        assert_close(list(logprobs.top_logprobs[j].values()), list(expected.values()))
    prompt_text = tokenizer.sp.Decode(prompt_ids)
    offsets = [len(tokenizer.sp.Decode(context)) for context in contexts[:n]]
    offsets += [len(prompt_text) + len(tokenizer.sp.Decode(context)) for context in contexts[n:]]
    assert logprobs.text_offset == offsets
    assert text == prompt_text + tokenizer.decode(answer)


def test_echo_logprobs_equal_transformers(client, tokenizer, reference):
    """Three prompts in one request, decoded as one left-padded batch: each prompt's tokens, BOS first, and then
    six new ones."""
    response = complete(client, PROMPTS, echo=True, logprobs=5)
    for prompt, choice in zip(PROMPTS, response.choices, strict=True):
        prompt_ids = tokenizer.encode(prompt, bos=True)
        answer = greedy(reference, prompt_ids, 6)
        assert choice.logprobs.tokens[0] == "<s>" and choice.text.startswith(prompt)
        check_legacy_logprobs(tokenizer, reference, choice.logprobs, prompt_ids, answer, 5, choice.text)
    # Without echo, only the answer's tokens, their offsets in the answer's text.
    response = complete(client, PROMPTS[1], logprobs=2)
    prompt_ids = tokenizer.encode(PROMPTS[1], bos=True)
    answer = greedy(reference, prompt_ids, 6)
    rows = log_softmax(reference, prompt_ids + answer)[len(prompt_ids) - 1 :]
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == [spelled(tokenizer, answer[:s], t) for s, t in enumerate(answer)]
    assert_close(logprobs.token_logprobs, [rows[s, t].item() for s, t in enumerate(answer)])
    assert logprobs.text_offset == [len(tokenizer.decode(answer[:s])) for s in range(len(answer))]
    assert complete(client, PROMPTS[1]).choices[0].logprobs is None


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, tokenizer, reference):
    response = complete(client, PROMPTS, echo=True, logprobs=1, max_tokens=0)
    for prompt, choice in zip(PROMPTS, response.choices, strict=True):
        assert choice.text == prompt and choice.finish_reason == "length"
        check_legacy_logprobs(tokenizer, reference, choice.logprobs, tokenizer.encode(prompt, bos=True), [], 1, prompt)
    assert response.usage.completion_tokens == 0
    # echo without logprobs: the prompt's text alone
    choice = complete(client, PROMPTS[0], echo=True, max_tokens=0).choices[0]
    assert choice.text == PROMPTS[0] and choice.logprobs is None


def test_byte_pieces_show_their_own_byte(client, tokenizer, reference):
    """An emoji that SentencePiece spells in four byte-fallback pieces: each token shows its byte, escaped as
    OpenAI shows a partial character, with that one byte in `bytes`; all four start where the emoji does."""
    prompt = "Smile \N{GRINNING FACE} now"
    ids = tokenizer.encode(prompt, bos=True)
    choice = complete(client, prompt, echo=True, logprobs=1, max_tokens=0).choices[0]
    logprobs = choice.logprobs
    assert logprobs.tokens == ["<s>", "Sm", "ile", " ", "\\xf0", "\\x9f", "\\x98", "\\x80", " now"]
    assert logprobs.text_offset == [0, 0, 2, 5, 6, 6, 6, 6, 7] and choice.text == prompt
    rows = log_softmax(reference, ids)
    assert_close(logprobs.token_logprobs[1:], [rows[j - 1, ids[j]].item() for j in range(1, len(ids))])
    # The chat shape's bytes hold the piece's one byte.
    assert serve.token_string(tokenizer, ids[4], at_start=False) == ("\\xf0", [0xF0])


def test_token_id_prompts_are_taken_as_they_are(client, tokenizer, reference):
    """As lm-evaluation-harness sends them: no BOS added, a list of ints or a list of lists of different lengths."""
    id_prompts = [tokenizer.encode(text) for text in PROMPTS] + [[1, 450, 7483]]
    for max_tokens in (0, 1):
        response = complete(client, id_prompts, echo=True, logprobs=1, max_tokens=max_tokens)
        for ids, choice in zip(id_prompts, response.choices, strict=True):
            answer = greedy(reference, ids, max_tokens)
            check_legacy_logprobs(tokenizer, reference, choice.logprobs, ids, answer, 1, choice.text)
        assert response.usage.prompt_tokens == sum(len(ids) for ids in id_prompts)
    (choice,) = complete(client, id_prompts[1], echo=True, logprobs=1, max_tokens=0).choices
    check_legacy_logprobs(tokenizer, reference, choice.logprobs, id_prompts[1], [], 1, choice.text)


def test_streamed_completion_logprobs_equal_non_streamed(client):
    expected = complete(client, PROMPTS[0], echo=True, logprobs=3, max_tokens=12).choices[0]
    chunks = list(complete(client, PROMPTS[0], echo=True, logprobs=3, max_tokens=12, stream=True))
    assert chunks[0].choices[0].text == PROMPTS[0]  # the echoed prompt comes first, with its tokens
    assert len(chunks[0].choices[0].logprobs.tokens) == len(expected.logprobs.tokens) - 12
    merged = {name: [] for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for chunk in chunks:
        if chunk.choices[0].logprobs is not None:
            for name, values in merged.items():
                values += getattr(chunk.choices[0].logprobs, name)
    assert merged == expected.logprobs.model_dump()
    assert "".join(chunk.choices[0].text for chunk in chunks) == expected.text


def test_a_stop_string_cuts_the_tokens_with_the_text(client):
    full = complete(client, PROMPTS[0], max_tokens=24, logprobs=0).choices[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    for stream in (False, True):
        response = complete(client, PROMPTS[0], max_tokens=24, logprobs=0, stop=stop, stream=stream)
        choices = [chunk.choices[0] for chunk in response] if stream else response.choices
        text = "".join(choice.text for choice in choices)
        tokens = [token for choice in choices if choice.logprobs for token in choice.logprobs.tokens]
        assert text == full.text[: full.text.index(stop)]
        kept = sum(offset < len(text) for offset in full.logprobs.text_offset)
        assert tokens == full.logprobs.tokens[:kept]
        assert all(top == {token: logprob} for top, token, logprob in zip(
            full.logprobs.top_logprobs, full.logprobs.tokens, full.logprobs.token_logprobs, strict=True))  # fmt: skip


def test_a_batch_mixing_scoring_and_generating_answers_as_alone(server, client, model_dir):
    """Jobs of max_tokens 0 (echo) decoded in one batch with jobs that generate, as concurrent requests of
    lm-evaluation-harness and others meet in a batch: each answers as the same request alone."""
    bodies = [
        {"prompt": PROMPTS, "echo": True, "logprobs": 2, "max_tokens": 0},
        {"prompt": PROMPTS[1], "logprobs": 3, "max_tokens": 9, "temperature": 0},
        {"prompt": [[450, 7483], [1, 15043]], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0},
    ]
    jobs = [serve.make_jobs(body, serve.completion_prompts(body, server.vocab_size), False, server) for body in bodies]
    model, _ = load_for_decoding(serve.parse_args(["--model_path", str(model_dir)]))
    batch = [job for request in jobs for job in request]
    engine = Engine(model, server.tokenizer.eos_id, max_batch_size=len(batch))
    engine.submit([job.request for job in batch])
    engine.run_until_done()
    for body, request in zip(bodies, jobs, strict=True):
        events = request[0].events
        texts, tokens = [""] * len(request), [[] for _ in request]
        while not events.empty():
            kind, index, *payload = events.get()
            if kind == "text":
                texts[index] += payload[0]
                tokens[index] += payload[1]
        alone = complete(client, **body).choices
        assert texts == [choice.text for choice in alone]
        for choice_tokens, choice in zip(tokens, alone, strict=True):
            assert_same_legacy(serve.completion_logprobs(choice_tokens), choice.logprobs.model_dump())


def assert_same_legacy(a: dict, b: dict) -> None:
    """The same legacy logprobs, the values within TOL (a batch's other rows change their float rounding)."""
    assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
    assert_close(a["token_logprobs"][1:], b["token_logprobs"][1:])
    for top_a, top_b in zip(a["top_logprobs"][1:], b["top_logprobs"][1:], strict=True):
        assert top_a.keys() == top_b.keys()
        assert_close(list(top_a.values()), list(top_b.values()))


# ---------------------------------------------------------------------------------------------------------
# Bad requests

BAD_REQUESTS = [
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "'top_logprobs' must be an integer in [0, 20]"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "'top_logprobs' must be an integer in [0, 20]"),
    ("/v1/chat/completions", {"top_logprobs": 5}, "'top_logprobs' needs 'logprobs': true"),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "'top_logprobs' needs 'logprobs': true"),
    ("/v1/chat/completions", {"logprobs": 5}, "'logprobs' must be true or false"),
    ("/v1/chat/completions", {"echo": True}, "'echo' is not supported in chat"),
    ("/v1/completions", {"logprobs": 6}, "'logprobs' must be an integer in [0, 5], got 6"),
    ("/v1/completions", {"logprobs": True}, "'logprobs' must be an integer in [0, 5]"),
    ("/v1/completions", {"top_logprobs": 2}, "'top_logprobs' is not supported"),
    ("/v1/completions", {"echo": "yes"}, "'echo' must be true or false"),
    ("/v1/completions", {"max_tokens": 0}, "'max_tokens' must be an integer >= 1, got 0"),
    ("/v1/completions", {"max_tokens": -1, "echo": True}, "'max_tokens' must be an integer >= 0, got -1"),
    ("/v1/completions", {"prompt": [1, 32000]}, "'prompt'[0]: token id 32000 is not in the vocabulary [0, 32000)"),
    ("/v1/completions", {"prompt": [[1, 2], [-1]]}, "'prompt'[1]: token id -1 is not in the vocabulary"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": [1, "a"]}, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": [1, True]}, "'prompt' must be a string"),
    ("/v1/completions", {"prompt": [[1, 2.5]]}, "'prompt' must be a string"),
]


@pytest.mark.parametrize("path, fields, message", BAD_REQUESTS)
def test_bad_logprob_requests_get_400_in_openais_shape(url, client, path, fields, message):
    good = {"messages": [{"role": "user", "content": "Hi"}]} if "chat" in path else {"prompt": "Hi"}
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    body = json.dumps(good | {"max_tokens": 2} | fields)
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 400
    assert answer["error"]["type"] == "invalid_request_error" and message in answer["error"]["message"]
    assert complete(client, "Hi", max_tokens=2).usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------------------------
# lm-evaluation-harness

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which planet is closest to the sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("What colour is the sky on a clear day?", ["green", "red", "yellow", "blue"], 3),
    ("What is two plus two?", ["four", "five", "three", "twenty-two"], 0),
    ("Which animal says moo?", ["a dog", "a cow", "a cat", "a duck"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wax paper"], 2),
    ("Which is the largest ocean?", ["the Atlantic", "the Indian", "the Arctic", "the Pacific"], 3),
    ("What freezes at zero degrees Celsius?", ["water", "iron", "air", "olive oil"], 0),
    ("Who wrote Hamlet?", ["Charles Dickens", "William Shakespeare", "Jane Austen", "Mark Twain"], 1),
]


def write_task(directory) -> None:
    """A multiple-choice task as lm-eval's YAML configs define one, on a local JSON Lines file."""
    with open(directory / "questions.jsonl", "w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {directory / 'questions.jsonl'}}}, cache_dir: {directory / 'cache'}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list: [{metric: acc}]\n"
    )


def test_lm_eval_through_serve_scores_as_its_hf_backend(url, model_dir, tmp_path, monkeypatch):
    """lm-eval's local-completions (token-id prompts, echo, logprobs 1, four prompts a request) against serve.py,
    and lm-eval's own transformers backend on the same directory: the same log-likelihood for every choice of
    every question, the same greedy flags, the same accuracy."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when the hub and datasets libraries are first imported
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    write_task(tmp_path)
    settings = dict(tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    served_args = {
        "model": model_dir.name,
        "base_url": f"{url}/v1/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(model_dir),
        "max_length": 128,
    }
    served = simple_evaluate(model="local-completions", model_args=served_args, batch_size=4, **settings)
    own = simple_evaluate(
        model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, device="cpu", **settings
    )
    served_samples, own_samples = served["samples"]["tiny_mc"], own["samples"]["tiny_mc"]
    assert len(served_samples) == len(own_samples) == len(QUESTIONS)
    for a, b in zip(
        sorted(served_samples, key=lambda s: s["doc_id"]), sorted(own_samples, key=lambda s: s["doc_id"]), strict=True
    ):
        assert_close([float(ll) for ll, _ in a["filtered_resps"]], [float(ll) for ll, _ in b["filtered_resps"]])
        assert [greedy for _, greedy in a["filtered_resps"]] == [greedy for _, greedy in b["filtered_resps"]]
        assert a["acc"] == b["acc"]
    assert served["results"]["tiny_mc"]["acc,none"] == own["results"]["tiny_mc"]["acc,none"]
