"""Alpaca instruction data: JSON records -> prompts -> token ids and masked labels -> batches."""

IGNORE_INDEX = -100  # labels that are not supervised; also PyTorch cross_entropy's default ignore_index

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca source text; the with-input template whenever input != "" (even "No input")."""
    if input != "":
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)
