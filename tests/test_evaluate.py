"""evaluate.py against the alpaca_eval package itself (0.6.6), both judging through the same local deterministic
judge with a position bias: the same requests, the same preference per instruction, the same leaderboard."""

import csv
import http.client
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SHARED_DATA
from judge_server import UNPARSEABLE, JudgeServer

import evaluate

EVALUATE = str(ROOT / "evaluate.py")
CONFIGS = list(evaluate.ANNOTATORS_BINARIZE)

ALPACA_EVAL = """
import sys
import threading
import alpaca_eval.main
model_outputs, reference_outputs, output_path = sys.argv[1:4]
for config in sys.argv[4:]:
    alpaca_eval.main.evaluate(
        model_outputs=model_outputs, reference_outputs=reference_outputs, annotators_config=config,
        output_path=output_path, precomputed_leaderboard=None, fn_metric="get_winrate", sort_by="win_rate",
        is_return_instead_of_print=True, caching_path=None,
    )
"""


def model_answers() -> list[dict]:
    """A made-up model's answers to the 252: text-davinci-003's own on every fifth (identical: 1.5 without a call),
    a judge-confusing one on every 40th, the reference reversed or cut on the rest."""
    answers = []
    for i, ref in enumerate(evaluate.davinci_outputs()):
        output = ref["output"]
        if i % 40 == 7:
            output = UNPARSEABLE + " " + output
        elif i % 5:
            output = output[::-1] if i % 2 else output[: len(output) // 2]
        answers.append({"instruction": ref["instruction"], "output": output, "generator": "made-up", "dataset": "x"})
    return answers


N_DIFFERENT = sum(m["output"] != r["output"] for m, r in zip(model_answers(), evaluate.davinci_outputs(), strict=True))
N_UNPARSEABLE = sum(UNPARSEABLE in m["output"] for m in model_answers())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("outputs")
    model, reference = folder / "model_outputs.json", folder / "reference_outputs.json"
    model.write_text(json.dumps(model_answers()))
    reference.write_text(json.dumps(evaluate.davinci_outputs()))
    return str(model), str(reference)


@pytest.fixture(scope="module")
def alpaca_eval_run(outputs, tmp_path_factory) -> tuple[str, list[dict]]:
    """alpaca_eval's files for both configs, and the requests it sent."""
    judge = JudgeServer()
    out = tmp_path_factory.mktemp("alpaca_eval")
    env = os.environ | {"OPENAI_API_BASE": judge.url, "OPENAI_API_KEY": "test", "OPENAI_CLIENT_CONFIG_PATH": "none"}
    result = subprocess.run(
        [sys.executable, "-c", ALPACA_EVAL, *outputs, str(out), *CONFIGS], env=env, capture_output=True, text=True
    )
    judge.close()
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out), judge.requests


def run_ours(args: list[str], judge: JudgeServer) -> None:
    evaluate.main([*args, "--api_base", judge.url])


def read_leaderboard(path: str) -> dict:
    with open(path, newline="") as f:
        return {row[""]: row for row in csv.DictReader(f)}


