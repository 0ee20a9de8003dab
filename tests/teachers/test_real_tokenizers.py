"""The teacher stack on the real Qwen2.5-Instruct (V = 151,665) and Qwen3 (V = 151,669) tokenizers: the start-up
vocabulary check, chat-template re-rendering token by token on official ALFWorld games and MATH-500 / GSM8K
(student Qwen2.5 with a Qwen3 teacher and the reverse), the special-token mask on the real end-of-turn ids, and
preflight's tokenizer checks. Samples come from the real episode loop (`run_episodes`, `ChatEncoder`) with a scripted
policy, so their token layout is exactly a rollout's; models are tiny random-init ones (tests/real_vocab.py).
"""
from __future__ import annotations

import shutil

import gymnasium
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import envs  # noqa: F401  (registers the opd/ environments)
from envs.adapter import get_adapter
from opd_agents.config import ConfigError, TeacherConfig, build_config
from opd_agents.learner.batching import sample_loss_mask
from opd_agents.rollout.chat import ChatEncoder, TemplateError
from opd_agents.rollout.episode import EpisodeSpec, run_episodes
from opd_agents.run.preflight import check_tokenizer, preflight
from opd_agents.samples import Sample
from opd_agents.sampling import SamplingParams
from teachers.hf import HFTeacher
from teachers.router import TeacherRouter
from teachers.templates import TemplateAlignmentError, teacher_view, teacher_views
from teachers.vocab import UNMAPPED_ID, VocabMismatchError, check_vocab, mark_unscored, remap_topk, translate_sample
from tests.real_vocab import (
    ALFWORLD_DATA,
    MATH_DATA,
    QWEN3,
    QWEN3_EXTRA,
    QWEN25,
    ScriptedPolicy,
    needs_official_data,
    needs_real_tokenizers,
    save_tiny_model,
)

pytestmark = needs_real_tokenizers

THINK = ["<think>\nI should look around first.\n</think>\n<action>look</action>",
         "<action>inventory</action>",
         "<think>Search the cabinet.</think><action>go to cabinet 1</action>"]
PLAIN = ["<action>look</action>", "I will check. <action>inventory</action>", "<action>go to cabinet 1</action>"]
MATH = ["<think>\nAdd them up.\n</think>\nSo the answer is \\boxed{7}.", "Let me redo it: \\boxed{12}."]
# Qwen3 in non-thinking mode: its generation prompt then ends in `<think>\n\n</think>\n\n`.
NO_THINKING = "{%- set enable_thinking = false %}"


@pytest.fixture(scope="module")
def tok():
    return {"qwen2.5": AutoTokenizer.from_pretrained(QWEN25), "qwen3": AutoTokenizer.from_pretrained(QWEN3)}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_vocab_models")
    return {"qwen2.5": save_tiny_model(QWEN25, root / "qwen2.5", "qwen2", seed=0),
            "qwen3": save_tiny_model(QWEN3, root / "qwen3", "qwen3", seed=1)}


def rollout(tokenizer, env_id: str, env_kwargs: dict, texts: list[str], mode: str, turns: int) -> list[Sample]:
    """One episode through the real loop (`run_episodes`), the policy answering `texts` in turn; its samples."""
    key = (tokenizer.name_or_path, env_id, repr(sorted(env_kwargs.items())), tuple(texts), mode, turns)
    if key not in _ROLLOUTS:
        _ROLLOUTS[key] = _rollout(tokenizer, env_id, env_kwargs, texts, mode, turns)
    return _ROLLOUTS[key]


_ROLLOUTS: dict[tuple, list[Sample]] = {}  # samples are only read: tests share them


def _rollout(tokenizer, env_id: str, env_kwargs: dict, texts: list[str], mode: str, turns: int) -> list[Sample]:
    env = gymnasium.make(env_id, **env_kwargs)
    try:
        episodes = run_episodes([EpisodeSpec("ep", "g", seed=0)], [(env, get_adapter(env))],
                                ScriptedPolicy(tokenizer, texts), ChatEncoder(tokenizer),
                                SamplingParams(max_new_tokens=64), task="t", sample_mode=mode, max_turns=turns)
    finally:
        env.close()
    return episodes[0].samples


# The paper's prompt (adapter defaults); no planner expert: it replans every step (seconds) and OPD never reads it.
ALFWORLD = ("opd/ALFWorld-v0", {"data_path": str(ALFWORLD_DATA), "split": "valid_seen", "expert": None})
MATH500 = ("opd/Math-v0", {"data_path": str(MATH_DATA / "math500_test.jsonl"), "data_format": "math500",
                           "split": "all", "max_attempts": 2})
