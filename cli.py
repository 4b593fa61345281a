"""What every command line here shares: a user error is one line on stderr and a non-zero exit, never a usage
dump or a traceback."""

import argparse
import contextlib
import sys
from collections.abc import Iterator


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose parse errors (an unknown flag, a bad value) raise ValueError, which the script's main
    reports in one line like every other user error."""

    def error(self, message: str) -> None:
        raise ValueError(message)


def str2bool(value: str) -> bool:
    """`--flag True` / `--flag False`, as Hugging Face's TrainingArguments spell booleans."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


# Each range as the error message states it, and its test.
RANGES = {
    ">= 0": lambda value: value >= 0,
    ">= 1": lambda value: value >= 1,
    "> 0": lambda value: value > 0,
    "in (0, 1]": lambda value: 0 < value <= 1,
    "in [0, 1)": lambda value: 0 <= value < 1,
}


def check_ranges(args: argparse.Namespace, ranges: dict[str, str]) -> None:
    """Raises ValueError naming the first flag whose value is outside its range, e.g. {"top_p": "in (0, 1]"};
    a flag left unset (None) passes. NaN is in no range."""
    for flag, bounds in ranges.items():
        value = getattr(args, flag)
        if value is not None and not RANGES[bounds](value):
            raise ValueError(f"--{flag} must be {bounds}, got {value}")


@contextlib.contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Around a command line's work: a user error (ValueError, OSError) exits 1 with its one line on stderr, and
    Ctrl-C exits 130, both without a traceback."""
    try:
        yield
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
