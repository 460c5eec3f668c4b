"""LLM-judge rewards (data_agents_eval.md C2-C4; issue 4 part 4).

A *backend* turns a prompt into k sampled texts: :class:`HFJudge` (any local transformers causal LM,
given as a model + tokenizer object or loaded by name) or :class:`OpenAIJudge` (an OpenAI-compatible
``/v1/chat/completions`` endpoint over urllib). :class:`Judge` wraps a backend with parsing, majority
over the k samples and counters: a backend error or an unparsable judgement is counted and turns into
None (a failed reward), never an exception in the training loop.

Judgements built on it:

* :class:`AnswerJudge` (C2): rule verifier first, then the judge on the *extracted final answer only*
  (never the reasoning), after pre-filters that reject empty, symbol-only, instruction-like, enumerated,
  negated or over-long answers without calling the judge; optional agreement of both answer orders.
* :class:`RubricJudge` (C3): one atomic question per criterion, credit only with an evidence quote
  found in the response, r = Σ w_k s_k / Σ_{w_k>0} w_k clipped to [−1, 1].
* :class:`PairwiseRubricJudge` (C4, RPO): per criterion both orders; inconsistent verdicts dropped;
  r = 1 / 0 / 0.5 for a weighted win / loss / tie against a reference response.
* :class:`ScoreJudge`: a scored rating (e.g. 1-10) normalised to [0, 1].
* :func:`rubric_internalization_gap` (C3 diagnostic).

Registered rewards: ``judge_answer``, ``judge_rubric``, ``judge_pairwise``, ``judge_score``.
"""


from policylab.rewards.judges.backends import HFJudge, Judge, JudgeStats, OpenAIJudge
from policylab.rewards.judges.rewards import (
    cached_judge,
    judge_answer,
    judge_pairwise,
    judge_rubric,
    judge_score,
    judge_stats,
)
from policylab.rewards.judges.verdicts import (
    EQUIVALENCE_TEMPLATE,
    PAIRWISE_TEMPLATE,
    RUBRIC_TEMPLATE,
    SCORE_TEMPLATE,
    AnswerJudge,
    PairwiseRubricJudge,
    RubricJudge,
    ScoreJudge,
    extract_final_answer,
    majority,
    parse_choice,
    parse_evidence,
    parse_rubric,
    parse_score,
    parse_verdict,
    reject_reason,
    rubric_internalization_gap,
)
