"""A YAML file as a proto message, checked as a whole, every problem with its file and line.

    msg = load(path, pipeline_pb2.PipelineSpec, overrides=["train.epochs=2"])
    # InvalidArgument: examples/demo.yaml:14:3: train.lora.rnak: unknown key; did you mean 'rank'?

The YAML is composed into nodes (which know their line), then walked against the message's descriptor: unknown keys
(with a did-you-mean), enums by their plain word (`method: qlora` for FINETUNE_METHOD_QLORA), references given as an
artifact id (`base_model: model-1a2b`), numbers, booleans and strings of the right type. Every problem is collected
before anything is raised. `--set a.b=value` overrides are applied to the node tree first, so their problems read
as `--set a.b`. A `hook` per dotted path takes over a field whose YAML form is not the message's (a list of scheme
names, a directory of files).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import Message

from services.core.errors import FieldViolation, InvalidArgument, check

# a hook gets (the node, where it is, the message holding the field, the field's name, the problem list)
Hook = Callable[[yaml.Node, str, Message, str, list[FieldViolation]], None]
INTS = {FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_SINT32, FD.TYPE_SINT64,
        FD.TYPE_FIXED32, FD.TYPE_FIXED64, FD.TYPE_SFIXED32, FD.TYPE_SFIXED64}
FLOATS = {FD.TYPE_DOUBLE, FD.TYPE_FLOAT}
INT32_MAX = 2**31 - 1


def where(source: str, node: yaml.Node) -> str:
    """file:line:column of a node; an override's node says which --set it came from."""
    name = getattr(node.start_mark, "name", "")
    if name.startswith("--set "):
        return name
    return f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def enum_words(enum) -> dict[str, int]:
    """An enum's values by their plain word: FINETUNE_METHOD_QLORA -> qlora (the prefix every value shares, cut)."""
    names = [v.name for v in enum.values]
    prefix = names[0].rsplit("_UNSPECIFIED", 1)[0] + "_" if names and names[0].endswith("_UNSPECIFIED") else ""
    return {v.name.removeprefix(prefix).lower().replace("_", "-"): v.number for v in enum.values
            if not v.name.endswith("_UNSPECIFIED")}


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class Loader:
    def __init__(self, source: str, hooks: dict[str, Hook] | None = None):
        self.source, self.hooks = source, hooks or {}
        self.problems: list[FieldViolation] = []

    def problem(self, node: yaml.Node, path: str, text: str) -> None:
        self.problems.append(FieldViolation(f"{where(self.source, node)}: {path}", text))

    def message(self, node: yaml.Node, msg: Message, path: str) -> None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path or "(top)", f"must be a mapping of {msg.DESCRIPTOR.name} fields")
            return
        fields = msg.DESCRIPTOR.fields_by_name
        seen: set[str] = set()
        for key_node, value in node.value:
            key = str(key_node.value)
            at = f"{path}.{key}" if path else key
            if key in seen:
                self.problem(key_node, at, "is given twice")
                continue
            seen.add(key)
            if at in self.hooks:
                self.hooks[at](value, where(self.source, value), msg, key, self.problems)
                continue
            if key not in fields:
                self.problem(key_node, at, f"unknown key{did_you_mean(key, [*fields, *self._hooked(path)])}")
                continue
            self.field(value, msg, fields[key], at)

    def _hooked(self, path: str) -> list[str]:
        prefix = f"{path}." if path else ""
        return [h[len(prefix):] for h in self.hooks if h.startswith(prefix) and "." not in h[len(prefix):]]

    def field(self, node: yaml.Node, msg: Message, fd, path: str) -> None:
        if fd.is_repeated and not (fd.message_type and fd.message_type.GetOptions().map_entry):
            if not isinstance(node, yaml.SequenceNode):
                self.problem(node, path, "must be a list")
                return
            target = getattr(msg, fd.name)
            for i, item in enumerate(node.value):
                if fd.type == FD.TYPE_MESSAGE:
                    self.message_or_ref(item, target.add(), f"{path}[{i}]")
                elif (v := self.scalar(item, fd, f"{path}[{i}]")) is not None:
                    target.append(v)
            return
        if fd.type == FD.TYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                self.map(node, getattr(msg, fd.name), fd.message_type.fields_by_name["value"], path)
                return
            self.message_or_ref(node, getattr(msg, fd.name), path)
            return
        v = self.scalar(node, fd, path)
        if v is not None:
            setattr(msg, fd.name, v)

    def map(self, node, target, value_fd, path: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path, "must be a mapping")
            return
        for k, v in node.value:
            value = self.scalar(v, value_fd, f"{path}.{k.value}")
            if value is not None:
                target[str(k.value)] = value

    def message_or_ref(self, node, sub: Message, path: str) -> None:
        # an artifact reference may be written as its id or uri
        if sub.DESCRIPTOR.full_name == "tunery.v1.ArtifactRef" and isinstance(node, yaml.ScalarNode):
            if not str(node.value).strip():
                self.problem(node, path, "an artifact id or tunery:// uri is required here")
                return
            sub.uri = str(node.value).strip()
            return
        sub.SetInParent()  # `merge: {}` still sets the stage
        self.message(node, sub, path)

    def scalar(self, node: yaml.Node, fd, path: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.problem(node, path, "must be a single value, not a list or mapping")
            return None
        value = yaml.safe_load(yaml.serialize(node)) if node.tag != "tag:yaml.org,2002:str" else node.value
        if fd.type == FD.TYPE_ENUM:
            words = enum_words(fd.enum_type)
            word = str(value).strip().lower().replace("_", "-")
            if word not in words:
                self.problem(node, path, f"{value!r} is not one of {', '.join(words)}{did_you_mean(word, words)}")
                return None
            return words[word]
        if fd.type == FD.TYPE_BOOL:
            if not isinstance(value, bool):
                self.problem(node, path, f"must be true or false (got {node.value!r})")
                return None
            return value
        if fd.type in INTS:
            if isinstance(value, bool) or not isinstance(value, int):
                self.problem(node, path, f"must be a whole number (got {node.value!r})")
                return None
            limit = INT32_MAX if fd.type in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32) else 2**63 - 1
            if not -limit - 1 <= value <= limit:
                self.problem(node, path, f"{value} is out of range")
                return None
            return value
        if fd.type in FLOATS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self.problem(node, path, f"must be a finite number (got {node.value!r})")
                return None
            return float(value)
        if fd.type == FD.TYPE_STRING:
            if value is None:
                return None
            if isinstance(value, (dict, list)):
                self.problem(node, path, "must be text")
                return None
            return str(value) if not isinstance(value, bool) else node.value
        self.problem(node, path, f"cannot be given in YAML ({fd.type})")
        return None


