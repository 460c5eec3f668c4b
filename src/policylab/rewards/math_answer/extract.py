"""Answer extraction from a model response (data_agents_eval.md §C1.1 step 1).

Priority, best first:

1. the **last** ``\\boxed{…}`` / ``\\fbox{…}`` (brace matching, whitespace allowed before the brace); boxes
   that sit close together — separated only by ``,`` ``;`` ``and`` ``or`` or by fewer than 10 characters —
   are joined into one multi-answer.  An unclosed last box yields nothing (rows ``box-unclosed``), an
   empty box yields nothing (row ``box-empty``): once the response boxed something, we never fall back to
   guessing from the prose;
2. anchored phrases: "final answer is … I hope", "final answer … is", "answer:", "answer is/=";
3. LaTeX math environments ``$$…$$``, ``\\[…\\]``, ``\\(…\\)``, single-line ``$…$``, bare ``\\frac{a}{b}``;
4. plain numbers (with an optional percent word/sign).

Within a level the right-most match comes first.  The extractor returns *candidates*; the verifier parses
them in order and the first that parses wins.  Levels 2–4 only look at the last ``window`` characters
(default 4000) so a 10 MB response costs a few ``rfind`` calls, not a regex scan of 10 MB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BOX_COMMANDS = (r"\boxed", r"\fbox")
MAX_BOX_CHARS = 20_000  # a "box" longer than this is not an answer; it is treated as unclosed
MAX_CANDIDATES = 8


@dataclass(frozen=True)
class Extraction:
    """Candidate answer strings (best first) and the rule that produced them.

    ``rule`` is one of ``boxed``, ``boxed_multi``, ``anchor``, ``latex``, ``number``, ``gold``, and for
    an empty result ``no_answer``, ``empty_box``, ``unclosed_box``, ``hedged`` (the answer is followed by a
    hedge such as "; or maybe 6").
    """

    candidates: tuple[str, ...]
    rule: str

    @property
    def found(self) -> bool:
        return bool(self.candidates)


def matching_brace(text: str, open_at: int, limit: int = MAX_BOX_CHARS) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at`` (escaped ``\\{``/``\\}`` ignored), or None."""
    depth = 0
    end = min(len(text), open_at + limit)
    i = open_at
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


@dataclass(frozen=True)
class _Box:
    start: int  # index of the backslash of \boxed
    end: int | None  # index after the closing brace, None if unclosed
    content: str


def _box_at(text: str, start: int, command: str) -> _Box | None:
    """The box whose command starts at ``start``; None if the command is not followed by ``{``."""
    i = start + len(command)
    if i < len(text) and text[i].isalpha():  # "\boxedx" is another command
        return None
    while i < len(text) and text[i] in " \t\n":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    close = matching_brace(text, i)
    if close is None:
        return _Box(start, None, "")
    return _Box(start, close + 1, text[i + 1 : close])


def _previous_box(text: str, before: int) -> _Box | None:
    """The right-most box that starts before index ``before``."""
    while before > 0:
        positions = [(text.rfind(cmd, 0, before), cmd) for cmd in BOX_COMMANDS]
        start, command = max(positions)
        if start < 0:
            return None
        box = _box_at(text, start, command)
        if box is not None:
            return box
        before = start
    return None


_JOINER = re.compile(r"^[\s$]*(?:,|;|\band\b|\bor\b|\\text\{\s*(?:and|or)\s*\}|\\quad|\\,|\\;)?[\s$]*$", re.IGNORECASE)


def _close_together(separator: str) -> bool:
    return len(separator) < 10 or bool(_JOINER.match(separator))


def _unwrap_nested_box(content: str) -> str:
    """``\\boxed{\\boxed{x}}`` -> ``x``."""
    while True:
        stripped = content.strip()
        for command in BOX_COMMANDS:
            if stripped.startswith(command):
                box = _box_at(stripped, 0, command)
                if box is not None and box.end == len(stripped):
                    content = box.content
                    break
        else:
            return content


def extract_boxed(text: str) -> Extraction | None:
    """The last box (joined with close-together earlier boxes), or None if the text has no box at all."""
    return _extract_boxed_with_end(text)[0]


def _extract_boxed_with_end(text: str) -> tuple[Extraction | None, int]:
    """:func:`extract_boxed` and the index after the last box (where a hedge would follow)."""
    last = _previous_box(text, len(text))
    if last is None:
        return None, len(text)
    if last.end is None:
        return Extraction((), "unclosed_box"), len(text)
    # a box nested inside an enclosing box: report the enclosing one's content (it is unwrapped below)
    enclosing = _previous_box(text, last.start)
    while enclosing is not None and enclosing.end is not None and enclosing.end >= last.end:
        last = enclosing
        enclosing = _previous_box(text, last.start)
    end = last.end
    contents = [_unwrap_nested_box(last.content)]
    current = last
    while len(contents) < 16:
        earlier = _previous_box(text, current.start)
        if earlier is None or earlier.end is None or earlier.end > current.start:
            break
        if not _close_together(text[earlier.end : current.start]):
            break
        contents.insert(0, _unwrap_nested_box(earlier.content))
        current = earlier
    contents = [c.strip() for c in contents]
    distinct = list(dict.fromkeys(c for c in contents if c))  # a repeated box is one answer, not two
    if not distinct:
        return Extraction((), "empty_box"), end
    if len(distinct) == 1:
        return Extraction((distinct[0],), "boxed"), end
    return Extraction((", ".join(distinct),), "boxed_multi"), end


