"""YAML for configs, parsed defensively: safe types only, no duplicate keys, bounded size, nesting and aliases.

PyYAML's `safe_load` already refuses arbitrary Python objects; on top of it this loader rejects what would
otherwise pass silently or blow up late: a key given twice in one mapping (PyYAML keeps the last one), an alias
"bomb" (a few lines whose aliases expand to billions of values once anything walks them), nesting deeper than
`MAX_DEPTH`, and files over `MAX_BYTES`. Errors are `YAMLInputError` with a message naming the line.
Ground floor: imports nothing of the framework.
"""
from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 4 << 20
MAX_DEPTH = 64
MAX_VALUES = 200_000  # scalars + collections after alias expansion


class YAMLInputError(ValueError):
    """The text is not acceptable YAML for a config (message names the problem and the line)."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (dict, list)):
                raise YAMLInputError(f"line {key_node.start_mark.line + 1}: a mapping key must be a scalar")
            if key in seen:
                raise YAMLInputError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping "
                                     f"(first on line {seen[key]}); remove one of them")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _check_shape(root: yaml.Node) -> None:
    """Expanded size and depth of the node graph, counted without expanding it (memo per node) and iteratively."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    on_path: set[int] = set()
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise YAMLInputError(f"line {node.start_mark.line + 1}: nesting deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) else node.value
        if done:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_VALUES:
                raise YAMLInputError(f"line {node.start_mark.line + 1}: the document expands to more than "
                                     f"{MAX_VALUES:,} values (YAML aliases repeating large parts?)")
            continue
        if id(node) in sizes:
            continue
        if id(node) in on_path:
            raise YAMLInputError(
                f"line {node.start_mark.line + 1}: a YAML alias refers to a collection that contains it")
        on_path.add(id(node))
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def load(text: str) -> Any:
    """Parse one YAML document (None for an empty one) under the rules above."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise YAMLInputError(f"the YAML text is larger than {MAX_BYTES >> 20} MiB")
    loader = None
    try:
        loader = _StrictLoader(text)  # the reader refuses control characters (a NUL byte) already here
        node = loader.get_single_node()
        if node is None:
            return None
        _check_shape(node)
        return loader.construct_document(node)
    except RecursionError:
        raise YAMLInputError("the YAML nests too deeply to parse") from None
    except yaml.YAMLError as exc:
        raise YAMLInputError(str(exc)) from None
    finally:
        if loader is not None:
            loader.dispose()
