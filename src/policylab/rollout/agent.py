"""The ``agent`` rollout engine: multi-turn episodes against environments, token in, token out
(data_agents_eval.md D0, "Agent loop" and "Training tensor construction").

Each turn, every still-active trajectory of the batch is decoded at once with the KV-cached sampler of
``hf_pruned`` (rollout/decode.py ``sample_from_cache``; identical contexts, e.g. the G copies of a prompt
at turn 0, are prefilled once) until it samples an end-of-turn id or writes a stop string (a tool-call
close tag). A turn without a separator (the per-turn token limit hit) is invalid and ends the trajectory.
The action text goes to the environment; the observation comes back as the chat template's message for
its role, tokenised once and appended. The response is the concatenation of [action tokens, separator]
(mask 1, the exact sampled ids with their behaviour log-probs) and [observation tokens] (mask 0), so the
training forward sees the same token sequence the sampler saw and nothing is decoded and re-encoded.

Recorded per trajectory (declared fields below): turn-end positions, turn rewards (sparse or dense),
final reward, return, success, number of turns, tool calls, format errors, invalid actions, termination
reason, the real-token mask (observations included, so the padded forward attends to them) and the
conversation. Fail-loud checks run on every batch: each turn's context must extend the previous turn's
tokens exactly, and a sample of trajectories is re-scored with the training forward; the max |log-prob
difference| against the behaviour log-probs is logged, warned about above ``drift_warn`` and stops the
run above ``drift_stop``.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache

from policylab.algo.turn_rewards import dense_turn_rewards, place_turn_rewards, sparse_turn_rewards
from policylab.environments.base import increments
from policylab.environments.tasks import build_environment
from policylab.fields import declare_field
from policylab.models.forward import policy_forward, trim
from policylab.models.kv_cache import cache_kwargs
from policylab.registry import register
from policylab.rollout.decode import PrunedDecodeEngine, sample_from_cache
from policylab.rollout.hf import TEMPERATURE_FACTOR, Sampling, eos_token_ids, format_request, mean_factor
from policylab.rollouts import Rollouts

OWNER = "rollout engine 'agent'"
FIELDS = (
    TEMPERATURE_FACTOR,
    declare_field("turn_end_positions", per_row=True, shape="list[B]", owner=OWNER,
                  doc="per row, the response index of each turn's last action token (its separator)"),
    declare_field("turn_rewards", per_row=True, shape="list[B]", owner="multi-turn rollout engine",
                  doc="per row, the per-turn rewards (sparse: the final reward on the last turn; dense: D0's "
                      "normalised increments); turns cut by truncation are dropped"),
    declare_field("token_rewards", per_row=True, shape="[B,T]", dtype="float", owner=OWNER,
                  doc="turn rewards placed on their turn-end tokens (D0 reward placement)"),
    declare_field("final_reward", per_row=True, shape="[B]", dtype="float", owner=OWNER,
                  doc="1 if the environment's exact success check passed, else 0; NaN after an env error"),
    declare_field("env_return", per_row=True, shape="[B]", dtype="float", owner=OWNER,
                  doc="the trajectory return: the sum of the placed turn rewards (NaN after an env error)"),
    declare_field("env_success", per_row=True, shape="[B]", dtype="float", owner=OWNER,
                  doc="1.0 where the environment's success check passed"),
    declare_field("num_turns", per_row=True, shape="[B]", dtype="long", owner=OWNER, doc="assistant turns taken"),
    declare_field("tool_calls", per_row=True, shape="[B]", dtype="any", owner="multi-turn rollout engine",
                  doc="tool calls executed in the trajectory"),
    declare_field("num_tool_calls", per_row=True, shape="[B]", dtype="long", owner=OWNER,
                  doc="tool calls executed (the name eval/evaluate.py reads)"),
    declare_field("format_errors", per_row=True, shape="[B]", dtype="long", owner=OWNER,
                  doc="tool calls that could not be parsed, named an unknown tool, had bad arguments or were over a limit"),
    declare_field("invalid_actions", per_row=True, shape="[B]", dtype="long", owner=OWNER,
                  doc="actions the environment could not use (info['invalid'])"),
    declare_field("termination", per_row=True, shape="list[B]", owner=OWNER,
                  doc="why the trajectory ended: done, max_turns, invalid_action, context_budget, "
                      "response_budget, env_error"),
    declare_field("completion_attention_mask", per_row=True, shape="[B,T]", dtype="float", owner=OWNER,
                  doc="1 on every real response token (actions and observations), 0 on padding"),
    declare_field("conversation", per_row=True, shape="list[B]", owner=OWNER,
                  doc="the episode as chat messages (role, content), for samples.jsonl"),
)
TERMINATIONS = ("done", "max_turns", "invalid_action", "context_budget", "response_budget", "env_error")


class AgentDriftError(RuntimeError):
    """Re-scored log-probs differ from the behaviour log-probs by more than ``drift_stop``."""


@dataclass
class Trajectory:
    env: Any
    row: dict
    prompt: list[int]
    messages: list[dict]
    response: list[int] = field(default_factory=list)
    mask: list[float] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    factor: list[float] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)
    raw_rewards: list[float] = field(default_factory=list)
    tool_calls: int = 0
    format_errors: int = 0
    invalid: int = 0
    termination: str | None = None
    error: str | None = None
    last_input: int = 0  # length of the context the previous turn was sampled from

    @property
    def done(self) -> bool:
        return self.termination is not None

    def context(self) -> list[int]:
        return self.prompt + self.response


class AgentEngine(PrunedDecodeEngine):
    """Multi-turn rollouts against an environment (D0): batched over all active trajectories, token-exact.

    ``environment``/``env_params``: the environment when the rows do not name one (the ``environment``
    task's rows do). ``max_turns``: assistant turns per episode; ``rollout.max_new_tokens`` bounds each
    turn. ``context_budget``: prompt + response tokens (0 = the model's max positions);
    ``max_response_tokens``: response tokens kept for training (0 = no cut). ``reward``: ``sparse`` (final
    reward on the last turn end) or ``dense`` (D0-normalised increments on every turn end).
    ``stop_strings``: besides the end-of-turn ids, texts that end a turn (default the tool-call close tag).
    """

    name = "agent"
    provides = FIELDS

    def __init__(self, environment: str = "", env_params: dict | None = None, max_turns: int = 4,
                 context_budget: int = 0, max_response_tokens: int = 0, reward: Literal["sparse", "dense"] = "sparse",
                 stop_strings: list[str] | None = None, drift_rows: int = 2, drift_warn: float = 0.01,
                 drift_stop: float = 1.0, draw: Literal["inverse_cdf", "multinomial"] = "inverse_cdf"):
        super().__init__(draw=draw)
        if max_turns < 1:
            raise ValueError("agent engine: max_turns must be >= 1")
        if reward not in ("sparse", "dense"):
            raise ValueError(f"agent engine: reward must be 'sparse' or 'dense', got {reward!r}")
        self.environment, self.env_params = environment, dict(env_params or {})
        self.max_turns, self.context_budget, self.max_response_tokens = max_turns, context_budget, max_response_tokens
        self.reward = reward
        self.stop_strings = list(stop_strings) if stop_strings is not None else ["</tool_call>"]
        self.drift_rows, self.drift_warn, self.drift_stop = drift_rows, drift_warn, drift_stop
        self.metrics: dict[str, float] = {}
        if environment:  # a misspelled environment fails when the recipe is built, not mid-run
            build_environment(environment, self.env_params, where="rollout.engine.env_params")

    @property
    def last_metrics(self) -> dict[str, float]:
        return dict(self.metrics)

    # -- the episode loop ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: list[dict], sampling: Sampling, *, group_offset: int = 0) -> Rollouts:
        if self.model is None:
            raise RuntimeError("agent engine: generate() before bind(model, tokenizer); call engine.bind(model, tokenizer) first")
        if not requests:
            raise ValueError("agent engine: generate() needs at least one request")
        rows = [r for r in requests for _ in range(sampling.group_size)]
        groups = torch.arange(len(requests)).repeat_interleave(sampling.group_size) + group_offset
        t0 = time.perf_counter()
        trajectories = [self._start(row, i // sampling.group_size + group_offset, i) for i, row in enumerate(rows)]
        self._check_shared_prompts(trajectories, groups)
        eot = self._end_of_turn_ids()
        budget = self.context_budget or int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        tool_seconds = 0.0
        for _ in range(self.max_turns):
            for tr in trajectories:
                if tr.done:
                    continue
                if self.max_response_tokens and len(tr.response) >= self.max_response_tokens:
                    tr.termination = "response_budget"
                elif len(tr.context()) + sampling.max_new_tokens > budget:
                    tr.termination = "context_budget"
            active = [tr for tr in trajectories if not tr.done]
            if not active:
                break
            sampled = self._sample_turn(active, sampling, eot)
            t_env = time.perf_counter()
            for tr, (ids, logps, factors, ended) in zip(active, sampled):
                self._take_turn(tr, ids, logps, factors, ended, eot, budget, sampling.max_new_tokens)
            tool_seconds += time.perf_counter() - t_env
        for tr in trajectories:
            if not tr.done:
                tr.termination = "max_turns"
        errors = [tr for tr in trajectories if tr.termination == "env_error"]
        if errors and len(errors) == len(trajectories):
            first = errors[0]
            raise RuntimeError(f"agent engine: every trajectory of the batch failed in environment "
                               f"{first.row.get('environment') or self.environment!r}; the first error: {first.error}")
        if all(not tr.response for tr in trajectories) and not errors:
            longest = max(len(tr.prompt) for tr in trajectories)
            warnings.warn(f"agent engine: no trajectory took a turn: the prompts (up to {longest} tokens) plus "
                          f"rollout.max_new_tokens={sampling.max_new_tokens} exceed the context budget of {budget} "
                          "tokens; shorten the environment's prompt (e.g. prompt_style: brief) or use a larger model",
                          stacklevel=2)
        out = self._to_rollouts(trajectories, groups, rows)
        self.metrics = self._metrics(out, trajectories, time.perf_counter() - t0, tool_seconds)
        if self.drift_rows:
            self.metrics.update(self.check_drift(out, sampling))
        return out

    def _start(self, row: dict, group: int, index: int) -> Trajectory:
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"agent engine: request {index} must be a task row with 'prompt'")
        name = self.environment or row.get("environment")
        if not name:
            raise ValueError(f"agent engine: request {index} names no environment; set rollout.engine.environment "
                             "or use the 'environment' task (task: {name: environment, environment: ...})")
        params = {**dict(row.get("env_params") or {}), **self.env_params}
        env = build_environment(name, params, where="rollout.engine.env_params")
        error, first = None, ""
        try:  # the G copies of a prompt share its seed, so they share its first observation (and prompt)
            first = env.reset(row, int(row.get("seed", group)))
        except Exception as err:  # noqa: BLE001 - an environment bug ends this trajectory, not the run
            error = f"{type(err).__name__} in reset: {err}"
        system = "\n\n".join(x for x in (row.get("system"), getattr(env, "instructions", "")) if x)
        user = str(row["prompt"]) + (f"\n{first}" if first else "")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = format_request(self.tokenizer, {"messages": messages}, index, self.name)
        prompt = self.tokenizer(text, add_special_tokens=False).input_ids
        tr = Trajectory(env=env, row=row, prompt=prompt, messages=messages)
        if error:
            tr.termination, tr.error = "env_error", error
        return tr

    def _check_shared_prompts(self, trajectories: list[Trajectory], groups: torch.Tensor) -> None:
        first: dict[int, list[int]] = {}
        for tr, g in zip(trajectories, groups.tolist()):
            if first.setdefault(g, tr.prompt) != tr.prompt:
                raise ValueError("agent engine: the trajectories of one prompt got different first observations from "
                                 f"{type(tr.env).__name__}.reset(row, seed); a group must share its prompt (the training "
                                 "forward runs it once), so reset must depend only on the row and the seed")

    def _end_of_turn_ids(self) -> set[int]:
        ids = set(eos_token_ids(self.model, self.tokenizer))
        for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return ids

    def _sample_turn(self, active: list[Trajectory], s: Sampling, eot: set[int]):
        """One turn for every active trajectory at once: (ids, logps, factors, ended) per trajectory."""
        device = next(self.model.parameters()).device
        contexts = []
        for tr in active:
            ctx = tr.context()
            if tr.last_input and len(ctx) < tr.last_input:
                raise AssertionError("agent engine: a context shrank between turns")
            contexts.append(ctx)
        slot = {tuple(c): i for i, c in enumerate(dict.fromkeys(tuple(c) for c in contexts))}
        distinct = [list(c) for c in slot]
        inverse = torch.tensor([slot[tuple(c)] for c in contexts], device=device)
        width = max(len(c) for c in distinct)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in distinct], device=device)
        attention = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in distinct], device=device)
        # the fail-loud prefix check: what the sampler reads is exactly the stored tokens, and each turn's
        # context extends the previous turn's (token-in, token-out; nothing was re-rendered)
        for tr, c in zip(active, contexts):
            row = ids[slot[tuple(c)]][attention[slot[tuple(c)]] > 0].tolist()
            if row != c or (tr.last_input and c[: tr.last_input] != (tr.prompt + tr.response)[: tr.last_input]):
                raise AssertionError("agent engine: a turn's input tokens differ from the trajectory's stored tokens")
            tr.last_input = len(c)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        was_training = self.model.training
        self.model.eval()
        try:
            cache = DynamicCache()
            logits = self.model(input_ids=ids, attention_mask=attention, position_ids=positions,
                                **cache_kwargs(self.model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
            if len(distinct) < len(contexts):
                cache.batch_select_indices(inverse)
            eos = torch.tensor(sorted(eot), device=device)
            tokens, logps, factors, lengths, ended = sample_from_cache(
                self.model, logits[inverse], cache, attention[inverse], positions[inverse][:, -1] + 1, s, eos,
                self.draw, self.name, stop=self._stop_check())
        finally:
            self.model.train(was_training)
        out = []
        for j in range(len(active)):
            n = int(lengths[j])
            out.append((tokens[j, :n].tolist(), logps[j, :n].tolist(), factors[j, :n].tolist(), bool(ended[j])))
        return out

    def _stop_check(self):
        if not self.stop_strings:
            return None
        window = max(len(x) for x in self.stop_strings)  # every token decodes to at least one character
        tok, stops = self.tokenizer, self.stop_strings

        def stop(active: torch.Tensor, t: int, tokens: torch.Tensor) -> torch.Tensor:
            tails = tok.batch_decode(tokens[active, max(0, t + 1 - window): t + 1].tolist())
            return torch.tensor([any(x in tail for x in stops) for tail in tails], device=tokens.device)

        return stop

    def _take_turn(self, tr: Trajectory, ids: list[int], logps: list[float], factors: list[float], ended: bool,
                   eot: set[int], budget: int, max_new: int) -> None:
        tr.response += ids
        tr.mask += [1.0] * len(ids)
        tr.logp += logps
        tr.factor += factors
        tr.turn_ends.append(len(tr.response) - 1)
        action = self.tokenizer.decode(ids, skip_special_tokens=True)
        tr.messages.append({"role": "assistant", "content": action})
        previous = tr.raw_rewards[-1] if tr.raw_rewards and tr.env.reward_mode == "cumulative" else 0.0
        if not ended:  # no separator within the turn's token limit: an invalid turn ends the trajectory
            tr.raw_rewards.append(previous)
            tr.termination = "invalid_action"
            return
        try:
            observation, done, reward, info = tr.env.step(action)
        except Exception as err:  # noqa: BLE001 - the trajectory ends as env_error; the batch goes on
            tr.raw_rewards.append(previous)
            tr.termination, tr.error = "env_error", f"{type(err).__name__} in step: {err}"
            return
        tr.raw_rewards.append(float(reward))
        tr.tool_calls += int(info.get("tool_calls", 0))
        tr.format_errors += int(info.get("format_errors", 0))
        tr.invalid += bool(info.get("invalid", False))
        if done:
            if observation:
                tr.messages.append({"role": info.get("role", "user"), "content": observation})
            tr.termination = "done"
            return
        role = info.get("role", "user")
        obs_ids = self.tokenizer(self.observation_text(observation, role, ended_with_eot=ids[-1] in eot),
                                 add_special_tokens=False).input_ids
        if len(tr.context()) + len(obs_ids) + max_new > budget:
            tr.termination = "context_budget"
            return
        tr.messages.append({"role": role, "content": observation})
        tr.response += obs_ids
        tr.mask += [0.0] * len(obs_ids)
        tr.logp += [0.0] * len(obs_ids)
        tr.factor += [1.0] * len(obs_ids)

    def observation_text(self, content: str, role: str, ended_with_eot: bool) -> str:
        """The text between an action and the next action: the template's end of the assistant turn (unless
        the action sampled it), the observation message for ``role`` and the next generation prompt.

        Rendered from a fixed two-message conversation with a marker as the assistant's content, so only the
        observation's own message (never a system block) and the template's separators are in it."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return f"\n{content}\n"
        marker = "\u2063AGENT-ACTION\u2063"
        for use_role in dict.fromkeys((role, "user")):
            try:
                text = tok.apply_chat_template([{"role": "user", "content": "u"}, {"role": "assistant", "content": marker},
                                                {"role": use_role, "content": content}], tokenize=False,
                                               add_generation_prompt=True)
                break
            except Exception:  # noqa: BLE001 - a template without a tool role: the observation is a user turn
                text = None
        if text is None or marker not in text:
            raise ValueError("agent engine: the chat template does not render an assistant message verbatim; "
                             "cannot place observations between actions")
        suffix = text[text.index(marker) + len(marker):]
        if ended_with_eot:
            eot_text = next((t for t in ("<|im_end|>", "<|eot_id|>", "<|end|>", tok.eos_token) if t and suffix.startswith(t)), "")
            suffix = suffix[len(eot_text):]
        return suffix

    # -- the batch -------------------------------------------------------------------------------
    def _to_rollouts(self, trajectories: list[Trajectory], groups: torch.Tensor, rows: list[dict]) -> Rollouts:
        pad = self.tokenizer.pad_token_id
        turn_ends, turn_rewards, finals, successes, returns, truncated = [], [], [], [], [], []
        for tr in trajectories:
            cut = self.max_response_tokens and len(tr.response) > self.max_response_tokens
            if cut:  # the response budget: tokens, mask and log-probs cut in parallel, later turn ends dropped
                n = self.max_response_tokens
                tr.response, tr.mask, tr.logp, tr.factor = tr.response[:n], tr.mask[:n], tr.logp[:n], tr.factor[:n]
            try:
                success = bool(tr.env.success()) if tr.termination != "env_error" else False
            except Exception as err:  # noqa: BLE001
                success, tr.termination, tr.error = False, "env_error", f"{type(err).__name__} in success: {err}"
            final = math.nan if tr.termination == "env_error" else float(success)
            incs = increments(tr.raw_rewards, tr.env.reward_mode)
            if self.reward == "dense":
                per_turn = dense_turn_rewards(incs, success, float(tr.env.max_total_reward()))
            else:
                per_turn = sparse_turn_rewards(len(tr.turn_ends), 0.0 if math.isnan(final) else final)
            kept = [(e, r) for e, r in zip(tr.turn_ends, per_turn) if e < len(tr.response)]
            turn_ends.append([e for e, _ in kept])
            turn_rewards.append([r for _, r in kept])
            finals.append(final)
            successes.append(float(success))
            returns.append(math.nan if math.isnan(final) else sum(r for _, r in kept))
            truncated.append(bool(cut) or tr.termination in ("invalid_action", "context_budget", "response_budget"))
        width = max(max(len(tr.response) for tr in trajectories), 1)
        p_width = max(len(tr.prompt) for tr in trajectories)

        def right(values, fill, dtype):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=dtype)

        completion_ids = right([tr.response for tr in trajectories], pad, torch.long)
        mask = right([tr.mask for tr in trajectories], 0.0, torch.float32)
        real = right([[1.0] * len(tr.response) for tr in trajectories], 0.0, torch.float32)
        prompt_ids = torch.tensor([[pad] * (p_width - len(tr.prompt)) + tr.prompt for tr in trajectories], dtype=torch.long)
        prompt_mask = torch.tensor([[0] * (p_width - len(tr.prompt)) + [1] * len(tr.prompt) for tr in trajectories])
        behaviour = right([tr.logp for tr in trajectories], 0.0, torch.float32) * mask
        factors = right([tr.factor for tr in trajectories], 1.0, torch.float32)
        tok = self.tokenizer
        long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        extras = {
            TEMPERATURE_FACTOR.name: mean_factor(factors, mask),
            "turn_end_positions": turn_ends, "turn_rewards": turn_rewards,
            "token_rewards": place_turn_rewards(turn_ends, turn_rewards, width),
            "final_reward": torch.tensor(finals, dtype=torch.float32),
            "env_return": torch.tensor(returns, dtype=torch.float32),
            "env_success": torch.tensor(successes, dtype=torch.float32),
            "num_turns": long([len(tr.turn_ends) for tr in trajectories]),
            "tool_calls": long([tr.tool_calls for tr in trajectories]),
            "num_tool_calls": long([tr.tool_calls for tr in trajectories]),
            "format_errors": long([tr.format_errors for tr in trajectories]),
            "invalid_actions": long([tr.invalid for tr in trajectories]),
            "termination": [tr.termination for tr in trajectories],
            "completion_attention_mask": real,
            "conversation": [tr.messages for tr in trajectories],
        }
        out = Rollouts(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=mask,
            group=groups.clone(), truncated=torch.tensor(truncated),
            prompts=[tok.decode(tr.prompt) for tr in trajectories],
            completions=[tok.decode(tr.response) for tr in trajectories],
            rows=list(rows), behavior_logp=behaviour, extras=extras)
        out.validate(self.name)
        return out

    def _metrics(self, out: Rollouts, trajectories: list[Trajectory], seconds: float, env_seconds: float) -> dict[str, float]:
        x = out.extras
        turns = x["num_turns"].float()
        total_turns = float(turns.sum().clamp(min=1))
        real = x["completion_attention_mask"].sum()
        metrics = {
            "agent/turns_mean": float(turns.mean()),
            "agent/success_rate": float(x["env_success"].mean()),
            "agent/tool_calls_mean": float(x["num_tool_calls"].float().mean()),
            "agent/format_error_rate": float(x["format_errors"].sum()) / total_turns,
            "agent/invalid_action_rate": float(x["invalid_actions"].sum()) / total_turns,
            "agent/truncation_rate": float(out.truncated.float().mean()),
            "agent/env_errors": float(sum(tr.termination == "env_error" for tr in trajectories)),
            "agent/dense_reward_sum": float(torch.nan_to_num(x["env_return"]).mean()) if self.reward == "dense" else 0.0,
            "agent/observation_frac": float(1 - out.completion_mask.sum() / real) if real > 0 else 0.0,
            "agent/env_and_tool_s": env_seconds,
            "agent/rollout_s": seconds,
        }
        for reason in TERMINATIONS:
            metrics[f"agent/termination/{reason}"] = sum(tr.termination == reason for tr in trajectories) / len(trajectories)
        return metrics

    # -- the drift check -------------------------------------------------------------------------
    @torch.no_grad()
    def check_drift(self, out: Rollouts, sampling: Sampling) -> dict[str, float]:
        """Re-score the first ``drift_rows`` trajectories with the training forward; max/mean |log pi - log
        mu| over their action tokens. Catches re-tokenisation and chat-template drift (D0 property)."""
        rows = [i for i in range(out.batch_size) if out.completion_mask[i].sum() > 0][: self.drift_rows]
        if not rows:
            return {}
        batch = trim(out.select(rows))
        was_training = self.model.training
        self.model.eval()
        try:
            scored = policy_forward(self.model, batch, temperature=sampling.temperature or 1.0)
        finally:
            self.model.train(was_training)
        mask = batch.completion_mask.to(scored.logp.device) > 0
        diff = (scored.logp.float() - batch.behavior_logp.to(scored.logp.device).float()).abs()[mask]
        worst, mean = float(diff.max()), float(diff.mean())
        if worst > self.drift_stop:
            raise AgentDriftError(
                f"agent engine: re-scoring {len(rows)} trajectories with the training forward differs from the "
                f"behaviour log-probs by up to {worst:.3g} (> drift_stop={self.drift_stop:g}); the trained tokens are not "
                "the sampled ones (re-tokenisation or a chat-template mismatch) or the sampler and the forward disagree")
        if worst > self.drift_warn:
            warnings.warn(f"agent engine: behaviour log-prob drift {worst:.3g} > drift_warn={self.drift_warn:g}",
                          stacklevel=2)
        return {"agent/logp_drift_max": worst, "agent/logp_drift_mean": mean}


register("rollout_engine", "agent", spec="data_agents_eval.md D0 (multi-turn agent loop, token-exact tensors)")(AgentEngine)
