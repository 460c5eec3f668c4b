"""What a judge is asked and how its answers become rewards (data_agents_eval.md C2-C4).

* :class:`AnswerJudge` (C2): rule verifier first, then the judge on the *extracted final answer only*
  (never the reasoning), after pre-filters that reject empty, symbol-only, instruction-like, enumerated,
  negated or over-long answers without calling the judge; optional agreement of both answer orders.
* :class:`RubricJudge` (C3): one atomic question per criterion, credit only with an evidence quote
  found in the response, r = Σ w_k s_k / Σ_{w_k>0} w_k clipped to [−1, 1].
* :class:`PairwiseRubricJudge` (C4, RPO): per criterion both orders; inconsistent verdicts dropped;
  r = 1 / 0 / 0.5 for a weighted win / loss / tie against a reference response.
* :class:`ScoreJudge`: a scored rating (e.g. 1-10) normalised to [0, 1].
* :func:`rubric_internalization_gap` (C3 diagnostic).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Callable

from policylab import registry
from policylab.rewards.judges.backends import Judge

# --------------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------------
EQUIVALENCE_TEMPLATE = (
    "You check whether two final answers to a question are equivalent.\n"
    "Question: {question}\nFirst answer: {first}\nSecond answer: {second}\n"
    "Are the two answers equivalent (the same value, set or expression)? "
    'Reply with one line: "Verdict: YES" or "Verdict: NO".'
)
RUBRIC_TEMPLATE = (
    "You judge whether a response satisfies one criterion.\n"
    "Question: {question}\nResponse: {response}\nCriterion: {criterion}\n"
    "Reply with two lines:\nVerdict: YES or NO\n"
    'Evidence: "<an exact quote from the response that shows it>" (Evidence: none if there is none)'
)
PAIRWISE_TEMPLATE = (
    "You compare two responses on one criterion.\n"
    "Question: {question}\nResponse A: {a}\nResponse B: {b}\nCriterion: {criterion}\n"
    'Which response satisfies the criterion better? Reply with one line: "Choice: A", "Choice: B" or "Choice: TIE".'
)
SCORE_TEMPLATE = (
    "Rate the response to the question from {low} (worst) to {high} (best).\n"
    "Question: {question}\nReference answer: {reference}\nResponse: {response}\n"
    'Reply with one line: "Score: <number>".'
)


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------
def parse_verdict(text: str) -> str | None:
    """"yes"/"no" from ``Verdict: X`` (the last one), else from a lone yes or no; None if neither or both."""
    marked = re.findall(r"verdict\s*[:=]\s*\**\s*(yes|no)\b", text, re.IGNORECASE)
    if marked:
        return marked[-1].lower()
    words = {w.lower() for w in re.findall(r"\b(yes|no)\b", text, re.IGNORECASE)}
    return words.pop() if len(words) == 1 else None


def parse_choice(text: str) -> str | None:
    """"A"/"B"/"TIE" from ``Choice: X`` (the last one) or a reply that is only that word."""
    marked = re.findall(r"choice\s*[:=]\s*\**\s*(a|b|tie)\b", text, re.IGNORECASE)
    if marked:
        return marked[-1].upper()
    bare = text.strip().strip(".*\"'").upper()
    return bare if bare in ("A", "B", "TIE") else None


def parse_score(text: str, low: float, high: float) -> float | None:
    """The number after ``Score:`` (the last one), or a reply that is only a number, inside [low, high]."""
    marked = re.findall(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE)
    candidate = marked[-1] if marked else text.strip().rstrip(".")
    try:
        value = float(candidate)
    except ValueError:
        return None
    return value if low <= value <= high and math.isfinite(value) else None


def parse_evidence(text: str) -> str | None:
    """The quoted evidence after ``Evidence:``; None if absent or "none"."""
    found = re.search(r"evidence\s*[:=]\s*(.+)", text, re.IGNORECASE | re.DOTALL)
    if not found:
        return None
    quote = found.group(1).strip().splitlines()[0].strip()
    quoted = re.match(r"[\"“'](.+?)[\"”']\s*$", quote)
    quote = (quoted.group(1) if quoted else quote).strip()
    return None if not quote or quote.lower().strip(".") in ("none", "n/a", "no evidence") else quote


def majority(values: list, tie_value):
    """Most common non-None value; ``tie_value`` on a tie for first place; None if nothing parsed."""
    counts = Counter(v for v in values if v is not None).most_common()
    if not counts:
        return None
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return tie_value
    return counts[0][0]


# --------------------------------------------------------------------------------------------------
# C2: answer equivalence with pre-filters
# --------------------------------------------------------------------------------------------------
_SPECIAL_TOKENS = re.compile(r"<\|[^|>]*\|>|</?s>|<(?:pad|unk|eos|bos)>", re.IGNORECASE)
_SYMBOLS_ONLY = re.compile(r"[\s{}\[\]()<>.,;:!?'\"`|\\/_~^*&%$#@=+\-]*")
_INSTRUCTION_LIKE = re.compile(r"ignore|judge|grader|grading|\bcorrect\b|incorrect|verdict|reference|\bmatch(es)?\b|"
                               r"instruction|evaluat|assistant|system prompt|answer is right|\bscore\b", re.IGNORECASE)
_NEGATION = re.compile(r"\b(not|isn't|is not|never|cannot|can't)\b", re.IGNORECASE)


def extract_final_answer(completion: str) -> str:
    """The final answer only: ``<answer>`` content, else the last ``\\boxed{..}``, else the text after
    the last "answer is"/"answer:", else the last non-empty line."""
    tagged = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL | re.IGNORECASE)
    if tagged:
        return tagged[-1].strip()
    start = completion.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(completion)):
            depth += {"{": 1, "}": -1}.get(completion[j], 0)
            if depth == 0:
                return completion[i:j].strip()
        return completion[i:].strip()
    phrase = list(re.finditer(r"answer(?: is|:)\s*(.+)", completion, re.IGNORECASE))
    if phrase:
        return phrase[-1].group(1).strip().splitlines()[0].strip()
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def reject_reason(answer: str, max_chars: int = 200, max_items: int = 8) -> str | None:
    """Why an extracted answer must score 0 without a judge call (C2 pre-filters), or None."""
    stripped = _SPECIAL_TOKENS.sub("", answer).strip()
    if not stripped:
        return "empty"
    if len(answer) > max_chars:
        return "too_long"
    if _SYMBOLS_ONLY.fullmatch(stripped):
        return "symbols_only"
    if _INSTRUCTION_LIKE.search(stripped):
        return "instruction_like"
    if _NEGATION.search(stripped):
        return "negation"
    items = [p for p in re.split(r"[,;]|\bor\b", stripped) if p.strip()]
    if len(items) > max_items or (len(items) >= 3 and re.search(r"…|\.\.\.|\\ldots|\\cdots", stripped)):
        return "enumeration"
    return None


class AnswerJudge:
    """C2 hybrid verifier as a reward: 1.0 if the rule reward says correct; otherwise the judge sees
    the question, the gold answer and the extracted final answer (≤ ``max_answer_chars``) and must say
    YES (majority of k; ``swap_check`` also asks with the answers in the other order and needs both).
    Pre-filtered answers score 0 uncalled. None when the judge failed or nothing parsed."""

    def __init__(self, judge: Judge, *, rule_reward: str | Callable | None = "math_verify",
                 max_answer_chars: int = 200, max_items: int = 8, swap_check: bool = False,
                 template: str = EQUIVALENCE_TEMPLATE):
        self.judge, self.max_answer_chars, self.max_items = judge, max_answer_chars, max_items
        self.rule = registry.build("reward", rule_reward) if isinstance(rule_reward, str) else rule_reward
        self.swap_check, self.template = swap_check, template

    def __call__(self, prompt: str, completion: str, row: dict) -> float | None:
        if "answer" not in row:
            raise KeyError("judge_answer needs an 'answer' column in the task row")
        if self.rule is not None:
            ruled = self.rule(prompt, completion, row)
            if ruled is not None and ruled >= 1.0:
                return 1.0
        answer = extract_final_answer(completion)
        reason = reject_reason(answer, self.max_answer_chars, self.max_items)
        if reason is not None:
            self.judge.stats.count_prefiltered(reason)
            return 0.0
        orders = [(str(row["answer"]), answer)] + ([(answer, str(row["answer"]))] if self.swap_check else [])
        for first, second in orders:
            verdicts = self.judge.ask(self.template.format(question=prompt, first=first, second=second), parse_verdict)
            verdict = None if verdicts is None else majority(verdicts, tie_value="no")
            if verdict is None:
                return None
            if verdict != "yes":
                return 0.0
        return 1.0


# --------------------------------------------------------------------------------------------------
# C3 / C4: rubrics
# --------------------------------------------------------------------------------------------------
def parse_rubric(rubric) -> list[tuple[str, float]]:
    """``[(criterion, weight)]`` from a list of strings (weight 1), ``[text, weight]`` pairs or
    ``{"criterion": text, "weight": w}`` dicts (JSON text accepted)."""
    if isinstance(rubric, str):
        try:
            rubric = json.loads(rubric)
        except ValueError as err:
            raise ValueError(f"rubric is a string that is not a JSON list: {rubric[:80]!r}") from err
    if not isinstance(rubric, (list, tuple)):
        raise ValueError(f"rubric must be a list of criteria, got {type(rubric).__name__}")
    out = []
    for i, item in enumerate(rubric):
        if isinstance(item, str):
            out.append((item, 1.0))
        elif isinstance(item, dict) and "criterion" in item:
            out.append((str(item["criterion"]), float(item.get("weight", 1.0))))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            out.append((str(item[0]), float(item[1])))
        else:
            raise ValueError(f"rubric item #{i} must be a string, [text, weight] or {{criterion, weight}}: {item!r:.80}")
    return out


def _normalised(text: str) -> str:
    return " ".join(text.casefold().split())


class RubricJudge:
    """C3: r = Σ_k w_k·s_k / Σ_{w_k>0} w_k, clipped to [−1, 1] (normalisation: the spec's assumption).
    s_k = 1 when the majority of k samples say YES *with* an evidence quote found in the response
    (``require_evidence``); negative weights are pitfalls. None if any criterion could not be judged."""

    def __init__(self, judge: Judge, *, require_evidence: bool = True, template: str = RUBRIC_TEMPLATE):
        self.judge, self.require_evidence, self.template = judge, require_evidence, template

    def criterion_met(self, question: str, response: str, criterion: str) -> bool | None:
        haystack = _normalised(response)

        def read(text: str):
            verdict = parse_verdict(text)
            if verdict == "yes" and self.require_evidence:
                quote = parse_evidence(text)
                if quote is None or _normalised(quote) not in haystack:
                    return "no"  # a yes without a real quote earns nothing
            return verdict

        votes = self.judge.ask(self.template.format(question=question, response=response, criterion=criterion), read)
        verdict = None if votes is None else majority(votes, tie_value="no")
        return None if verdict is None else verdict == "yes"

    def score(self, question: str, response: str, rubric) -> float | None:
        criteria = parse_rubric(rubric)
        positive = sum(w for _, w in criteria if w > 0)
        if positive <= 0:
            raise ValueError("rubric needs at least one criterion with a positive weight")
        total = 0.0
        for criterion, weight in criteria:
            met = self.criterion_met(question, response, criterion)
            if met is None:
                return None
            total += weight * met
        return max(-1.0, min(1.0, total / positive))


class PairwiseRubricJudge:
    """C4 (RPO): per criterion, ask with the candidate as A and as B; keep the verdict only if both
    orders agree. r = 1 if the candidate wins the weighted vote over kept criteria, 0 if it loses,
    0.5 on a tie (also when nothing was kept). None if no criterion could be parsed in either order."""

    def __init__(self, judge: Judge, *, template: str = PAIRWISE_TEMPLATE):
        self.judge, self.template = judge, template
        self.inconsistent = 0

    def _choice(self, question, a, b, criterion):
        votes = self.judge.ask(self.template.format(question=question, a=a, b=b, criterion=criterion), parse_choice)
        return None if votes is None else majority(votes, tie_value="TIE")

    def score(self, question: str, response: str, reference: str, rubric) -> float | None:
        balance, judged = 0.0, 0
        for criterion, weight in parse_rubric(rubric):
            first = self._choice(question, response, reference, criterion)
            second = self._choice(question, reference, response, criterion)
            if first is None or second is None:
                continue
            judged += 1
            as_first = {"A": 1, "B": -1, "TIE": 0}[first]
            as_second = {"A": -1, "B": 1, "TIE": 0}[second]
            if as_first != as_second:
                self.inconsistent += 1
                continue
            balance += weight * as_first
        if judged == 0:
            return None
        return 1.0 if balance > 0 else 0.0 if balance < 0 else 0.5


class ScoreJudge:
    """A rating on [low, high] (mean over the k parsed samples), normalised to [0, 1]."""

    def __init__(self, judge: Judge, *, low: float = 1.0, high: float = 10.0, template: str = SCORE_TEMPLATE):
        if not high > low:
            raise ValueError(f"score scale needs high > low, got [{low}, {high}]")
        self.judge, self.low, self.high, self.template = judge, float(low), float(high), template

    def score(self, question: str, response: str, reference: str = "") -> float | None:
        prompt = self.template.format(question=question, response=response, reference=reference, low=self.low,
                                      high=self.high)
        votes = self.judge.ask(prompt, lambda text: parse_score(text, self.low, self.high))
        parsed = [v for v in votes or [] if v is not None]
        if not parsed:
            return None
        return (sum(parsed) / len(parsed) - self.low) / (self.high - self.low)


def rubric_internalization_gap(model, tokenizer, prompts: list[str], responses: list[str], rubric: str) -> float:
    """C3 diagnostic: mean_y [(log π(y | x, R) − log π(y | x)) / |y|], the rubric put before the prompt.
    0 when the rubric is empty; a training-time monitor, no effect on rewards."""
    import torch

    def mean_logp(context: str, response: str) -> float:
        context_ids = tokenizer(context, return_tensors="pt")["input_ids"]
        response_ids = tokenizer(response, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = torch.cat([context_ids, response_ids], dim=1).to(model.device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, context_ids.shape[1] - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, response_ids[0].to(model.device)[:, None])
        return float(logp.mean())

    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many prompts as responses (got {len(prompts)} and {len(responses)}), at least one")
    gaps = [mean_logp(f"{rubric}\n\n{x}" if rubric else x, y) - mean_logp(x, y) for x, y in zip(prompts, responses)]
    return sum(gaps) / len(gaps)
