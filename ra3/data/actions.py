"""Split a code document into actions: one source line each (the paper's choice) or blank-line-separated blocks.

Decision points sit at action boundaries. Joining the actions with "\\n" gives back the document (with its
line endings normalised to "\\n" and one trailing newline dropped), so no character is lost or invented.
"""
from __future__ import annotations

ACTION_UNITS = ("line", "block")


def split_actions(text: str, unit: str = "line") -> list[str]:
    """Actions of ``text`` without their separating newlines.

    unit: 'line' (every source line is an action, empty lines included) or 'block' (maximal runs of non-blank
    lines; blank lines join the block that follows them, so a block may start with "\\n").
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if unit not in ACTION_UNITS:
        raise ValueError(f"unit must be one of {ACTION_UNITS}, got {unit!r}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.endswith("\n"):
        text = text[:-1]
    if not text:
        return []
    lines = text.split("\n")
    if unit == "line":
        return lines
    blocks, current, seen_code = [], [], False
    for line in lines:
        blank = not line.strip()
        if blank and seen_code:
            # a blank line after code closes the block; it opens the next one
            blocks.append("\n".join(current))
            current, seen_code = [line], False
            continue
        current.append(line)
        seen_code = seen_code or not blank
    if current:
        blocks.append("\n".join(current))
    return blocks