GSM8K = ("opd/Math-v0", {"data_path": str(MATH_DATA / "gsm8k_test.jsonl"), "data_format": "gsm8k", "split": "all"})


def assert_aligned(sample: Sample, views, teacher_tok, template: str | None) -> None:
    """Token by token: every student loss token is scored at a teacher position holding the same id, each response
    sits contiguously in one teacher sequence, and what precedes it there is exactly the teacher template's
    rendering of the conversation up to that turn (with the generation prompt)."""
    flat = [(v, p) for v in views for p in v.positions]
    assert len(flat) == sample.num_loss_tokens
    for t, (v, p) in zip(sample.loss_positions(), flat):
        assert v.input_ids[p] == sample.input_ids[t]
    # The spans are the last assistant turns (a per-turn chat may hold earlier ones as history).
    assistant = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"][-len(sample.turn_spans):]
    k = 0
    for a, (s, e) in zip(assistant, sample.turn_spans):
        view, first = flat[k]
        assert all(flat[k + j][0] is view and flat[k + j][1] == first + j for j in range(e - s))
        k += e - s
        expected = teacher_tok.apply_chat_template(sample.messages[:a], chat_template=template,
                                                   add_generation_prompt=True, tokenize=False)
        assert teacher_tok.decode(view.input_ids[:first], skip_special_tokens=False) == expected


# ---- (a) the start-up vocabulary check ----------------------------------------------------------------------------

def test_error_names_the_four_differing_tokens(tok):
    with pytest.raises(VocabMismatchError) as err:
        check_vocab(tok["qwen2.5"].get_vocab(), tok["qwen3"].get_vocab(), "error", teacher_name="qwen3")
    msg = str(err.value)
    assert "differ in 4 tokens" in msg
    for token in QWEN3_EXTRA:
        assert f"{token!r} (student id missing, teacher id {tok['qwen3'].convert_tokens_to_ids(token)})" in msg
    assert "teachers.qwen3.vocab_mismatch: mask" in msg


@pytest.mark.parametrize("policy", ["mask", "map"])
def test_qwen25_student_qwen3_teacher(tok, policy):
    student, teacher = tok["qwen2.5"].get_vocab(), tok["qwen3"].get_vocab()
    report = check_vocab(student, teacher, policy)
    assert report.differing == QWEN3_EXTRA and not report.masked_student_ids
    assert report.student_to_teacher == {i: i for i in student.values()}  # shared tokens keep their ids
    table = report.teacher_to_student
    assert table.numel() == len(teacher) and torch.equal(table[:len(student)], torch.arange(len(student)))
    assert table[len(student):].tolist() == [UNMAPPED_ID] * 4
    # A teacher that puts `<think>` first: the slot drops out of the support (student space), the rest keep order.
    think, im_end = teacher["<think>"], teacher["<|im_end|>"]
    topk = remap_topk(_topk([[think, im_end, 0]], [[-0.1, -2.0, -3.0]]), report)
    assert topk.topk_ids.tolist() == [[im_end, 0, UNMAPPED_ID]] and topk.topk_logprobs[0, 2] == float("-inf")


@pytest.mark.parametrize("policy", ["mask", "map"])
def test_qwen3_student_qwen25_teacher_masks_the_four_tokens(tok, policy):
    student, teacher = tok["qwen3"].get_vocab(), tok["qwen2.5"].get_vocab()
    report = check_vocab(student, teacher, policy)
    extra = {student[t] for t in QWEN3_EXTRA}
    assert report.differing == QWEN3_EXTRA and report.masked_student_ids == extra
    think = student["<think>"]
    sample = Sample(input_ids=[1, 2, think, 3, 4], loss_mask=[0, 1, 1, 1, 0], behaviour_logprobs=[0.0] * 5, task="t")
    assert translate_sample(sample, report).input_ids == [1, 2, 0, 3, 4]  # the placeholder the teacher sees
    scored = mark_unscored(_topk([[1]] * 3, [[-1.0]] * 3), sample, report).scored
    assert scored.tolist() == [True, False, True]  # the learner drops the `<think>` row


def _topk(ids, vals):
    from opd_agents.samples import TeacherTopK

    return TeacherTopK(torch.tensor(ids), torch.tensor(vals), torch.zeros(len(ids)))


