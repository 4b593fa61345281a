"""human_eval.py, the blind comparison by people: the votes file and its resume, the blind order, the report's
numbers by hand and against alpaca_eval's own win-rate function, bad requests, and the page in a real headless
Chromium."""

import json
import socket
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
from alpaca_eval.metrics import get_winrate
from browser import Chromium, needs_chromium, post

from human_eval import build_human_server, human_report

EVAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
REFERENCE, MODEL = "text-davinci-003", "alpaca-7b"
PAIRS = [
    {"instruction": f"Instruction {i}", "output_1": f"reference answer {i}", "generator_1": REFERENCE,
     "output_2": f"model answer {i}", "generator_2": MODEL}
    for i in range(12)
]  # fmt: skip


@contextmanager
def running(pairs, output_path):
    """The page's server on a free loopback port, serving in a thread; yields its URL."""
    server = build_human_server(pairs, str(output_path))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()


def get(url, path):
    return post(url, path, None, method="GET")


def shown_pair(url, rater, position=None):
    status, pair = get(url, f"/pair?rater={quote(rater)}" + ("" if position is None else f"&position={position}"))
    assert status == 200, pair
    return pair


def vote(url, rater, instruction, winner):
    """Votes as a rater who finds winner ("model", "reference" or "tie") better, reading the sides off the page."""
    if winner == "tie":
        choice = "tie"
    else:
        pair = next(p for k in range(len(PAIRS)) if (p := shown_pair(url, rater, k))["instruction"] == instruction)
        answers = next(p for p in PAIRS if p["instruction"] == instruction)
        choice = str(pair["outputs"].index(answers["output_2" if winner == "model" else "output_1"]) + 1)
    status, answer = post(url, "/vote", {"rater": rater, "instruction": instruction, "choice": choice})
    assert status == 200, answer
    return answer


def votes_on_file(output_path):
    return [json.loads(line) for line in (output_path / "human_votes.jsonl").read_text().splitlines()]


def test_votes_are_appended_and_a_restarted_server_resumes(tmp_path):
    with running(PAIRS, tmp_path) as url:
        first = shown_pair(url, "ann")
        assert (first["position"], first["done"], first["total"], first["choice"]) == (0, 0, 12, None)
        after = post(url, "/vote", {"rater": "ann", "instruction": first["instruction"], "choice": "1"})[1]
        assert (after["position"], after["done"]) == (1, 1) and after["instruction"] != first["instruction"]
        post(url, "/vote", {"rater": "ann", "instruction": after["instruction"], "choice": "tie"})
        post(url, "/vote", {"rater": " bob ", "instruction": first["instruction"], "choice": "2"})

    (ann_1, ann_2, bob) = votes_on_file(tmp_path)
    pair = next(p for p in PAIRS if p["instruction"] == first["instruction"])
    model_first = first["outputs"][0] == pair["output_2"]
    assert ann_1 == pair | {
        "rater": "ann",
        "shown_first": "model" if model_first else "reference",
        "choice": "1",
        "preference": 2.0 if model_first else 1.0,
        "time": ann_1["time"],
    }
    assert ann_1["time"].endswith("+00:00")
    assert (ann_2["preference"], bob["rater"], bob["preference"]) == (1.5, "bob", 1.0 if model_first else 2.0)

    with running(PAIRS, tmp_path) as url:
        resumed = shown_pair(url, "ann")
        assert (resumed["position"], resumed["done"]) == (2, 2)
        assert resumed["instruction"] not in (first["instruction"], after["instruction"])
        assert shown_pair(url, "ann", 0) == first | {"done": 2, "choice": "1"}
        assert shown_pair(url, "bob")["done"] == 1
        assert shown_pair(url, "carol")["done"] == 0


def test_the_last_vote_on_a_pair_counts(tmp_path):
    with running(PAIRS, tmp_path) as url:
        vote(url, "ann", "Instruction 0", "reference")
        vote(url, "ann", "Instruction 0", "model")
        assert shown_pair(url, "ann")["done"] == 1
    assert [v["preference"] for v in votes_on_file(tmp_path)] == [1.0, 2.0]
    assert report_rows(human_report(str(tmp_path)))["ann"] == ["100.00", "-", "1", "0", "0", "1"]


