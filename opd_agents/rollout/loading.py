"""Loading the student's tokenizer (from a resolved folder or hub id) and its end-of-turn ids for the policies."""
from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from opd_agents.config import ModelConfig, model_folder


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """The student tokenizer, with the config's chat template override applied."""
    tok = AutoTokenizer.from_pretrained(model_folder(model.path, "student.path"),
                                        trust_remote_code=model.trust_remote_code)
    if model.chat_template is not None:
        tok.chat_template = model.chat_template
    if tok.chat_template is None:
        raise ValueError(
            f"the tokenizer at {model.path!r} has no chat template; set student.chat_template in the config.")
    return tok


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_eos: int | list[int] | None = None) -> list[int]:
    """End-of-turn ids: the tokenizer's eos plus the model's generation-config eos ids (e.g. Qwen's two)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    ids += [i for i in extra if i not in ids]
    if not ids:
        raise ValueError("the student tokenizer defines no eos token; set one so responses can end.")
    return ids
