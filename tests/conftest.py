"""Shared fixtures: a locally trained tokenizer, tiny Qwen2 models saved to disk (no downloads), a local Ray cluster."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from opd_agents.zoo.models import TinySize, build_tiny_model
from opd_agents.zoo.tokenizer import train_tokenizer

_CORPUS = [
    "What is 12 + 35? Put your final answer within \\boxed{}.",
    "12 + 35 = 47. The answer is \\boxed{47}.",
    "Solve 3x + 4 = 19. 3x = 15, x = 5. \\boxed{5}",
    "You are in the middle of a room. Looking quickly around you, you see a cabinet 1, a countertop 1, a fridge 1.",
    "Your task is to: put a clean apple in fridge. <think>I need the apple.</think><action>go to countertop 1</action>",
    "take apple 1 from countertop 1. go to sinkbasin 1. clean apple 1 with sinkbasin 1. open fridge 1. "
    "move apple 1 to fridge 1.",
    "Nothing happens. You arrive at countertop 1. On the countertop 1, you see a apple 1, and a knife 2.",
] * 4


# Tiny models on 2 cores run far faster single-threaded, and Ray workers in the same tests need the other core.
torch.set_num_threads(1)


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local 2-CPU Ray cluster for one test module (started unless one is running; shut down after the module).
    Actors get the repository root on PYTHONPATH, so they import test modules (toy envs, test teachers)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A ~300-token byte-level BPE with the ChatML template; eos = <|im_end|>."""
    return train_tokenizer(_CORPUS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """`student` (2 layers, h64) and `teacher` (2 layers, h96) saved with save_pretrained, plus their tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for name, size, seed in [("student", TinySize(2, 64, 4, 2, 128), 0), ("teacher", TinySize(2, 96, 4, 2, 192), 1)]:
        path = root / name
        build_tiny_model(tiny_tokenizer, size, seed=seed).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def make_chat_sample():
    """Builder `(tokenizer, messages, task="task") -> Sample`, rendered with the tokenizer's chat template.

    Built turn by turn as a rollout would: template text is tokenized and masked (0); each assistant turn is
    `encode(content) + [<|im_end|>]` with loss_mask 1 and recorded in turn_spans; the newline after `<|im_end|>`
    and anything after the last assistant turn is template text (0).
    """
    from opd_agents.samples import Sample

    def build(tokenizer, messages: list[dict[str, str]], task: str = "task") -> Sample:
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids: list[int] = []
        mask: list[int] = []
        spans: list[tuple[int, int]] = []
        covered = ""
        for a, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:a], add_generation_prompt=True, tokenize=False)
            seg = tokenizer.encode(prompt[len(covered):], add_special_tokens=False)
            ids += seg
            mask += [0] * len(seg)
            response = tokenizer.encode(message["content"], add_special_tokens=False) + [eos]
            spans.append((len(ids), len(ids) + len(response)))
            ids += response
            mask += [1] * len(response)
            covered = prompt + message["content"] + "<|im_end|>"
        tail = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False)[len(covered):],
                                add_special_tokens=False)
        ids += tail
        mask += [0] * len(tail)
        return Sample(input_ids=ids, loss_mask=mask, behaviour_logprobs=[0.0] * len(ids), task=task,
                      episode_id=f"{task}-{len(ids)}", turn_spans=spans, messages=[dict(m) for m in messages])

    return build
