"""Prompts, stop sequences and post-processing, as the benchmarks' own harnesses define them.

- HumanEval (and HumanEval+): the model continues the function from its prompt (signature + docstring); the
  completion is cut at the Codex paper's stop sequences (a new top-level statement), plus decorators and a
  closing code fence.
- MBPP: zero-shot, the task text and its three test asserts in a docstring (evalplus' base-model prompt); or
  the 3-shot prompt of Austin et al. (2021) with tasks 2, 3 and 4 as examples, ``[BEGIN]`` ... ``[DONE]``.
- stdin/stdout problems: the statement, then an open ```` ```python ```` fence; the code ends at the closing fence.
- Chat models (``--chat``): the prompt goes into the chat template with an instruction, no stop sequences,
  and the code is taken from the fenced block of the answer.
"""
from __future__ import annotations

import re

HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```")
MBPP_STOP = ("\nassert", '\n"""', "\nprint(", "\nif __name__", "\n```")
MBPP_FEWSHOT_STOP = ("[DONE]", "\n```")
STDIO_STOP = ("\n```",)

MBPP_FEWSHOT_IDS = (2, 3, 4)  # the "prompt" split examples of Austin et al. (2021)

CHAT_INSTRUCTION = ("Complete the following Python code. Answer with the complete code, functions and "
                    "imports included, in one ```python code block.")
CHAT_INSTRUCTION_STDIO = ("Solve the following problem in Python 3. The program reads from standard input and "
                          "writes to standard output. Answer with the complete program in one ```python code "
                          "block.")

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:\n```|\Z)", re.DOTALL | re.IGNORECASE)


def truncate_at_stop(text: str, stop) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def extract_code(text: str, entry_point: str | None = None) -> str | None:
    """The code of a fenced block in ``text``: the first one that defines ``entry_point`` if any does, else the
    first one; None when there is no fence. An unclosed final fence runs to the end of the text."""
    blocks = _FENCE.findall(text)
    if not blocks:
        return None
    if entry_point:
        pattern = re.compile(rf"^\s*(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for block in blocks:
            if pattern.search(block):
                return block
    return blocks[0]


def postprocess(generation: str, stop, *, chat: bool = False, entry_point: str | None = None) -> str:
    """The completion to execute from a raw generation.

    Completion style: cut at the first stop sequence; if what is left opens with a code fence, take the fenced
    code. Chat style: the fenced code of the answer (the whole answer when it has no fence).
    """
    if chat:
        code = extract_code(generation, entry_point)
        return code if code is not None else generation
    text = truncate_at_stop(generation, stop)
    if text.lstrip().startswith("```"):
        code = extract_code(text.lstrip(), entry_point)
        if code is not None:
            return code
    return text


def mbpp_zero_shot_prompt(text: str, test_list) -> str:
    """evalplus' base-model MBPP prompt: the task and its test asserts inside a docstring."""
    tests = "\n".join(test_list)
    return f'"""\n{text.strip()}\n{tests}\n"""\n'


def mbpp_fewshot_block(text: str, test_list, code: str | None) -> str:
    """One example (with code) or the query (code None) of the 3-shot prompt of Austin et al. (2021)."""
    tests = "\n".join(test_list)
    head = (f"You are an expert Python programmer, and here is your task: {text.strip()} Your code should pass "
            f"these tests:\n\n{tests}\n[BEGIN]\n")
    return head if code is None else f"{head}{code.strip()}\n[DONE]\n"


def mbpp_fewshot_prompt(examples, text: str, test_list) -> str:
    """3-shot MBPP prompt; ``examples``: (text, test_list, code) of the prompt-split tasks 2, 3, 4."""
    return "".join(mbpp_fewshot_block(*ex) for ex in examples) + mbpp_fewshot_block(text, test_list, None)


def stdio_prompt(statement: str, starter_code: str = "") -> str:
    """A competitive-programming prompt that ends in an open Python fence."""
    parts = [statement.strip(), "",
             "Write a Python 3 program that reads the input from standard input and writes the answer to "
             "standard output."]
    if starter_code.strip():
        parts += ["Use this starter code:", "```python", starter_code.rstrip(), "```"]
    parts += ["", "```python", ""]
    return "\n".join(parts)


def chat_messages(prompt: str, *, stdio: bool = False) -> list[dict]:
    """The user turn for chat models: instruction plus the benchmark prompt."""
    instruction = CHAT_INSTRUCTION_STDIO if stdio else CHAT_INSTRUCTION
    body = prompt.rstrip()
    if stdio:
        body = body.removesuffix("```python").rstrip()
        return [{"role": "user", "content": f"{instruction}\n\n{body}"}]
    return [{"role": "user", "content": f"{instruction}\n\n```python\n{body}\n```"}]