@pytest.mark.parametrize("config", CONFIGS)
def test_judgements_and_leaderboard_equal_alpaca_evals(config, outputs, alpaca_eval_run, tmp_path, capsys):
    reference_dir, reference_requests = alpaca_eval_run
    judge = JudgeServer()
    model, reference = outputs
    run_ours(["--model_outputs", model, "--reference_outputs", reference, "--output_path", str(tmp_path),
              "--annotators_config", config], judge)  # fmt: skip
    judge.close()

    # The same requests: alpaca_eval sends both configs' (the same prompts) in its own shuffled order.
    def canonical(requests):
        return sorted(json.dumps(r, sort_keys=True) for r in requests)

    assert canonical(judge.requests) == sorted(canonical(reference_requests)[::2])
    assert len(judge.requests) == N_DIFFERENT  # an identical pair gets 1.5 without a call
    shown_first = [r["messages"][1]["content"].split('"output": """', 2)[1] for r in judge.requests]
    ours = {a["output"] for a in model_answers()}
    assert 0.3 < sum(text.split('"""')[0] in ours for text in shown_first) / len(shown_first) < 0.7

    theirs = {a["instruction"]: a for a in json.loads(Path(reference_dir, config, "annotations.json").read_text())}
    mine = json.loads((tmp_path / config / "annotations.json").read_text())
    assert [a["instruction"] for a in mine] == list(theirs)  # the reference's order
    for a in mine:
        expected = theirs[a["instruction"]]
        assert a.keys() - {"preference_raw_completion"} <= expected.keys()
        for field in ("output_1", "generator_1", "dataset_1", "output_2", "generator_2", "dataset_2", "annotator"):
            assert a[field] == expected[field], field
        if expected["preference"] is None:  # no m or M in the judge's answer: not counted
            assert a["preference"] is None and UNPARSEABLE in a["output_2"]
        else:
            assert a["preference"] == pytest.approx(expected["preference"], abs=1e-9)
            assert (a["preference_raw_completion"] is None) == (expected["preference_raw_completion"] is None)
    assert sum(a["preference"] is None for a in mine) == N_UNPARSEABLE
    assert len({a["preference"] for a in mine}) > (3 if config == "alpaca_eval_clf_gpt4_turbo" else 100)

    (theirs_row,) = read_leaderboard(f"{reference_dir}/{config}/leaderboard.csv").values()
    mine_board = read_leaderboard(str(tmp_path / config / "leaderboard.csv"))
    assert list(mine_board) == ["made-up"]
    assert list(mine_board["made-up"]) == ["", *evaluate.LEADERBOARD_COLUMNS] == list(theirs_row)
    for column in evaluate.LEADERBOARD_COLUMNS:
        if column == "mode":
            assert mine_board["made-up"][column] == theirs_row[column]
        else:
            assert float(mine_board["made-up"][column]) == pytest.approx(float(theirs_row[column]), rel=1e-9)
    printed = capsys.readouterr()
    assert "made-up" in printed.out and f"{float(theirs_row['win_rate']):.2f}" in printed.out
    assert f"{N_UNPARSEABLE} judge answer(s) named neither output" in printed.err


def test_judge_settings_and_prompt_are_alpaca_evals_configs():
    import alpaca_eval

    package = os.path.join(os.path.dirname(alpaca_eval.__file__), "evaluators_configs")
    for config, is_binarize in evaluate.ANNOTATORS_BINARIZE.items():
        for folder in (os.path.join(package, config), str(SHARED_DATA / "eval" / "alpaca_eval")):
            path = os.path.join(folder, "configs.yaml" if folder.startswith(package) else f"{config}.yaml")
            with open(path) as f:
                (settings,) = yaml.safe_load(f).values()
            kwargs = dict(settings["completions_kwargs"])
            assert kwargs.pop("model_name") == evaluate.JUDGE_MODEL
            assert kwargs == {k: v for k, v in evaluate.JUDGE_SETTINGS.items() if k != "top_p"}
            assert settings["completion_parser_kwargs"] == {
                "numerator_token": "m", "denominator_tokens": ["m", "M"], "is_binarize": is_binarize,
            }  # fmt: skip
            assert settings["fn_completion_parser"] == "logprob_parser" and settings["batch_size"] == 1
    with open(os.path.join(package, "alpaca_eval_clf_gpt4_turbo", "alpaca_eval_clf.txt"), "rb") as f:
        assert evaluate.JUDGE_TEMPLATE.read_bytes() == f.read()


def test_a_killed_run_resumes_without_paying_twice(outputs, tmp_path):
    judge = JudgeServer(latency=0.01)
    model, reference = outputs
    command = [sys.executable, EVALUATE, "--model_outputs", model, "--reference_outputs", reference,
               "--output_path", str(tmp_path), "--api_base", judge.url, "--max_concurrency", "4"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    judge.on_request = lambda n: n == 60 and os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=120) == -signal.SIGKILL
    judge.on_request = None
    cache = evaluate.JudgeCache(str(tmp_path / "judge_cache.jsonl"))
    assert 50 <= len(cache.entries) < 60
    asked_before = len(judge.requests)

    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    judge.close()
    assert result.returncode == 0, result.stderr
    again = judge.requests[asked_before:]
    assert len(again) == N_DIFFERENT - len(cache.entries)  # only what was not recorded, the killed in-flight included
    template = evaluate.JUDGE_TEMPLATE.read_text()
    recorded = set()
    for pair in evaluate.pair_outputs(model_answers(), evaluate.davinci_outputs(), "a", "b"):
        first, second = pair["output_1"], pair["output_2"]
        if evaluate.is_swapped(pair["instruction"]):
            first, second = second, first
        key = evaluate.JudgeCache.key(
            evaluate.DEFAULT_ANNOTATOR, evaluate.JUDGE_MODEL, pair["instruction"], pair["output_1"], pair["output_2"]
        )
        if key in cache.entries:
            recorded.add(json.dumps(evaluate.judge_messages(template, pair["instruction"], first, second)))
    assert not recorded & {json.dumps(r["messages"]) for r in again}
    annotations = json.loads((tmp_path / evaluate.DEFAULT_ANNOTATOR / "annotations.json").read_text())
    assert sum(a["preference"] is not None for a in annotations) == 252 - N_UNPARSEABLE


