"""The multi-turn episode loop and sample assembly (in-process, no Ray), on the toy guess-the-number env."""
from __future__ import annotations

import gymnasium
import pytest

from envs.adapter import get_adapter
from opd_agents.config import ModelConfig, RolloutConfig, TaskConfig
from opd_agents.rollout import ChatEncoder, EpisodeSpec, LocalRolloutGroup, SamplingParams, TemplateError, run_episodes
from opd_agents.rollout.request import eval_specs
from tests.rollout.test_toyenv import ENV_ID, make_policy

TOY = "tests.rollout.test_toyenv"


@pytest.fixture(scope="module")
def policy(tiny_model_dirs, tiny_tokenizer):
    # eos is likely but not certain: episodes mix stopped and truncated (max_new_tokens) responses.
    return make_policy(tiny_model_dirs["student"], tiny_tokenizer, eos_bias=3.0)


def _pool(n: int = 3, **kwargs):
    envs = [gymnasium.make(ENV_ID, **kwargs) for _ in range(n)]
    return [(e, get_adapter(e)) for e in envs]


def _run(policy, tokenizer, mode: str, *, n: int = 4, max_turns: int = 3, max_new_tokens: int = 12, seed: int = 0):
    specs = [EpisodeSpec(f"e{i}", f"g{i // 2}", seed=100 + i // 2) for i in range(n)]
    return run_episodes(specs, _pool(), policy, ChatEncoder(tokenizer), SamplingParams(top_p=0.9,
                                                                                       max_new_tokens=max_new_tokens),
                        task="guess", sample_mode=mode, max_turns=max_turns, seed=seed)


def _check_spans_decode_to_responses(sample, tokenizer, eos_text: str) -> list[str]:
    """Masked tokens, span by span, decode to the assistant contents (+ eos when the response stopped)."""
    replies = [m["content"] for m in sample.messages if m["role"] == "assistant"]
    assert len(replies) == len(sample.turn_spans)
    assert sample.loss_mask == [int(any(s <= t < e for s,
                                        e in sample.turn_spans)) for t in range(len(sample.input_ids))]
    assert all(lp == 0.0 for lp, m in zip(sample.behaviour_logprobs, sample.loss_mask) if not m)
    endings = []
    for (s, e), reply in zip(sample.turn_spans, replies):
        text = tokenizer.decode(sample.input_ids[s:e], skip_special_tokens=False)
        assert text in (reply, reply + eos_text)
        stopped = text == reply + eos_text and sample.input_ids[e - 1] == tokenizer.eos_token_id
        endings.append("stop" if stopped else "length")
    return endings


def test_conversation_mode_one_sample_with_exact_masked_text(policy, tiny_tokenizer):
    episodes = _run(policy, tiny_tokenizer, "conversation")
    assert [e.episode_id for e in episodes] == ["e0", "e1", "e2", "e3"]
    enc, endings = ChatEncoder(tiny_tokenizer), []
    for ep in episodes:
        (sample,) = ep.samples
        assert ep.num_turns == 3 and len(sample.turn_spans) == 3 and sample.loss_mask[0] == 0
        endings += _check_spans_decode_to_responses(sample, tiny_tokenizer, tiny_tokenizer.eos_token)
        assert sample.metadata["truncated_responses"] == endings[-3:].count("length")
        # The incremental ids render exactly the chat template of the final messages (no re-tokenisation drift).
        rendered = enc.render(sample.messages, add_generation_prompt=False)
        decoded = tiny_tokenizer.decode(sample.input_ids, skip_special_tokens=False)
        assert rendered.startswith(decoded) and rendered[len(decoded):] in ("\n", tiny_tokenizer.eos_token + "\n")
        assert [m["role"] for m in sample.messages] == ["system", "user"] + ["assistant", "user"] * 2 + ["assistant"]
    assert set(endings) == {"stop", "length"}  # both kinds of response really occurred


def test_per_turn_mode_one_sample_per_turn_with_history_prompt(policy, tiny_tokenizer):
    episodes = _run(policy, tiny_tokenizer, "per_turn")
    enc = ChatEncoder(tiny_tokenizer)
    for ep in episodes:
        assert len(ep.samples) == ep.num_turns == 3
        for k, sample in enumerate(ep.samples):
            assert sample.metadata["turn"] == k and sample.metadata["num_turns"] == 3
            (span,) = sample.turn_spans
            assert span[1] == len(sample.input_ids)
            assert sample.input_ids[:span[0]] == enc.prompt_ids(sample.messages[:-1])
            _check_spans_decode_to_responses(sample, tiny_tokenizer, tiny_tokenizer.eos_token)
            assert sample.messages[1]["content"].count("You guessed") == k  # the history lives in the prompt
            assert sample.reward == ep.reward and sample.episode_id == ep.episode_id


def test_truncated_responses_are_trained_and_still_step_the_env(policy, tiny_tokenizer):
    episodes = _run(policy, tiny_tokenizer, "conversation", n=2, max_new_tokens=1)
    for ep in episodes:
        (sample,) = ep.samples
        assert ep.info["steps"] == ep.num_turns == 3  # every response reached the env
        assert sample.num_loss_tokens == 3 and ep.truncated_responses == 3 - sum(
            sample.input_ids[e - 1] == tiny_tokenizer.eos_token_id for _, e in sample.turn_spans)
        assert sample.metadata["truncated"] == (ep.truncated_responses > 0)


def test_samples_are_reproducible_with_a_seed(policy, tiny_tokenizer):
    a = _run(policy, tiny_tokenizer, "conversation", n=2, seed=5)
    b = _run(policy, tiny_tokenizer, "conversation", n=2, seed=5)
    assert [e.samples[0].input_ids for e in a] == [e.samples[0].input_ids for e in b]


def test_context_overflow_ends_the_episode(policy, tiny_tokenizer):
    episodes = _run(policy, tiny_tokenizer, "conversation", n=1, max_new_tokens=2000)
    assert episodes[0].end_reason == "context_overflow" and episodes[0].samples == []


def test_template_that_rewrites_history_is_rejected(tiny_tokenizer):
    enc = ChatEncoder(tiny_tokenizer)
    enc.render = lambda messages, add_generation_prompt: (  # a template that trims the assistant's content
        "".join(f"<{m['role']}>{m['content'].strip()}" for m in messages)
        + ("<assistant>" if add_generation_prompt else ""))
    with pytest.raises(TemplateError, match="prefix-stable"):
        enc.continuation_ids([{"role": "user", "content": "hi"}], "answer  ", None, {"role": "user", "content": "next"})


@pytest.fixture(scope="module")
def local_group(tiny_model_dirs):
    rollout = RolloutConfig(max_concurrent_episodes=4, prompts_per_step=2, group_size=3)
    return LocalRolloutGroup(ModelConfig(path=str(tiny_model_dirs["student"])), rollout, imports=[TOY], seed=0)


TASK = TaskConfig(name="guess", env_id=ENV_ID, teacher="t", max_new_tokens=8, max_turns=2)


def test_group_size_shares_the_prompt_and_group_id(local_group):
    batch = local_group.rollout(TASK)
    assert len(batch.episodes) == 6 and len(batch.samples) == 6
    first_user = {}
    for s in batch.samples:
        first_user.setdefault(s.group_id, set()).add(s.messages[1]["content"])
    assert len(first_user) == 2 and all(len(v) == 1 for v in first_user.values())
    assert len({next(iter(v)) for v in first_user.values()}) == 2  # different prompts across groups
    assert len({s.episode_id for s in batch.samples}) == 6
    m = batch.metrics
    assert m["rollout/episodes"] == 6 and m["rollout/mean_turns"] == 2 and m["rollout/worker_restarts"] == 0
    assert m["rollout/format_error_rate"] == 1.0  # an untrained model never writes <action> tags
    assert {"rollout/tokens_per_s", "rollout/success_rate", "rollout/format_error_rate",
            "rollout/mean_response_length", "rollout/truncation_rate"} <= set(m)


def test_evaluate_uses_distinct_items_and_is_deterministic(local_group):
    rows = local_group.evaluate(TASK, 5, greedy=True)
    assert [r["index"] for r in rows] == list(range(5)) and all(r["task_type"] == "guess" for r in rows)
    assert rows == local_group.evaluate(TASK, 5, greedy=True)
    specs = eval_specs("guess", 4, k=2)
    assert [(s.seed, s.options["index"]) for s in specs[::2]] == [(i, i) for i in range(4)]
    assert specs[0].group_id == specs[1].group_id and specs[0].seed == specs[1].seed


@pytest.mark.parametrize("cap, calls, largest", [(None, 2, 6), (4, 4, 4), (2, 6, 2)])
def test_a_request_runs_without_waves_unless_capped(tiny_model_dirs, cap, calls, largest):
    """6 episodes of 2 turns: with every episode in flight (the default) the worker makes one generate call per
    turn, for all 6; `rollout.max_concurrent_episodes` caps the batch and the envs, and the refill adds calls."""
    rollout = RolloutConfig(max_concurrent_episodes=cap, prompts_per_step=2, group_size=3)
    group = LocalRolloutGroup(ModelConfig(path=str(tiny_model_dirs["student"])), rollout, imports=[TOY], seed=0)
    sizes: list[int] = []
    generate = group.worker.policy.generate

    def counting(prompts, params):
        sizes.append(len(prompts))
        return generate(prompts, params)

    group.worker.policy.generate = counting
    try:
        batch = group.rollout(TASK)
    finally:
        group.shutdown()
    assert len(batch.episodes) == 6 and all(len(ep.samples) == 1 for ep in batch.episodes)
    assert len(sizes) == calls and max(sizes) == largest and sum(sizes) == 12  # 6 episodes × 2 turns
    assert len(group.worker.pools.get((TASK.name, False), [])) in (0, largest)  # closed by shutdown