def test_the_order_is_blind_random_and_the_same_on_every_reload(tmp_path):
    with running(PAIRS, tmp_path) as url:
        pages = {rater: [shown_pair(url, rater, k) for k in range(len(PAIRS))] for rater in ("ann", "bob")}
        assert pages["ann"] == [shown_pair(url, "ann", k) for k in range(len(PAIRS))]
        with urllib.request.urlopen(url + "/") as response:
            text = json.dumps(pages) + response.read().decode()
        assert REFERENCE not in text and MODEL not in text
        fields = {"rater", "position", "total", "done", "instruction", "outputs", "choice"}
        assert all(page.keys() == fields for page in pages["ann"])  # nothing that says which answer is whose

    for rater, shown in pages.items():
        model_first = [page["outputs"][0].startswith("model") for page in shown]
        assert 0 < sum(model_first) < len(PAIRS), rater  # both sides come first
        assert sorted(page["instruction"] for page in shown) == sorted(p["instruction"] for p in PAIRS)
    assert [p["instruction"] for p in pages["ann"]] != [p["instruction"] for p in pages["bob"]]
    sides = {rater: {p["instruction"]: p["outputs"][0] for p in shown} for rater, shown in pages.items()}
    assert sides["ann"] != sides["bob"]  # the side is per rater and pair, not per pair

    with running(PAIRS, tmp_path) as url:  # and after a restart
        assert pages["bob"] == [shown_pair(url, "bob", k) for k in range(len(PAIRS))]


def report_rows(report: str) -> dict[str, list[str]]:
    """The table's rows, by rater ("all raters" for the pooled row): win_rate, standard_error, n_wins,
    n_wins_base, n_draws, n_total, as printed."""
    rows = {}
    for line in report.splitlines():
        words = line.split()
        if len(words) >= 7 and words[-1].isdigit():
            rows[" ".join(words[:-6])] = words[-6:]
    return rows


# ann rates four pairs, bob two of them, carol one: two instructions rated by several raters.
VOTES = [
    ("ann", "Instruction 0", "model"),
    ("ann", "Instruction 1", "model"),
    ("ann", "Instruction 2", "tie"),
    ("ann", "Instruction 3", "reference"),
    ("bob", "Instruction 0", "model"),
    ("bob", "Instruction 1", "reference"),
    ("carol", "Instruction 0", "tie"),
]


def test_report_numbers_by_hand_and_as_alpaca_eval_computes_them(tmp_path):
    with running(PAIRS, tmp_path) as url:
        for rater, instruction, winner in VOTES:
            vote(url, rater, instruction, winner)
        status, on_page = get(url, "/report")
    assert status == 200
    report = human_report(str(tmp_path))
    assert on_page["report"] == report
    assert report.startswith(f"Blind human comparison: {MODEL} (the model) against {REFERENCE} (the reference)\n")

    rows = report_rows(report)
    # ann: preference - 1 = 1, 1, .5, 0: mean .625; squared deviations .140625 * 2 + .015625 + .390625 = .6875,
    # sample std sqrt(.6875 / 3) = .478714, / sqrt(4) = .239357.
    assert rows["ann"] == ["62.50", "23.94", "2", "1", "1", "4"]
    # bob: 1, 0: mean .5, std .707107 / sqrt(2) = .5.
    assert rows["bob"] == ["50.00", "50.00", "1", "1", "0", "2"]
    # carol: one vote, no sample std.
    assert rows["carol"] == ["50.00", "-", "0", "0", "1", "1"]
    # all: 1, 1, .5, 0, 1, 0, .5: mean 4/7; squared deviations 3 * 9/49 + 2 * 1/196 + 2 * 16/49 = 119/98,
    # std sqrt(119/98 / 6) = .449868, / sqrt(7) = .170034.
    assert rows["all raters"] == ["57.14", "17.00", "3", "2", "2", "7"]
    # Instruction 0: ann-bob agree, ann-carol and bob-carol do not; instruction 1: ann-bob do not. 1 of 4.
    assert "Agreement: 25.0%: 1 of 4 rater pairs gave the same verdict" in report
    assert "on the 2 instructions that two or more raters rated." in report

    votes = votes_on_file(tmp_path)
    for rater in ("ann", "bob", "all raters"):
        expected = get_winrate([{"preference": v["preference"]} for v in votes if rater in (v["rater"], "all raters")])
        printed = rows[rater]
        assert printed[:2] == [f"{expected['win_rate']:.2f}", f"{expected['standard_error']:.2f}"]
        assert [int(n) for n in printed[2:]] == [expected[k] for k in ("n_wins", "n_wins_base", "n_draws", "n_total")]


def test_agreement_before_two_raters_share_a_pair(tmp_path):
    with running(PAIRS, tmp_path) as url:
        vote(url, "ann", "Instruction 0", "model")
        vote(url, "bob", "Instruction 1", "model")
    assert "Agreement: no instruction has been rated by two raters yet." in human_report(str(tmp_path))