def _router_cfg(dirs, student: str, teacher: str, policy: str, **teacher_extra):
    return build_config({
        "student": {"path": str(dirs[student])},
        "teachers": {"t": {"model": str(dirs[teacher]), "vocab_mismatch": policy, **teacher_extra}},
        "tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "t"}]})


def test_router_translates_a_real_qwen3_teacher_into_qwen25_ids(tok, model_dirs):
    sample = rollout(tok["qwen2.5"], *GSM8K, MATH, "conversation", 1)[0]
    with pytest.raises(VocabMismatchError, match="<think>"):
        TeacherRouter.from_config(_router_cfg(model_dirs, "qwen2.5", "qwen3", "error"), tok["qwen2.5"].get_vocab())
    router = TeacherRouter.from_config(_router_cfg(model_dirs, "qwen2.5", "qwen3", "map"), tok["qwen2.5"].get_vocab())
    try:
        got = router.topk("math", [sample], 64)[0]
        raw = router["math"].topk([sample], 64)[0]  # teacher id space
    finally:
        router.close()
    student_v = len(tok["qwen2.5"])
    in_student = raw.topk_ids < student_v
    assert (got.topk_ids < student_v).all() and (got.topk_ids != UNMAPPED_ID).sum() == in_student.sum()
    for row in range(got.topk_ids.shape[0]):  # the same ranking minus the 4 Qwen3-only ids
        kept = raw.topk_ids[row][in_student[row]]
        assert torch.equal(got.topk_ids[row][:kept.numel()], kept)
    torch.testing.assert_close(got.sampled_logprobs, raw.sampled_logprobs)


def test_preflight_names_the_differing_tokens(model_dirs):
    with pytest.raises(ConfigError, match=r"differ in 4 tokens.*'</think>'"):
        preflight(_router_cfg(model_dirs, "qwen2.5", "qwen3", "error"))
    resolved = preflight(_router_cfg(model_dirs, "qwen2.5", "qwen3", "map"))
    assert resolved.teachers["t"].model == str(model_dirs["qwen3"])


# ---- (b) chat-template re-rendering, token by token ----------------------------------------------------------------

CASES = [  # (student, teacher, texts of the student's responses, env, sample mode, turns)
    ("qwen2.5", "qwen3", THINK, ALFWORLD, "conversation", 3),
    ("qwen2.5", "qwen3", THINK, ALFWORLD, "per_turn", 3),
    ("qwen3", "qwen2.5", PLAIN, ALFWORLD, "conversation", 3),
    ("qwen3", "qwen2.5", THINK, ALFWORLD, "per_turn", 3),
    ("qwen2.5", "qwen3", MATH, MATH500, "conversation", 2),
    ("qwen2.5", "qwen3", MATH, MATH500, "per_turn", 2),  # the second turn's prompt holds the first answer
    ("qwen3", "qwen2.5", MATH, GSM8K, "per_turn", 1),
]


PARAMS = [(*c, thinking) for c in CASES for thinking in ((True, False) if c[1] == "qwen3" else (True,))]


@needs_official_data
@pytest.mark.parametrize(("student", "teacher", "texts", "env", "mode", "turns", "thinking"), PARAMS,
                         ids=[f"{c[0]}-to-{c[1]}-{'alfworld' if c[3] is ALFWORLD else 'math'}-{c[4]}"
                              f"{'' if c[6] else '-no-thinking'}" for c in PARAMS])
def test_rerendered_views_align_token_by_token(tok, student, teacher, texts, env, mode, turns, thinking):
    template = tok[teacher].chat_template if thinking else NO_THINKING + tok[teacher].chat_template
    samples = rollout(tok[student], *env, texts, mode, turns)
    assert len(samples) == (turns if mode == "per_turn" else 1)
    for sample in samples:
        views = teacher_views(sample, tok[teacher], template)
        assert_aligned(sample, views, tok[teacher], template)
        first = views[0].input_ids[:views[0].positions[0]]
        default_system = tok["qwen2.5"].encode("You are Qwen, created by Alibaba Cloud.", add_special_tokens=False)
        has_default = any(first[i:i + len(default_system)] == default_system for i in range(len(first)))
        assert has_default == (teacher == "qwen2.5" and sample.messages[0]["role"] != "system")
        if teacher == "qwen3" and not thinking:  # every response follows the empty think block
            block = tok["qwen3"].encode("<think>\n\n</think>\n\n", add_special_tokens=False)
            for v in views:
                for p in v.positions:
                    if v.input_ids[p - 4:p] == block:
                        break
                else:
                    pytest.fail("a teacher sequence lacks the empty think block before its responses")


@needs_official_data
def test_history_rewrites_start_new_teacher_sequences(tok):
    """Qwen3's template drops `<think>` blocks from assistant history: the turn after such a response starts a
    teacher sequence of its own (the teacher's view of the conversation); a prefix-stable turn continues one."""
    sample = rollout(tok["qwen2.5"], *ALFWORLD, THINK, "conversation", 3)[0]
    views = teacher_views(sample, tok["qwen3"], tok["qwen3"].chat_template)
    assert [len(v.positions) for v in views] == [e - s for s, e in sample.turn_spans[:1]] + \
        [sum(e - s for s, e in sample.turn_spans[1:])]
    with pytest.raises(TemplateAlignmentError, match="teacher_views"):
        teacher_view(sample, tok["qwen3"], tok["qwen3"].chat_template)
    same = teacher_views(sample, tok["qwen2.5"], tok["qwen2.5"].chat_template)  # the student's own template
    assert len(same) == 1 and same[0].input_ids == sample.input_ids and same[0].positions == sample.loss_positions()


@needs_official_data
def test_hf_teacher_scores_each_teacher_sequence(tok, model_dirs):
    """HFTeacher on a sample with two teacher sequences equals a plain forward over each of them."""
    sample = rollout(tok["qwen2.5"], *ALFWORLD, THINK, "conversation", 3)[0]
    template = NO_THINKING + tok["qwen3"].chat_template
    views = teacher_views(sample, tok["qwen3"], template)
    assert len(views) == 3
    got = HFTeacher("t", TeacherConfig(model=str(model_dirs["qwen3"]), chat_template=template)).topk([sample], 8)[0]
    model = AutoModelForCausalLM.from_pretrained(model_dirs["qwen3"], dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for v in views:
            logp = torch.log_softmax(model(torch.tensor([v.input_ids])).logits[0].float(), dim=-1)
            rows.append(logp[torch.tensor(v.positions) - 1])
    logp = torch.cat(rows)
    vals, ids = logp.topk(8, dim=-1)
    assert got.topk_ids.shape == (sample.num_loss_tokens, 8) and torch.equal(got.topk_ids, ids)
    torch.testing.assert_close(got.topk_logprobs, vals, atol=1e-5, rtol=0)
    scored = torch.tensor([sample.input_ids[t] for t in sample.loss_positions()])
    torch.testing.assert_close(got.sampled_logprobs, logp.gather(-1, scored[:, None]).squeeze(-1), atol=1e-5, rtol=0)


@needs_official_data
def test_a_qwen3_student_conversation_with_think_history_is_a_clear_error(tok):
    with pytest.raises(TemplateError, match="per_turn"):
        rollout(tok["qwen3"], *ALFWORLD, THINK, "conversation", 2)


# ---- (c) the special-token mask on the real end-of-turn ids ---------------------------------------------------------

@needs_official_data
@pytest.mark.parametrize("mode", ["first", "all"])
def test_special_token_mask_on_real_end_of_turn_ids(tok, mode):
    t = tok["qwen2.5"]
    im_end, eot = t.convert_tokens_to_ids("<|im_end|>"), t.convert_tokens_to_ids("<|endoftext|>")
    special = [tuple(t.encode(s, add_special_tokens=False)) for s in ("<|im_end|>", "<|endoftext|>")]
    assert special == [(im_end,), (eot,)] == [(151645,), (151643,)]
    texts = ["one<|endoftext|>two<|endoftext|>three", "<|endoftext|>done<|im_end|>more"]
    sample = rollout(t, *MATH500, texts, "conversation", 2)[0]  # two attempts: two responses in one sequence
    assert len(sample.turn_spans) == 2
    kept = sample_loss_mask(sample, special, mode).tolist()
    for a, b in sample.turn_spans:
        response = sample.input_ids[a:b]
        expected_drop = set()
        for marker in (im_end, eot):
            hits = [a + j for j, i in enumerate(response) if i == marker]
            expected_drop |= set(hits[:1] if mode == "first" else hits)
        assert {p for p in range(a, b) if not kept[p]} == expected_drop
    assert not any(k for k, m in zip(kept, sample.loss_mask) if not m)  # prompt and template tokens stay out


def test_think_markers_are_one_id_in_qwen3(tok):
    """`loss.special_tokens: [<think>, </think>]` on a Qwen3 student: one id each, masked wherever they appear."""
    t = tok["qwen3"]
    special = [tuple(t.encode(s, add_special_tokens=False)) for s in ("<think>", "</think>")]
    assert special == [(151667,), (151668,)]
    ids = t.encode("a<think>\nx\n</think>\n\nb", add_special_tokens=False)
    sample = Sample(input_ids=[1] + ids, loss_mask=[0] + [1] * len(ids), behaviour_logprobs=[0.0] * (len(ids) + 1),
                    task="t")
    kept = sample_loss_mask(sample, special, "all")
    dropped = [i for i, k in zip(sample.input_ids, kept.tolist()) if not k]
    assert dropped == [1, 151667, 151668]


def test_the_paper_configs_special_tokens_are_the_paper_codes_ids_masked_first_per_response(tok):
    """configs/paper/math.yaml masks "<", "think", "<|im_end|>" as the paper's code does (opd_mask_first_tokens): each
    is one id of the Qwen2.5 student, and the first occurrence of each id in each response leaves the loss."""
    from pathlib import Path

    from opd_agents.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "paper" / "math.yaml")
    t = tok["qwen2.5"]
    special = [tuple(t.encode(s, add_special_tokens=False)) for s in cfg.loss.special_tokens]  # as the Learner does
    assert special == [(27,), (26865,), (151645,)] and cfg.loss.special_token_mode == "first"
    responses = [t.encode(text, add_special_tokens=False) + [151645] for text in
                 ("<think>\n1<2 and 3<4\n</think>\nthink", "no marker here", "</think> 5<6")]
    ids, loss = [1], [0]
    for r in responses:
        ids, loss = ids + r + [2], loss + [1] * len(r) + [0]
    sample = Sample(input_ids=ids, loss_mask=loss, behaviour_logprobs=[0.0] * len(ids), task="t")
    kept = sample_loss_mask(sample, special, cfg.loss.special_token_mode).tolist()
    expected, start = [bool(m) for m in loss], 1
    for r in responses:  # the paper's rule, per response: drop the first position of each configured id
        for marker in (27, 26865, 151645):
            if marker in r:
                expected[start + r.index(marker)] = False
        start += len(r) + 1
    assert kept == expected and kept.count(False) - loss.count(0) == 3 + 1 + 3  # '<' twice, 'think' twice


@pytest.mark.xfail(strict=True, reason="known gap: a marker that is several ids in the student's vocabulary (Qwen2.5's "
                   "`<think>` = '<th','ink','>') is matched by ids, and BPE merges it with what follows ('>\\n')")
def test_multi_token_think_marker_in_context_qwen25(tok):
    t = tok["qwen2.5"]
    marker = tuple(t.encode("<think>", add_special_tokens=False))
    ids = t.encode("<think>\nx", add_special_tokens=False)
    sample = Sample(input_ids=[1] + ids, loss_mask=[0] + [1] * len(ids), behaviour_logprobs=[0.0] * (len(ids) + 1),
                    task="t")
    assert not sample_loss_mask(sample, [marker], "all")[1:4].any()


# ---- (f) bad input: a tokenizer folder without a chat template -----------------------------------------------------

@pytest.fixture(scope="module")
def no_template_dir(tmp_path_factory, model_dirs):
    """A model folder whose Qwen2.5 tokenizer lacks its chat template (chat_template.jinja left out)."""
    out = tmp_path_factory.mktemp("no_template")
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(model_dirs["qwen2.5"] / name, out / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(QWEN25 / name, out / name)
    return out


def test_tokenizer_without_chat_template_is_one_clear_error(no_template_dir):
    with pytest.raises(ConfigError) as err:
        check_tokenizer("student.path", str(no_template_dir))
    msg = str(err.value)
    assert str(no_template_dir) in msg and "no chat template" in msg
    assert "chat_template.jinja" in msg and "student.chat_template" in msg


def test_a_configured_chat_template_stands_in_for_the_tokenizers(no_template_dir, model_dirs, tok):
    cfg = build_config({"student": {"path": str(no_template_dir), "chat_template": tok["qwen2.5"].chat_template},
                        "teachers": {"t": {"model": str(model_dirs["qwen2.5"])}},
                        "tasks": [{"name": "math", "env_id": "opd/Math-v0", "teacher": "t"}]})
    assert preflight(cfg).student.path == str(no_template_dir)
    with pytest.raises(ConfigError, match="no chat template"):
        preflight(cfg.model_copy(update={"student": cfg.student.model_copy(update={"chat_template": None})}))
