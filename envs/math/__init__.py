"""Math verifier environment ``opd/Math-v0`` and its parts.

Modules: ``answers`` (final-answer extraction), ``grading`` (``grade``: math-verify equivalence in a worker
process with a hard timeout; ``worker`` is that process), ``generator`` (computed problems with worked
solutions), ``data`` (JSONL/JSON/Parquet loading in the ``DATA_FORMATS`` layouts: auto, GSM8K, MATH-500,
DAPO; splits), ``adapter`` (prompt adapter), ``env`` (``MathEnv``).
"""
from envs.math.adapter import MathPromptAdapter
from envs.math.answers import ANSWER_FORMATS, extract_answer, last_boxed
from envs.math.data import DATA_FORMATS, load_problems, split_problems
from envs.math.env import MathEnv
from envs.math.generator import generate_problems
from envs.math.grading import GraderUnavailable, check_answer, grade

__all__ = [
    "ANSWER_FORMATS", "DATA_FORMATS", "GraderUnavailable", "MathEnv", "MathPromptAdapter", "check_answer",
    "extract_answer", "generate_problems", "grade", "last_boxed", "load_problems", "split_problems",
]