def test_concurrent_votes_are_whole_lines(tmp_path):
    raters = [f"rater {i}" for i in range(8)]
    with running(PAIRS, tmp_path) as url:
        threads = [
            threading.Thread(target=lambda r=r: [vote(url, r, p["instruction"], "tie") for p in PAIRS]) for r in raters
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    votes = votes_on_file(tmp_path)
    assert sorted((v["rater"], v["instruction"]) for v in votes) == sorted(
        (r, p["instruction"]) for r in raters for p in PAIRS
    )


def test_a_line_cut_short_by_a_crash(tmp_path, capsys):
    with running(PAIRS, tmp_path) as url:
        vote(url, "ann", "Instruction 0", "model")
    path = tmp_path / "human_votes.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:40])  # a second vote, cut short

    assert report_rows(human_report(str(tmp_path)))["ann"][-1] == "1"  # the report leaves it out
    assert "left out the last line, cut short by a crash" in capsys.readouterr().err
    with running(PAIRS, tmp_path) as url:  # the server drops it, and the next vote starts on its own line
        assert "dropped the last line, cut short by a crash" in capsys.readouterr().err
        vote(url, "ann", "Instruction 1", "reference")
    assert [v["preference"] for v in votes_on_file(tmp_path)] == [2.0, 1.0]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "no votes yet"),
        ('{"rater": "ann"}\n', "line 1: a vote needs string fields rater, instruction, output_1"),
        ("not json\n", "line 1: not a JSON line"),
    ],
)
def test_report_errors(tmp_path, content, message):
    (tmp_path / "human_votes.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        human_report(str(tmp_path))


def test_a_wrong_preference_on_file_is_an_error(tmp_path):
    with running(PAIRS, tmp_path) as url:
        vote(url, "ann", "Instruction 0", "model")
    line = (tmp_path / "human_votes.jsonl").read_text().replace('"preference": 2.0', '"preference": 3')
    (tmp_path / "human_votes.jsonl").write_text(line)
    with pytest.raises(ValueError, match="line 1: 'preference' must be 1, 1.5 or 2, got 3"):
        human_report(str(tmp_path))
    with pytest.raises(ValueError, match="line 1: 'preference' must be 1, 1.5 or 2"):
        build_human_server(PAIRS, str(tmp_path))


def test_votes_on_other_answers_are_refused(tmp_path):
    with running(PAIRS, tmp_path) as url:
        vote(url, "ann", "Instruction 0", "model")
    regenerated = [p | {"output_2": "a new answer"} if p["instruction"] == "Instruction 0" else p for p in PAIRS]
    with pytest.raises(ValueError, match="holds votes on other pairs than these .*give another output path"):
        build_human_server(regenerated, str(tmp_path))


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([], "no pairs to compare"),
        (PAIRS + PAIRS[:1], "pair 12: the instruction 'Instruction 0' comes twice"),
        ([{"instruction": "x", "output_1": "a", "output_2": "b"}], "pair 0: needs string fields"),
    ],
)
def test_bad_pairs(tmp_path, pairs, message):
    with pytest.raises(ValueError, match=message):
        build_human_server(pairs, str(tmp_path))


def test_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            build_human_server(PAIRS, str(tmp_path), port=port)


GOOD_VOTE = {"rater": "ann", "instruction": "Instruction 0", "choice": "1"}
BAD_REQUESTS = [
    ("POST", "/vote", GOOD_VOTE | {"instruction": "Instruction 99"}, 400, "'instruction' must be one of the pairs"),
    ("POST", "/vote", GOOD_VOTE | {"instruction": ["x"]}, 400, "'instruction' must be one of the pairs"),
    ("POST", "/vote", {"instruction": "Instruction 0", "choice": "1"}, 400, "'rater' must be the rater's name"),
    ("POST", "/vote", GOOD_VOTE | {"rater": "  "}, 400, "'rater' must be the rater's name"),
    ("POST", "/vote", GOOD_VOTE | {"rater": "x" * 101}, 400, "'rater' must be at most 100 characters"),
    ("POST", "/vote", GOOD_VOTE | {"choice": "3"}, 400, "'choice' must be one of '1', 'tie', '2', got '3'"),
    ("POST", "/vote", GOOD_VOTE | {"choice": 1}, 400, "'choice' must be one of '1', 'tie', '2', got 1"),
    ("POST", "/vote", b'{"rater": "ann",', 400, "not valid JSON"),
    ("POST", "/vote", [1], 400, "must be a JSON object"),
    ("GET", "/pair", None, 400, "'rater' must be the rater's name"),
    ("GET", "/pair?rater=ann&position=x", None, 400, "'position' must be an integer >= 0, got 'x'"),
    ("GET", "/pair?rater=ann&position=12", None, 400, "'position' must be in [0, 12), got 12"),
    ("GET", "/report", None, 404, "no votes yet"),
    ("GET", "/nowhere", None, 404, "no route /nowhere"),
    ("GET", "/vote", None, 405, "/vote takes POST, not GET"),
    ("PUT", "/pair", None, 405, "/pair takes GET, not PUT"),
]