def test_rate_limits_and_server_errors_are_retried(outputs, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "RETRY_DELAY", 0.01)
    judge = JudgeServer(fail_first=3, retry_after="1")
    model, reference = outputs
    run_ours(["--model_outputs", model, "--reference_outputs", reference, "--output_path", str(tmp_path),
              "--max_concurrency", "1"], judge)  # fmt: skip
    judge.close()
    assert len(judge.requests) == N_DIFFERENT + 3
    assert judge.requests[0] == judge.requests[1] == judge.requests[2] == judge.requests[3]
    assert judge.times[1] - judge.times[0] >= 1.0  # the 429's Retry-After
    assert judge.times[2] - judge.times[1] < 1.0  # a 500 has none: the first pause is RETRY_DELAY


def write(path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


@pytest.mark.parametrize(
    "model, reference, message",
    [
        ([{"instruction": "a", "output": "x"}], None, "record 0 has no string 'generator'"),
        ([{"instruction": "a", "output": 3, "generator": "g"}], None, "record 0 has no string 'output'"),
        ({"instruction": "a"}, None, "expected a non-empty JSON list"),
        ([{"instruction": "a", "output": "x", "generator": "g"}] * 2, None, "record 1 repeats an instruction: 'a'"),
        ([{"instruction": "a", "output": "x", "generator": "g"}],
         [{"instruction": "b", "output": "y", "generator": "r"}], "1 instruction(s) of"),
        ([{"instruction": "a", "output": "x", "generator": "g"}], None, "252 instruction(s) of text-davinci-003's"),
    ],
)  # fmt: skip
def test_bad_outputs_end_in_one_line(model, reference, message, tmp_path, capsys):
    args = ["--model_outputs", write(tmp_path / "m.json", model), "--api_base", "http://127.0.0.1:9/v1"]
    if reference is not None:
        args += ["--reference_outputs", write(tmp_path / "r.json", reference)]
    with pytest.raises(SystemExit) as exit:
        evaluate.main(args)
    assert message in str(exit.value) and str(exit.value).startswith("error: ") and "\n" not in str(exit.value)


def test_judge_errors_end_in_one_line(outputs, tmp_path, monkeypatch):
    model, reference = outputs
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="needs OPENAI_API_KEY"):
        evaluate.main(["--model_outputs", model, "--output_path", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"cannot reach the endpoint"):
        evaluate.main(["--model_outputs", model, "--reference_outputs", reference, "--output_path", str(tmp_path),
                       "--api_base", "http://127.0.0.1:9/v1"])  # fmt: skip


def test_standard_error_of_a_single_judgement_is_nan_like_pandas():
    assert math.isnan(evaluate.win_rate([2.0])["standard_error"])


def test_model_path_answers_the_eval_set_like_transformers_then_judges(tokenizer_model, tmp_path):
    """--model_path: the first instructions answered greedily in the Alpaca template (the input one where there is
    an input), to the end of the context, equal transformers' greedy answers; then judged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from data import format_prompt
    from tokenizer import Tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32000, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    shutil.copyfile(tokenizer_model, model_dir / "tokenizer.model")
    judge = JudgeServer()
    run_ours(["--model_path", str(model_dir), "--max_instances", "6", "--temperature", "0", "--batch_size", "2",
              "--output_path", str(tmp_path / "out")], judge)  # fmt: skip
    judge.close()

    answers = json.loads((tmp_path / "out" / "model_outputs.json").read_text())
    pairs = evaluate.eval_instructions()[:6]
    assert any(input for _, input in pairs) and not all(input for _, input in pairs)
    assert [a["instruction"] for a in answers] == [evaluate.merged_instruction(*p) for p in pairs]
    assert {a["generator"] for a in answers} == {"tiny"} and {a["dataset"] for a in answers} == {"selfinstruct"}
    reference = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = Tokenizer(str(tokenizer_model))
    for (instruction, input), answer in zip(pairs, answers, strict=True):
        ids = tokenizer.encode(format_prompt(instruction, input), bos=True)
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=256 - len(ids), pad_token_id=0
            )
        expected = [t for t in out[0, len(ids) :].tolist() if t != 2]
        assert answer["output"] == tokenizer.decode(expected).strip()
    annotations = json.loads((tmp_path / "out" / evaluate.DEFAULT_ANNOTATOR / "annotations.json").read_text())
    assert len(annotations) == len(judge.requests) == 6


def test_human_flags_serve_the_pairs_blind_and_report_the_votes(outputs, tmp_path):
    """--human serves evaluate.py's pairs on a local page (human_eval.py, tested in test_human_eval.py);
    --human_report reads the votes back."""
    from browser import post

    model, reference = outputs
    command = [sys.executable, EVALUATE, "--human", "--model_outputs", model, "--reference_outputs", reference,
               "--output_path", str(tmp_path), "--port", "0"]  # fmt: skip
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stderr.readline()
        assert line.startswith("252 pairs to compare blind at http://127.0.0.1:"), line
        url = line.split("at ")[1].split("/ ")[0]
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
        connection.request("GET", "/pair?rater=ada")
        shown = json.loads(connection.getresponse().read())
        assert "made-up" not in json.dumps(shown) and "text-davinci-003" not in json.dumps(shown)
        instruction = shown["instruction"]
        status, _ = post(url, "/vote", {"rater": "ada", "instruction": instruction, "choice": "tie"})
        assert status == 200
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    report = subprocess.run([sys.executable, EVALUATE, "--human_report", str(tmp_path)], capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "made-up" in report.stdout and "all raters" in report.stdout
    (vote,) = [json.loads(line) for line in (tmp_path / "human_votes.jsonl").read_text().splitlines()]
    assert vote["instruction"] == instruction and vote["preference"] == 1.5 and vote["generator_2"] == "made-up"


@pytest.fixture(scope="module")
def judge_model_dir(tmp_path_factory, tokenizer_model) -> Path:
    """A tiny LLaMA that puts m, then M, on top of every answer to AlpacaEval's judge prompt: its final norm keeps
    only the first feature of the last hidden state, signed so that it is positive after "### Response:", and only
    m's and M's output rows read it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from data import format_prompt
    from tokenizer import Tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=32000, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    tokenizer = Tokenizer(str(tokenizer_model))
    with torch.no_grad():
        last_hidden = model.model(torch.tensor([tokenizer.encode(format_prompt("Judge."), bos=True)])).last_hidden_state
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0 if last_hidden[0, -1, 0] > 0 else -1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.encode("m")[-1], 0] = 8.0
        model.lm_head.weight[tokenizer.encode("M")[-1], 0] = 7.0
    path = tmp_path_factory.mktemp("judge")
    model.save_pretrained(path)
    shutil.copyfile(tokenizer_model, path / "tokenizer.model")
    return path


