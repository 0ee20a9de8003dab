"""The batched multi-turn episode loop: env observation → prompt adapter → chat ids → generate → action → step.

`run_episodes` steps a pool of envs in lock-step: every round it generates one response for each live
episode in a single `Policy.generate` call, then steps each env with the parsed action; an env whose
episode ended takes the next queued episode. Episodes end when the env terminates or truncates, at
`max_turns`, or when the next prompt plus `max_new_tokens` would not fit the model (`context_overflow`).

Sample modes (TaskConfig.sample_mode): `conversation` grows one token sequence incrementally (see chat.py)
and yields one Sample per episode; `per_turn` renders `adapter.turn_messages(...)` afresh every turn (the
history inside the prompt) and yields one Sample per turn. The per-turn prompt is what the student saw.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium

from envs.adapter import PromptAdapter, Turn
from opd_agents.rollout.assemble import TokenRecord, jsonable, make_sample
from opd_agents.rollout.chat import ChatEncoder
from opd_agents.rollout.policy import Generation, Policy
from opd_agents.samples import Sample
from opd_agents.sampling import SamplingParams
from opd_agents.seeding import mix_seed


@dataclass(frozen=True)
class EpisodeSpec:
    """What to run: ids, and the reset seed/options (G rollouts of one prompt share them)."""

    episode_id: str
    group_id: str
    seed: int | None = None
    options: dict[str, Any] | None = None


@dataclass
class Episode:
    """A finished episode: outcome, counters, and its samples (one, or one per turn)."""

    episode_id: str
    group_id: str
    task: str
    reward: float
    success: bool
    num_turns: int
    format_errors: int
    truncated_responses: int
    response_tokens: int
    end_reason: str
    weight_version: int
    info: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)


class _Live:
    """One running episode on one env."""

    def __init__(self, env: gymnasium.Env, adapter: PromptAdapter, spec: EpisodeSpec, encoder: ChatEncoder,
                 *, task: str, mode: str, max_turns: int) -> None:
        self.env, self.adapter, self.spec, self.encoder = env, adapter, spec, encoder
        self.task, self.mode, self.max_turns = task, mode, max_turns
        obs, info = env.reset(seed=spec.seed, options=spec.options)
        self.first = (obs, info)
        self.obs, self.info = obs, info
        self.history: list[Turn] = []
        self.reward, self.format_errors, self.truncated, self.tokens = 0.0, 0, 0, 0
        self.end_reason: str | None = None
        self.messages = adapter.initial_messages(obs, info)
        self.record = TokenRecord()
        if mode == "conversation":
            self.record.add_context(encoder.prompt_ids(self.messages))
        self.turn_parts: list[tuple[TokenRecord, list[dict[str, str]], bool]] = []
        self._turn_prompt: list[dict[str, str]] = []

    def prompt_ids(self) -> list[int]:
        if self.mode == "conversation":
            return self.record.input_ids
        self._turn_prompt = self.adapter.turn_messages(*self.first, self.history, self.obs, self.info)
        return self.encoder.prompt_ids(self._turn_prompt)

    def advance(self, prompt: list[int], gen: Generation) -> None:
        stopped = gen.finish_reason == "stop"
        response_ids = gen.token_ids[:-1] if stopped else gen.token_ids
        response = self.encoder.decode(response_ids)
        parsed = self.adapter.parse_action(response, self.info)
        obs, reward, terminated, truncated, info = self.env.step(parsed.action)
        reply = {"role": "assistant", "content": response}
        self.history.append(Turn(observation=self.obs, info=self.info, response=response, action=parsed.action))
        self.reward += float(reward)
        self.format_errors += int(parsed.format_error)
        self.truncated += int(gen.truncated)
        self.tokens += len(gen.token_ids)
        if self.mode == "per_turn":
            turn = TokenRecord()
            turn.add_context(prompt)
            turn.add_generation(gen)
            self.turn_parts.append((turn, self._turn_prompt + [reply], gen.truncated))
        else:
            self.record.add_generation(gen)
        ended = ("terminated" if terminated else "env_truncated" if truncated
                 else "max_turns" if len(self.history) >= self.max_turns else None)
        if self.mode == "conversation" and ended is None:
            followup = self.adapter.followup_message(obs, info)
            stop_text = self.encoder.decode(gen.token_ids[-1:]) if stopped else None
            self.record.add_context(self.encoder.continuation_ids(self.messages, response, stop_text, followup))
            self.messages = self.messages + [reply, followup]
        elif self.mode == "conversation":
            self.messages = self.messages + [reply]
        self.end_reason = ended
        self.obs, self.info = obs, info

    def result(self, version: int) -> Episode:
        info = jsonable(self.info)
        success = bool(self.info.get("success", False))
        meta = {"num_turns": len(self.history), "format_errors": self.format_errors,
                "truncated_responses": self.truncated, "end_reason": self.end_reason, "weight_version": version,
                "sample_mode": self.mode, "reset_seed": self.spec.seed, "info": info}
        if "task_type" in info:
            meta["task_type"] = info["task_type"]
        common = dict(task=self.task, reward=self.reward, success=success,
                      episode_id=self.spec.episode_id, group_id=self.spec.group_id)
        if self.mode == "per_turn":
            samples = [make_sample(rec, msgs, metadata={**meta, "turn": k, "truncated": trunc}, **common)
                       for k, (rec, msgs, trunc) in enumerate(self.turn_parts)]
        elif self.history:
            samples = [make_sample(self.record, self.messages, metadata={**meta, "truncated": self.truncated > 0},
                                   **common)]
        else:
            samples = []  # no response was generated (context overflow at the first prompt): nothing to train on
        return Episode(self.spec.episode_id, self.spec.group_id, self.task, self.reward, success, len(self.history),
                       self.format_errors, self.truncated, self.tokens, str(self.end_reason), version, info, samples)


def run_episodes(specs: list[EpisodeSpec], envs: list[tuple[gymnasium.Env, PromptAdapter]], policy: Policy,
                 encoder: ChatEncoder, params: SamplingParams, *, task: str, sample_mode: str, max_turns: int,
                 seed: int | None = None, on_done: Callable[[Episode], None] | None = None) -> list[Episode]:
    """Run every spec to completion on the env pool; episodes come back in spec order.

    `seed` (optional) makes the run reproducible: round r generates with seed mix_seed(seed, r). `on_done` is called
    with each episode as it finishes (progress counting).
    """
    if not envs:
        raise ValueError("run_episodes needs at least one env in the pool.")
    queue, slots = deque(specs), [None] * len(envs)
    done: dict[str, Episode] = {}
    rounds = 0
    while queue or any(s is not None for s in slots):
        for i, (env, adapter) in enumerate(envs):
            if slots[i] is None and queue:
                slots[i] = _Live(env, adapter, queue.popleft(), encoder, task=task, mode=sample_mode,
                                 max_turns=max_turns)
        live = [i for i, s in enumerate(slots) if s is not None]
        prompts = {i: slots[i].prompt_ids() for i in live}
        for i in live:
            if len(prompts[i]) + params.max_new_tokens > policy.max_model_len:
                slots[i].end_reason = "context_overflow"
        ready = [i for i in live if slots[i].end_reason is None]
        step_params = params if seed is None else params.with_seed(mix_seed(seed, rounds))
        gens = policy.generate([prompts[i] for i in ready], step_params) if ready else []
        for i, gen in zip(ready, gens):
            slots[i].advance(prompts[i], gen)
        for i in live:
            if slots[i].end_reason is not None:
                episode = done[slots[i].spec.episode_id] = slots[i].result(policy.version)
                slots[i] = None
                if on_done is not None:
                    on_done(episode)
        rounds += 1
    return [done[s.episode_id] for s in specs]