def test_bad_requests_get_their_4xx_and_the_server_goes_on(tmp_path):
    with running(PAIRS, tmp_path) as url:
        for method, path, body, status, message in BAD_REQUESTS:
            got_status, answer = post(url, path, body, method)
            assert got_status == status, (path, body, answer)
            assert message in answer["error"]["message"] and isinstance(answer["error"]["type"], str), answer
            assert shown_pair(url, "ann")["total"] == len(PAIRS)
    assert not (tmp_path / "human_votes.jsonl").read_bytes()


# ---------------------------------------------------------------------------------------------------------
# The page in a real browser


def eval_pairs(n: int) -> list[dict]:
    """The first n of the 252 instructions, text-davinci-003's answers as the reference, and the set's own
    target answers standing in for a model's."""
    records = [json.loads(line) for line in (EVAL_DATA / "text-davinci-003_predictions.jsonl").open()][:n]
    return [
        {"instruction": r["instruction"].strip() + ("\n\n" + r["input"] if r["input"] else ""),
         "output_1": r["response"].strip(), "generator_1": REFERENCE, "output_2": r["target"], "generator_2": "target"}
        for r in records
    ]  # fmt: skip


@needs_chromium
def test_the_page_in_a_real_browser(tmp_path):
    """A rater enters a name, votes with a click and with a key, reloads and goes on where they stopped, goes
    back to change a vote, finishes and sees the report. The screenshot is left in the test's temporary
    directory."""
    pairs = eval_pairs(4)
    progress = "document.getElementById('count')?.textContent"
    instruction = "document.getElementById('instruction')?.textContent"
    outputs = "[1, 2].map((i) => document.getElementById('output' + i).textContent)"
    browser = Chromium(tmp_path / "profile")
    try:
        with running(pairs, tmp_path / "out") as url:
            browser.open(url + "/")
            browser.wait_for("document.getElementById('start')?.hidden === false")
            browser.click("#name")
            browser.call("Input.insertText", text="Ann")
            browser.click("#begin")
            browser.wait_for(f"{progress} === '0 of 4 rated'")
            seen = [(browser.evaluate(instruction), browser.evaluate(outputs))]
            browser.click('button[data-choice="2"]')
            browser.wait_for(f"{progress} === '1 of 4 rated'")
            seen.append((browser.evaluate(instruction), browser.evaluate(outputs)))
            browser.screenshot(tmp_path / "human_eval.png")
            browser.press("1", "Digit1", 49)
            browser.wait_for(f"{progress} === '2 of 4 rated'")
            third = browser.evaluate(instruction)

            browser.call("Page.reload")
            browser.wait_for(f"{progress} === '2 of 4 rated'")
            assert browser.evaluate(instruction) == third
            assert browser.evaluate("document.getElementById('rater').textContent") == "Ann"

            browser.press("Backspace", "Backspace", 8)  # back to the second pair: its vote is shown, and changed
            browser.wait_for(f"document.getElementById('instruction').textContent === {json.dumps(seen[1][0])}")
            assert browser.evaluate("document.querySelector('button.vote.chosen').dataset.choice") == "1"
            browser.press("t", "KeyT", 84)
            browser.wait_for(f"{instruction} === {json.dumps(third)}")
            browser.press("2", "Digit2", 50)
            browser.wait_for(f"{progress} === '3 of 4 rated'")
            browser.click('button[data-choice="tie"]')
            browser.wait_for("!document.getElementById('finished').hidden")
            browser.wait_for("document.getElementById('report').textContent.includes('all raters')")
            shown_report = browser.evaluate("document.getElementById('report').textContent")
            assert browser.evaluate(progress) == "4 of 4 rated"

        votes = votes_on_file(tmp_path / "out")
        assert [v["choice"] for v in votes] == ["2", "1", "tie", "2", "tie"] and {v["rater"] for v in votes} == {"Ann"}
        for (shown_instruction, shown_outputs), v in zip(seen, votes[:2], strict=True):
            pair = next(p for p in pairs if p["instruction"] == shown_instruction)
            assert v["instruction"] == shown_instruction
            chosen = shown_outputs[int(v["choice"]) - 1]
            assert v["preference"] == (2.0 if chosen == pair["output_2"] else 1.0)
        assert shown_report == human_report(str(tmp_path / "out"))
    finally:
        browser.close()