def test_serve_py_as_the_judge(judge_model_dir, outputs, tmp_path):
    """Our own model behind serve.py judges the pairs: the requests alpaca_eval sends work on its chat endpoint, and
    each preference is what alpaca_eval's parser reads in serve.py's logprobs, the seeded swap undone (the values
    themselves are held against transformers in test_logprobs.py)."""
    import serve

    server = serve.build_server(serve.parse_args(["--model_path", str(judge_model_dir), "--port", "0"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    answers, references = (evaluate.read_outputs(path) for path in outputs)
    chosen = [i for i, (a, r) in enumerate(zip(answers, references, strict=True)) if a["output"] != r["output"]][:24]
    model, reference = (
        write(tmp_path / "m.json", [answers[i] for i in chosen]),
        write(tmp_path / "r.json", [references[i] for i in chosen]),
    )
    try:
        evaluate.main(["--model_outputs", model, "--reference_outputs", reference, "--output_path", str(tmp_path),
                       "--api_base", f"http://{host}:{port}/v1", "--judge_model", "judge"])  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    annotations = json.loads((tmp_path / evaluate.DEFAULT_ANNOTATOR / "annotations.json").read_text())
    assert len(annotations) == len(chosen)
    for a in annotations:
        (content,) = a["preference_raw_completion"]["logprobs"]["content"]
        assert [t["token"] for t in content["top_logprobs"][:2]] == ["m", "M"], content  # sampled at temperature 1
        preference = evaluate.read_preference(a["preference_raw_completion"], is_binarize=False)
        assert 1 < preference < 1.5
        expected = 3 - preference if evaluate.is_swapped(a["instruction"]) else preference
        assert a["preference"] == pytest.approx(expected)
