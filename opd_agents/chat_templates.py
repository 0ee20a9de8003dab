"""Chat templates rendered as the untrusted code they are: in Jinja's sandbox, with bounded output and a deadline.

A chat template is a Jinja program from a tokenizer folder or a config. `render_chat` renders one the way
`transformers`' `apply_chat_template(..., tokenize=False)` does (same sandbox, globals and filters, same variables:
`messages`, `tools`, `documents`, `add_generation_prompt` and the tokenizer's special tokens; the same text out),
with bounds `apply_chat_template` lacks:
  - output: `Template.generate()` is consumed piece by piece and stops past `MAX_OUTPUT_CHARS`;
  - time: a deadline (`RENDER_TIMEOUT_S`) checked inside the sandbox, on every call, attribute or item lookup,
    filter, intercepted operator and output piece;
  - size before work: `*`, `**`, `+` and `%` refuse results past the output bound or integers past
    `MAX_INT_BITS`, calls and filters refuse integer arguments past the output bound (`'x'.ljust(10**9)`), `join`
    refuses a result past it, and every value a call or filter returns is checked. Constant folding is off, so no
    template expression is evaluated while it compiles.
A Python thread cannot be killed and C-level string work ignores signals, so what one call does inside C is bounded
only by those checks; hence `trial_render`: every template a run uses (the student's, each teacher's) is compiled and
rendered on sample chats in a child process under a time and memory bound before anything starts, so a syntax
error, a hang or an exploding output is a start-up error naming the template. Ground floor: imports nothing of the
framework (jinja2 only).
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import _PassArg

MAX_OUTPUT_CHARS = 1 << 22  # 4 Mi characters: far above any model context, far below exhausting memory
MAX_INT_BITS = 4096
RENDER_TIMEOUT_S = 10.0
TRIAL_TIMEOUT_S = 60.0
TRIAL_MEMORY_BYTES = 2 << 30
TRIAL_CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}],
]
_FORMAT_WIDTH = re.compile(r"%[-+ #0]*(\d+)?(?:\.(\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")


class ChatTemplateError(ValueError):
    """A chat template that does not compile, fails, runs past its deadline or renders too much (names it)."""


class ChatTemplateRefusal(ChatTemplateError):
    """The template itself refused the chat (`raise_exception(...)`, e.g. roles it does not support)."""


_deadline: ContextVar[float | None] = ContextVar("chat_template_deadline", default=None)


def _check_deadline() -> None:
    deadline = _deadline.get()
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError(f"rendering took longer than {RENDER_TIMEOUT_S:g} s (a loop that never ends?)")


def _check_size(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > MAX_OUTPUT_CHARS:
        raise ChatTemplateError(f"a value of {len(value):,} items is larger than the {MAX_OUTPUT_CHARS:,} a "
                                "rendered chat may have")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ChatTemplateError(f"an integer of {value.bit_length():,} bits is larger than templates may compute")
    return value


def _check_args(args: Iterable[Any]) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_OUTPUT_CHARS:
            raise ChatTemplateError(f"an argument of {arg:,} is larger than the {MAX_OUTPUT_CHARS:,} characters a "
                                    "rendered chat may have")


def _length(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


def _bounded_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an intercepted operation whose result would be too large, before computing it."""
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        if right * max(abs(left).bit_length(), 1) > MAX_INT_BITS:
            raise ChatTemplateError(f"{left} ** {right} is larger than templates may compute")
    elif operator == "*":
        sizes = (_length(left), _length(right))
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise ChatTemplateError("a product larger than templates may compute")
        elif any(s is not None for s in sizes):
            count = right if sizes[0] is not None else left
            if isinstance(count, int) and (sizes[0] or sizes[1] or 0) * count > MAX_OUTPUT_CHARS:
                raise ChatTemplateError(f"repeating a value {count:,} times exceeds the {MAX_OUTPUT_CHARS:,} "
                                        "characters a rendered chat may have")
    elif operator == "+":
        first, second = _length(left), _length(right)
        if first is not None and second is not None and first + second > MAX_OUTPUT_CHARS:
            raise ChatTemplateError(f"a concatenation longer than {MAX_OUTPUT_CHARS:,} characters")
    elif operator == "%" and isinstance(left, str):
        for width, precision in _FORMAT_WIDTH.findall(left):
            if int(width or 0) > MAX_OUTPUT_CHARS or int(precision or 0) > MAX_OUTPUT_CHARS:
                raise ChatTemplateError("a %-format width larger than a rendered chat may be")
        if "*" in left:  # widths taken from the arguments (`'%*d' % (n, 1)`)
            _check_args(right if isinstance(right, tuple) else (right,))


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _estimate(kind: str, value: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """An upper estimate of the result length of a string operation whose output grows multiplicatively with its
    input (0 for the others), computed before the operation runs."""
    if kind == "join" and isinstance(value, (list, tuple)):
        sep = _arg(args, kwargs, 0, "d", "")
        items = sum(len(i) if isinstance(i, str) else 24 for i in value)
        return items + (len(sep) if isinstance(sep, str) else 0) * max(len(value) - 1, 0)
    if not isinstance(value, str):
        return 0
    if kind == "replace":
        old, new, count = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", ""), _arg(
            args, kwargs, 2, "count", -1)
        if not (isinstance(old, str) and isinstance(new, str)):
            return 0
        hits = len(value) + 1 if old == "" else value.count(old)
        hits = min(hits, count) if isinstance(count, int) and count >= 0 else hits
        return len(value) + hits * max(len(new) - len(old), 0)
    if kind == "expandtabs":
        tab = _arg(args, kwargs, 0, "tabsize", 8)
        return len(value) + value.count("\t") * tab if isinstance(tab, int) else 0
    if kind == "indent":
        width = _arg(args, kwargs, 0, "width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + (value.count("\n") + 1) * width
    if kind == "wordwrap":
        width, wrap = _arg(args, kwargs, 0, "width", 79), _arg(args, kwargs, 2, "wrapstring", None)
        if isinstance(width, int) and isinstance(wrap, str):
            return len(value) + (len(value) // max(width, 1) + 1) * len(wrap)
        return 0
    if kind == "format":  # the filter: printf-style widths
        return max((int(w or 0) + int(p or 0) for w, p in _FORMAT_WIDTH.findall(value)), default=0)
    if kind in ("str.format", "str.format_map"):  # the method: widths inside `{...:spec}` fields
        return max((int(d) for spec in _FORMAT_SPEC.findall(value) for d in re.findall(r"\d+", spec)), default=0)
    return 0


def _check_estimate(kind: str, value: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    size = _estimate(kind, value, args, kwargs)
    if size > MAX_OUTPUT_CHARS:
        raise ChatTemplateError(f"{kind} would make about {size:,} characters, more than the {MAX_OUTPUT_CHARS:,} a "
                                "rendered chat may have")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the deadline and size checks of the module docstring."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
        _check_deadline()
        _check_args(args)
        _check_args(kwargs.values())
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # the sandbox wraps str.format
        if isinstance(owner, str):  # a str method: the ones whose output multiplies are estimated first
            method = getattr(__obj, "__name__", "")
            if method == "join":
                items = args[0] if args and isinstance(args[0], (list, tuple)) else []
                _check_estimate("join", items, [owner], {})
            else:
                _check_estimate(f"str.{method}" if method.startswith("format") else method, owner, args, kwargs)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_deadline()
        _bounded_binop(operator, left, right)
        return _check_size(super().call_binop(context, operator, left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check_deadline()
        return super().getitem(obj, argument)


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    offset = 1 if _PassArg.from_obj(func) is not None else 0  # the context / environment comes before the value

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_deadline()
        _check_args(args[offset + 1:])
        _check_args(kwargs.values())
        _check_estimate(name, args[offset] if len(args) > offset else None, args[offset + 1:], kwargs)
        return _check_size(func(*args, **kwargs))

    return bounded


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` refusing underscore names, as transformers' does (no reaching into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (Jinja's Namespace signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_' (got {name!r})")


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    if indent is not None and (len(indent) if isinstance(indent, str) else indent) > 64:
        raise ChatTemplateError("tojson's indent may be at most 64")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _environment() -> _BoundedSandbox:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, optimized=False,
                          extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, func) for name, func in env.filters.items()}
    env.globals.pop("lipsum", None)  # lorem-ipsum of any length: no chat template needs it
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_Dict(),
                       namespace=_Namespace)
    return env


@functools.lru_cache(maxsize=32)
def _compiled(source: str) -> jinja2.Template:
    return _environment().from_string(source)


def compile_template(source: str, name: str = "chat template") -> jinja2.Template:
    """The compiled template; a syntax error is a ChatTemplateError naming `name` and the line."""
    if not isinstance(source, str):
        raise ChatTemplateError(f"{name} must be a Jinja template string, got {type(source).__name__}")
    try:
        return _compiled(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"{name}: Jinja syntax error on line {exc.lineno}: {exc.message}") from None
    except (RecursionError, MemoryError, SyntaxError, ValueError) as exc:
        raise ChatTemplateError(f"{name} cannot be compiled ({type(exc).__name__}: {str(exc)[:200]})") from None


def render_chat(source: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
                variables: dict[str, Any] | None = None, name: str = "chat template") -> str:
    """The chat rendered by the template `source` under the bounds of the module docstring."""
    template = compile_template(source, name)
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    context = {**(variables or {}), "messages": chat, "tools": None, "documents": None,
               "add_generation_prompt": add_generation_prompt}
    token = _deadline.set(time.monotonic() + RENDER_TIMEOUT_S)
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**context):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise ChatTemplateError(f"the output passed {MAX_OUTPUT_CHARS:,} characters")
            _check_deadline()
            pieces.append(piece)
    except ChatTemplateError as exc:
        raise ChatTemplateError(f"{name}: {exc}") from None
    except jinja2.TemplateError as exc:  # raise_exception() (exactly TemplateError), undefined names, the sandbox
        kind = ChatTemplateRefusal if type(exc) is jinja2.TemplateError else ChatTemplateError
        raise kind(f"{name}: {type(exc).__name__}: {str(exc)[:500]}") from None
    except (RecursionError, MemoryError, ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
        raise ChatTemplateError(f"{name} failed while rendering ({type(exc).__name__}: {str(exc)[:300]})") from None
    finally:
        _deadline.reset(token)
    return "".join(pieces)


def tokenizer_variables(tokenizer: Any) -> dict[str, Any]:
    """What `apply_chat_template` passes a template besides the chat: the tokenizer's special tokens."""
    return dict(getattr(tokenizer, "special_tokens_map", {}) or {})


def render_with_tokenizer(tokenizer: Any, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool,
                          chat_template: str | None = None, name: str = "chat template") -> str:
    """`tokenizer.apply_chat_template(messages, chat_template=..., tokenize=False, ...)`, bounded."""
    try:
        source = tokenizer.get_chat_template(chat_template)
    except ValueError as exc:
        raise ChatTemplateError(f"{name}: {exc}") from None
    return render_chat(source, messages, add_generation_prompt=add_generation_prompt,
                       variables=tokenizer_variables(tokenizer), name=name)


# ---- the start-up trial, in a child process ------------------------------------------------------------------------

def _trial(templates: dict[str, dict[str, Any]]) -> None:
    """In the child: compile and render each template on the TRIAL_CHATS, one JSON line per template."""
    for name, spec in templates.items():
        try:
            for chat in TRIAL_CHATS:
                for prompt in (True, False):
                    try:
                        render_chat(spec["source"], chat, add_generation_prompt=prompt, variables=spec["variables"],
                                    name=name)
                    except ChatTemplateRefusal:  # the template may expect other roles; it ran, within bounds
                        pass
            print(json.dumps({"name": name}), flush=True)
        except ChatTemplateError as exc:
            print(json.dumps({"name": name, "error": str(exc)}), flush=True)


def trial_render(templates: dict[str, tuple[str, dict[str, Any]]], timeout_s: float | None = None) -> None:
    """Compile and render every template (name -> (source, variables)) on sample chats in a child process bounded
    by `timeout_s` (default `TRIAL_TIMEOUT_S`) and `TRIAL_MEMORY_BYTES`; the first failure is a ChatTemplateError
    naming its template. A template refusing a sample chat with `raise_exception` passes (it may expect other
    roles)."""
    if not templates:
        return
    timeout_s = TRIAL_TIMEOUT_S if timeout_s is None else timeout_s
    payload = json.dumps({n: {"source": s, "variables": v} for n, (s, v) in templates.items()})
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        result = subprocess.run([sys.executable, "-m", "opd_agents.chat_templates"], input=payload,
                                capture_output=True, text=True, timeout=timeout_s, env=env)
        out, crashed = result.stdout, result.returncode != 0
    except subprocess.TimeoutExpired as exc:
        out, crashed = (exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""), None
    done = {}
    for line in out.splitlines():
        try:
            record = json.loads(line)
            done[record["name"]] = record.get("error")
        except (ValueError, TypeError, KeyError):  # not one of the child's report lines
            continue
    failed = next((error for error in done.values() if error), None)
    if failed:
        raise ChatTemplateError(failed)
    pending = [n for n in templates if n not in done]
    if pending:
        why = (f"did not finish rendering a sample chat within {timeout_s:g} s" if crashed is None else
               f"crashed the renderer (exit {result.returncode}, e.g. over {TRIAL_MEMORY_BYTES >> 30} GiB of "
               f"memory): {result.stderr.strip()[-300:]}")
        raise ChatTemplateError(f"{pending[0]} {why}; fix the template or use another")


def _main() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (TRIAL_MEMORY_BYTES, TRIAL_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):  # not every platform bounds address space
        pass
    _trial(json.load(sys.stdin))


if __name__ == "__main__":
    _main()
