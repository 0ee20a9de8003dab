"""Rollout metrics for one request, keyed `rollout/<name>` (the trainer adds the task prefix).

Where episodes' final info counts `translated_actions` (actions the env played as the one admissible command they
name, e.g. ALFWorld's near-miss placing commands), `rollout/translated_action_rate` is that count per response.
"""
from __future__ import annotations

from opd_agents.rollout.episode import Episode


def rollout_metrics(episodes: list[Episode], elapsed_s: float, worker_restarts: int = 0) -> dict[str, float]:
    """Throughput and episode statistics; rates are per episode or per response as named."""
    n = len(episodes)
    responses = sum(e.num_turns for e in episodes)
    tokens = sum(e.response_tokens for e in episodes)
    elapsed_s = max(elapsed_s, 1e-9)
    translating = [e for e in episodes if "translated_actions" in e.info]
    translated = {"rollout/translated_action_rate": sum(float(e.info["translated_actions"]) for e in translating)
                  / max(1, sum(e.num_turns for e in translating))} if translating else {}
    return translated | {
        "rollout/episodes": float(n),
        "rollout/episodes_per_s": n / elapsed_s,
        "rollout/tokens_per_s": tokens / elapsed_s,
        "rollout/mean_turns": responses / n if n else 0.0,
        "rollout/success_rate": sum(e.success for e in episodes) / n if n else 0.0,
        "rollout/mean_reward": sum(e.reward for e in episodes) / n if n else 0.0,
        "rollout/format_error_rate": sum(e.format_errors for e in episodes) / responses if responses else 0.0,
        "rollout/mean_response_length": tokens / responses if responses else 0.0,
        "rollout/truncation_rate": sum(e.truncated_responses for e in episodes) / responses if responses else 0.0,
        "rollout/context_overflow_rate": sum(e.end_reason == "context_overflow" for e in episodes) / n if n else 0.0,
        "rollout/worker_restarts": float(worker_restarts),
        "rollout/time_s": elapsed_s,
    }
