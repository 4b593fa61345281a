"""The blind comparison by people, Alpaca's own evaluation (Alpaca 7B against text-davinci-003: 90 wins to 89).

evaluate.py calls the two functions here: build_human_server() serves a page on which each rater, after entering
a name, sees one instruction and two answers labelled only "Output 1" and "Output 2", and picks the better one or
a tie; human_report() turns the votes into win rates.

Pairs are alpaca_eval's: output_1 is the reference's answer, output_2 the evaluated model's, and the instruction is
the pair's key. Which answer a rater sees first, and the order of the pairs, come from a hash of (rater,
instruction): random across raters and pairs, the same on every reload. Votes are appended to
`<output_path>/human_votes.jsonl`, one JSON line each with alpaca_eval's annotation fields (instruction, output_1,
generator_1, output_2, generator_2, preference) and the rater, the side shown first, the button pressed and the
time. A rater may go back and vote again on a pair: the last vote counts. The server reads the file on start, so
a rater who comes back, or a restarted server, goes on where it stopped.

The numbers are alpaca_eval's: a vote's preference is 1 (the reference is better), 1.5 (a tie) or 2 (the model is
better); win_rate = 100 * mean(preference - 1), standard_error = 100 * sample std (ddof 1) / sqrt(n).
"""

import hashlib
import itertools
import json
import math
import os
import sys
import threading
from collections import defaultdict
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from evaluate import win_rate
from serve import Handler, RequestError

HUMAN_PAGE = Path(__file__).with_name("human_eval.html")
VOTES_FILE = "human_votes.jsonl"
PAIR_FIELDS = ("instruction", "output_1", "generator_1", "output_2", "generator_2")
CHOICES = ("1", "tie", "2")  # the buttons, as the rater sees them: Output 1 is better, tie, Output 2 is better
PREFERENCES = (1, 1.5, 2)  # alpaca_eval's: the reference is better, a tie, the model is better
MAX_RATER_CHARS = 100
ROUTES = {"/": "GET", "/pair": "GET", "/report": "GET", "/vote": "POST"}


# ---------------------------------------------------------------------------------------------------------
# Blind order


def digest(*parts: str) -> bytes:
    return hashlib.sha256("\0".join(parts).encode()).digest()


def rater_order(rater: str, instructions: list[str]) -> list[str]:
    """The order in which rater sees the pairs: shuffled per rater, so that raters who stop early cover
    different pairs, and position effects (fatigue, warming up) fall on different pairs."""
    return sorted(instructions, key=lambda instruction: digest("order", rater, instruction))


def model_shown_first(rater: str, instruction: str) -> bool:
    return digest("side", rater, instruction)[0] % 2 == 1


def preference(choice: str, model_first: bool) -> float:
    """alpaca_eval's preference for the button the rater pressed: 2 when the model's answer won."""
    if choice == "tie":
        return 1.5
    return 2.0 if (choice == "1") == model_first else 1.0


# ---------------------------------------------------------------------------------------------------------
# The votes file


def read_votes(path: Path) -> list[dict]:
    """The votes in path, in the order they were cast. A last line without its newline is a write that a crash
    cut short: it is left out, with a warning. Any other line that is not a vote is an error."""
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    if lines[-1]:
        print(f"warning: {path}: left out the last line, cut short by a crash: {lines[-1][:80]!r}", file=sys.stderr)
    votes = []
    for number, line in enumerate(lines[:-1], 1):
        try:
            vote = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} line {number}: not a JSON line: {line[:80]!r}") from None
        if not (isinstance(vote, dict) and all(isinstance(vote.get(name), str) for name in ("rater", *PAIR_FIELDS))):
            raise ValueError(f"{path} line {number}: a vote needs string fields rater, {', '.join(PAIR_FIELDS)}")
        if vote.get("preference") not in PREFERENCES:
            raise ValueError(f"{path} line {number}: 'preference' must be 1, 1.5 or 2, got {vote.get('preference')!r}")
        votes.append(vote)
    return votes


def last_votes(votes: list[dict]) -> dict[tuple[str, str], dict]:
    """The vote that counts for each (rater, instruction): the last one cast."""
    return {(vote["rater"], vote["instruction"]): vote for vote in votes}


def cut_torn_line(path: Path) -> None:
    """Drops a last line cut short by a crash, so that the next vote starts on a line of its own."""
    if path.is_file() and (data := path.read_bytes()) and not data.endswith(b"\n"):
        kept = data.rfind(b"\n") + 1
        print(f"warning: {path}: dropped the last line, cut short by a crash: {data[kept:][:80]!r}", file=sys.stderr)
        os.truncate(path, kept)


# ---------------------------------------------------------------------------------------------------------
# The report