def compose(text: str, source: str) -> yaml.Node:
    import io

    stream = io.StringIO(text)
    stream.name = source  # PyYAML's marks carry it
    try:
        node = yaml.compose(stream, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise InvalidArgument(f"{source}{line}: not valid YAML: {e.problem or e}") from None
    if node is None:
        raise InvalidArgument(f"{source}: the file is empty")
    return node


def apply_override(root: yaml.Node, assignment: str) -> None:
    """`a.b.c=value` into the node tree (mappings made as needed); the value is YAML (`3`, `true`, `[a, b]`)."""
    dotted, eq, text = assignment.partition("=")
    if not eq or not dotted.strip():
        raise InvalidArgument(f"--set {assignment!r}: write key=value, e.g. train.epochs=2")
    value = compose(text or "''", f"--set {dotted}")
    node = root
    parts = dotted.strip().split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, yaml.MappingNode):
            raise InvalidArgument(f"--set {dotted}: {'.'.join(parts[:i])} is not a mapping")
        for k, v in node.value:
            if k.value == part:
                if i == len(parts) - 1:
                    node.value[node.value.index((k, v))] = (k, value)
                    return
                node = v
                break
        else:
            key = yaml.ScalarNode("tag:yaml.org,2002:str", part, start_mark=value.start_mark)
            child = value if i == len(parts) - 1 else yaml.MappingNode("tag:yaml.org,2002:map", [],
                                                                       start_mark=value.start_mark)
            node.value.append((key, child))
            if i == len(parts) - 1:
                return
            node = child


def load(path: Path | str, message_type: type[Message], *, overrides: list[str] = (), text: str | None = None,
         hooks: dict[str, Hook] | None = None, raise_problems: bool = True):
    """The file as a message and its node tree (for later checks that point at a line); InvalidArgument listing
    every problem with its file and line (or, raise_problems=False, the problems as a third value)."""
    source = str(path)
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"{source}: cannot read it: {e}") from None
    root = compose(text, source)
    for o in overrides:
        apply_override(root, o)
    loader = Loader(source, hooks)
    msg = message_type()
    loader.message(root, msg, "")
    if not raise_problems:
        return msg, root, loader.problems
    check(loader.problems)
    return msg, root