_ANCHORS = (
    re.compile(r"final answer is\s*:?\s*(.+?)\s*\.?\s*I hope", re.IGNORECASE),
    re.compile(r"final answer[^\n]{0,40}?\bis\b\s*:?\s*([^\n]+)", re.IGNORECASE),
    re.compile(r"answer\s*:\s*([^\n]+)", re.IGNORECASE),
    re.compile(r"answer[^\n]{0,30}?\b(?:is|are|=|equals)\s*:?\s*([^\n]+)", re.IGNORECASE),
)
_LATEX_ENVS = (
    re.compile(r"\$\$([^$]{1,2000}?)\$\$"),
    re.compile(r"\\\[(.{1,2000}?)\\\]", re.DOTALL),
    re.compile(r"\\\((.{1,2000}?)\\\)"),
    re.compile(r"(?<![\\$])\$([^$\n]{1,500})\$(?!\$)"),
    re.compile(r"(\\frac\{[^{}]{1,100}\}\{[^{}]{1,100}\})"),
)
NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+"
_NUMBER_WITH_PERCENT = re.compile(r"(?<![\w.])(" + NUMBER + r")(\s*(?:\\?%|percent\b|percentage\b))?")
_SENTENCE_END = re.compile(r"(?<!\d)\.(?:\s|$)|\.\s|[;!?](?:\s|$)")


# A hedge right after the final answer, also across a sentence break ("5; or maybe 6", "\\boxed{5}. But I'm
# not sure."): the response offers more than one answer, so it states none (issue 12). Only the start of what
# follows the answer is looked at, so a later check ("Indeed 2 + 3 = 5") or "I hope it is correct" is no hedge.
_HEDGE_AFTER = re.compile(
    r"^[\s.,;:!?*$)\]]*(?:(?:but|though|although|and)\s*,?\s+)?(?:i'?m\s+|i\s+am\s+)?(?:"
    r"or\s*,?\s*(?:maybe|perhaps|possibly|probably|it\s+(?:could|might|may)\s+be|else|alternatively)\b"
    r"|or\s*[-+$\\(\d]"
    r"|(?:maybe|perhaps|possibly|probably|alternatively)\b"
    r"|(?:not\s+(?:sure|certain|confident)|unsure|uncertain)\b)",
    re.IGNORECASE,
)
HEDGE_WINDOW = 200


def hedged_after(rest: str) -> bool:
    """True when the text right after an answer starts by hedging it (see ``_HEDGE_AFTER``)."""
    return bool(_HEDGE_AFTER.match(rest[:HEDGE_WINDOW]))


def _anchor_sentence_end(capture: str) -> int:
    """Index in an anchor's capture where the answer's first sentence ends (what _anchor_candidates keeps)."""
    capture_start = len(capture) - len(capture.lstrip().lstrip("*_ "))
    cut = _SENTENCE_END.search(capture, capture_start)
    return cut.start() if cut else len(capture)


def _anchor_candidates(capture: str) -> list[str]:
    """Candidates from the text after an answer phrase: its math, its first sentence, its first number."""
    capture = capture.strip().strip("*_ ").strip()  # markdown emphasis around "**Answer:** 10"
    out: list[str] = []
    for pattern in _LATEX_ENVS[:4]:
        found = pattern.search(capture)
        if found:
            out.append(found.group(1))
            break
    cut = _SENTENCE_END.search(capture)
    sentence = capture[: cut.start()] if cut else capture
    out.append(sentence)
    number = _NUMBER_WITH_PERCENT.search(sentence)
    if number:
        out.append(number.group(0))
    return out


def extract_answer(text: str, *, window: int = 4000, think_end: str | None = "</think>") -> Extraction:
    """Candidate final answers of a model response, best first (C1.1 step 1)."""
    if think_end and think_end in text:
        text = text[text.rfind(think_end) + len(think_end) :]
    boxed, box_end = _extract_boxed_with_end(text)
    if boxed is not None:
        if boxed.found and hedged_after(text[box_end : box_end + HEDGE_WINDOW]):
            return Extraction((), "hedged")
        return boxed
    tail = text[-window:] if window and len(text) > window else text
    candidates: list[str] = []
    rule = None
    for pattern in _ANCHORS:
        matches = list(pattern.finditer(tail))
        if matches and rule is None:  # the right-most match of the best phrase is the answer; is it hedged?
            last = matches[-1]
            after = last.group(1)[_anchor_sentence_end(last.group(1)) :] + tail[last.end() : last.end() + HEDGE_WINDOW]
            if hedged_after(after):
                return Extraction((), "hedged")
        for match in reversed(matches):
            candidates.extend(_anchor_candidates(match.group(1)))
        if matches and rule is None:
            rule = "anchor"
        if len(candidates) >= MAX_CANDIDATES:
            break
    for pattern in _LATEX_ENVS:
        if len(candidates) >= MAX_CANDIDATES:
            break
        for match in reversed(list(pattern.finditer(tail))[-3:]):
            candidates.append(match.group(1))
            rule = rule or "latex"
    if len(candidates) < MAX_CANDIDATES:
        numbers = list(_NUMBER_WITH_PERCENT.finditer(tail))
        for match in reversed(numbers[-2:]):
            candidates.append(match.group(0))
            rule = rule or "number"
    candidates = [c.strip() for c in candidates if c.strip()]
    candidates = list(dict.fromkeys(candidates))[:MAX_CANDIDATES]
    if not candidates:
        return Extraction((), "no_answer")
    return Extraction(tuple(candidates), rule or "number")


def extract_gold(gold: str) -> Extraction:
    """Gold answers go through the same box logic, but an unboxed gold is taken whole, not searched."""
    gold = gold.strip()
    if any(cmd in gold for cmd in BOX_COMMANDS):
        boxed = extract_boxed(gold)
        if boxed is not None and boxed.found:
            return boxed
    if not gold:
        return Extraction((), "no_answer")
    return Extraction((gold,), "gold")