def agreement(votes: list[dict]) -> tuple[int, int, int]:
    """(rater pairs with the same verdict, rater pairs, instructions) over the instructions that two or more
    raters rated; each two raters who rated an instruction are one rater pair there."""
    verdicts = defaultdict(list)
    for vote in votes:
        verdicts[vote["instruction"]].append(vote["preference"])
    shared = [prefs for prefs in verdicts.values() if len(prefs) >= 2]
    rater_pairs = [a == b for prefs in shared for a, b in itertools.combinations(prefs, 2)]
    return sum(rater_pairs), len(rater_pairs), len(shared)


def human_report(output_path: str) -> str:
    """The report on the votes in output_path: per rater and pooled win rate of the model over the reference,
    with standard error and ties, and how often raters agree. Raises ValueError if there are no votes, or the
    file holds something else than votes of one comparison."""
    path = Path(output_path) / VOTES_FILE
    votes = list(last_votes(read_votes(path)).values())
    if not votes:
        raise ValueError(f"{path}: no votes yet")
    comparisons = {(vote["generator_2"], vote["generator_1"]) for vote in votes}
    if len(comparisons) > 1:
        raise ValueError(f"{path}: votes of several comparisons (model, reference): {sorted(comparisons)}")
    (model, reference), raters = comparisons.pop(), sorted({vote["rater"] for vote in votes})
    rows = [(rater, win_rate([v["preference"] for v in votes if v["rater"] == rater])) for rater in raters]
    rows.append(("all raters", win_rate([vote["preference"] for vote in votes])))

    width = max(len(name) for name, _ in rows)
    lines = [
        f"Blind human comparison: {model} (the model) against {reference} (the reference)",
        f"Votes: {path}",
        "",
        f"{'rater':<{width}}  win_rate  standard_error  n_wins  n_wins_base  n_draws  n_total",
    ]
    for name, stats in rows:
        se = "-" if math.isnan(stats["standard_error"]) else f"{stats['standard_error']:.2f}"
        lines.append(
            f"{name:<{width}}  {stats['win_rate']:8.2f}  {se:>14}  {stats['n_wins']:6}  {stats['n_wins_base']:11}"
            f"  {stats['n_draws']:7}  {stats['n_total']:7}"
        )
    same, rater_pairs, shared = agreement(votes)
    lines.append("")
    if rater_pairs:
        lines += [
            f"Agreement: {100 * same / rater_pairs:.1f}%: {same} of {rater_pairs} rater pairs gave the same verdict"
            " (reference better, tie, model better)",
            f"on the {shared} instructions that two or more raters rated.",
        ]
    else:
        lines.append("Agreement: no instruction has been rated by two raters yet.")
    lines += [
        "",
        "preference: 1 reference better, 1.5 tie, 2 model better; a rater's last vote on a pair counts.",
        "win_rate = 100 * mean(preference - 1), standard_error = 100 * sample std(preference - 1) / sqrt(n_total),",
        "as alpaca_eval computes them.",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The server


class HumanServer(ThreadingHTTPServer):
    api_key = None  # serve.Handler guards /v1/* with a key; this page has no /v1 routes and serves this machine

    def __init__(self, address: tuple[str, int], pairs: list[dict], output_path: str):
        self.pairs = check_pairs(pairs)
        self.votes_path = Path(output_path) / VOTES_FILE
        self.votes_path.parent.mkdir(parents=True, exist_ok=True)
        cut_torn_line(self.votes_path)
        votes = read_votes(self.votes_path)
        check_votes_match(votes, self.pairs, self.votes_path)
        self.votes = last_votes(votes)
        self.lock = threading.Lock()  # one vote written at a time, and no report read halfway through a write
        self.page = HUMAN_PAGE.read_bytes()
        self.votes_fd = os.open(self.votes_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # last: a failed bind calls server_close, which closes votes_fd
            super().__init__(address, HumanHandler)
        except OSError as e:
            raise OSError(f"cannot listen on {address[0]}:{address[1]}: {e.strerror}") from None

    def server_close(self) -> None:
        super().server_close()
        os.close(self.votes_fd)

    def pair_for(self, rater: str, position: int | None) -> dict:
        """What the page shows rater: the pair at position in rater's order (default: the first not yet rated,
        the total when all are), with the answers in rater's order and rater's vote on it, if any."""
        order = rater_order(rater, list(self.pairs))
        done = sum((rater, instruction) in self.votes for instruction in order)
        if position is None:
            position = next((i for i, x in enumerate(order) if (rater, x) not in self.votes), len(order))
        elif not 0 <= position < len(order):
            raise RequestError(f"'position' must be in [0, {len(order)}), got {position}")
        shown = {"rater": rater, "position": position, "total": len(order), "done": done}
        if position == len(order):
            return shown
        instruction = order[position]
        pair, vote = self.pairs[instruction], self.votes.get((rater, instruction))
        outputs = [pair["output_1"], pair["output_2"]]
        if model_shown_first(rater, instruction):
            outputs.reverse()
        return shown | {"instruction": instruction, "outputs": outputs, "choice": vote and vote.get("choice")}

    def record(self, rater: str, instruction: str, choice: str) -> None:
        """Appends the vote to the votes file in one write, flushed to disk before it counts."""
        model_first = model_shown_first(rater, instruction)
        vote = self.pairs[instruction] | {
            "rater": rater,
            "shown_first": "model" if model_first else "reference",
            "choice": choice,
            "preference": preference(choice, model_first),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        line = (json.dumps(vote, ensure_ascii=False) + "\n").encode()
        with self.lock:
            written = os.write(self.votes_fd, line)
            if written < len(line):  # a full disk: take the part back, so the file stays whole lines
                os.ftruncate(self.votes_fd, os.fstat(self.votes_fd).st_size - written)
                raise OSError(f"only {written} of {len(line)} bytes written to {self.votes_path}")
            os.fsync(self.votes_fd)
            self.votes[rater, instruction] = vote

    def report(self) -> str:
        with self.lock:
            return human_report(str(self.votes_path.parent))


def check_pairs(pairs: list[dict]) -> dict[str, dict]:
    """The pairs by instruction, each with just the PAIR_FIELDS, all strings."""
    if not pairs:
        raise ValueError("no pairs to compare")
    by_instruction = {}
    for i, pair in enumerate(pairs):
        if not all(isinstance(pair.get(name), str) for name in PAIR_FIELDS):
            raise ValueError(f"pair {i}: needs string fields {', '.join(PAIR_FIELDS)}")
        if pair["instruction"] in by_instruction:
            raise ValueError(f"pair {i}: the instruction {pair['instruction'][:80]!r} comes twice")
        by_instruction[pair["instruction"]] = {name: pair[name] for name in PAIR_FIELDS}
    return by_instruction


def check_votes_match(votes: list[dict], pairs: dict[str, dict], path: Path) -> None:
    """Every vote on file must be on one of these pairs, answers included: votes on other answers (another
    model, or the same one generated again) would be counted as if they were on these."""
    for vote in votes:
        pair = pairs.get(vote["instruction"])
        if pair is None or any(vote[name] != pair[name] for name in PAIR_FIELDS):
            raise ValueError(
                f"{path} holds votes on other pairs than these (instruction {vote['instruction'][:60]!r},"
                f" {vote['generator_2']} against {vote['generator_1']}): give another output path"
            )


class HumanHandler(Handler):
    """serve.py's JSON handling and errors ({"error": {"message", "type"}}), with the page's routes."""

    server: HumanServer

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        try:
            if url.path == "/":
                self.send_body(200, self.server.page, "text/html; charset=utf-8")
            elif url.path == "/pair":
                query = {name: values[-1] for name, values in parse_qs(url.query).items()}
                position = query.get("position")
                if position is not None and not position.isdecimal():
                    raise RequestError(f"'position' must be an integer >= 0, got {position!r}")
                rater = rater_name(query.get("rater"))
                self.send_json(200, self.server.pair_for(rater, None if position is None else int(position)))
            elif url.path == "/report":
                try:
                    report = self.server.report()
                except ValueError as e:  # no votes yet
                    raise RequestError(str(e), 404) from None
                self.send_json(200, {"report": report})
            else:
                self.send_route_error(url.path)
        except RequestError as e:
            self.send_error(e.status, str(e))

    def do_POST(self) -> None:
        route = urlsplit(self.path).path
        if route != "/vote":
            self.send_route_error(route)
            return
        try:
            body = self.read_json()
            rater = rater_name(body.get("rater"))
            instruction, choice = body.get("instruction"), body.get("choice")
            if not isinstance(instruction, str) or instruction not in self.server.pairs:
                raise RequestError(f"'instruction' must be one of the pairs' instructions, got {instruction!r:.100}")
            if choice not in CHOICES:
                raise RequestError(f"'choice' must be one of {', '.join(map(repr, CHOICES))}, got {choice!r:.100}")
            self.server.record(rater, instruction, choice)
            self.send_json(200, self.server.pair_for(rater, None))
        except RequestError as e:
            self.send_error(e.status, str(e))
        except OSError as e:
            self.send_error(500, f"the vote was not recorded: {e}")

    def send_route_error(self, route: str) -> None:
        if route in ROUTES:
            self.send_error(405, f"{route} takes {ROUTES[route]}, not {self.command}")
        else:
            self.send_error(404, f"no route {route}: try {', '.join(ROUTES)}")


def rater_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise RequestError("'rater' must be the rater's name, a non-empty string")
    if len(name.strip()) > MAX_RATER_CHARS:
        raise RequestError(f"'rater' must be at most {MAX_RATER_CHARS} characters")
    return name.strip()


def build_human_server(pairs: list[dict], output_path: str, host: str = "127.0.0.1", port: int = 0) -> HumanServer:
    """Binds the page's server for pairs ({instruction, output_1, generator_1, output_2, generator_2}, output_1
    being the reference's), reading the votes already in output_path; serve_forever() then serves, and
    server_close() ends it. Raises ValueError on bad pairs or a votes file of another comparison, OSError if the
    address cannot be bound."""
    return HumanServer((host, port), pairs, output_path)
