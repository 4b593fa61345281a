"""What every command line here shares: a user error is one line on stderr and a non-zero exit, never a usage
dump or a traceback."""

import argparse


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
