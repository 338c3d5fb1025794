"""lm-evaluation-harness tasks (the `lm-eval` package, pinned in requirements/serve.txt) as the control plane sees
them: pure Python + PyYAML; nothing here imports lm_eval at module level. Running them is
services.evaluation.lm_eval_run (the job, serve venv).

- `standard_index()`: what the pinned lm-eval knows without loading it: the names of its tasks, groups and tags
  with their output types, and the keys, metrics, aggregations and filters its task configs accept. Read from
  `suites/lm_eval_index.json.gz`, which `python -m services.evaluation.lm_eval_tasks index` writes with the serve
  venv (`make lm-eval-index`); tests/unit/serve/test_harness_lm_eval.py checks it against the installed lm-eval.
- `load_task_files(files, source)`: local task files (lm-eval YAML task configs, their data files and any
  `!function` modules) checked the way lm-eval will load them, with the file and line of what is wrong.
- `resolve(names, local, index)`: which tasks a request names, each local or standard, with its output types.
- `fact_task_files(rows)`: the project's fact probes (the foundation fixture's facts.jsonl) as a local
  multiple-choice task over the plain sentences the model was pretrained on.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import json
import posixpath
import random
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from services.core.errors import FailedPrecondition, InvalidArgument, yaml_error

LM_EVAL_VERSION = "0.4.13"
INDEX_PATH = Path(__file__).resolve().parent / "suites" / "lm_eval_index.json.gz"
OUTPUT_TYPES = {"m": "multiple_choice", "g": "generate_until", "l": "loglikelihood", "r": "loglikelihood_rolling"}
TYPE_CODES = {v: k for k, v in OUTPUT_TYPES.items()}
LOGLIKELIHOOD_TYPES = frozenset({"multiple_choice", "loglikelihood", "loglikelihood_rolling"})
# datasets' builders that read files (dataset_kwargs.data_files) rather than a dataset on the Hugging Face hub
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt")
# lm-eval's task index reads *.yaml only (lm_eval/tasks/_index.py); .yml files would be skipped silently
FILE_SUFFIXES = (".yaml", ".py", *DATA_SUFFIXES)
# keys lm-eval's task factory strips before TaskConfig(**cfg) (lm_eval/tasks/_factory.py) or resolves (include)
FACTORY_KEYS = frozenset({"tag", "group", "task_list", "include"})
TEMPLATE_KEYS = ("doc_to_text", "doc_to_target", "doc_to_choice")
MAX_DOCS_DEFAULT = 0  # 0: every document of the evaluated split


# ------------------------------------------------------------------------------------------------------ the index
@dataclass(frozen=True)
class Index:
    """The pinned lm-eval's task names and config vocabulary (see module doc)."""

    version: str
    names: Mapping[str, str]  # name -> "task:m" | "group:mg" | "tag:g" (kind : output type codes)
    task_keys: frozenset[str]
    group_keys: frozenset[str]
    metrics: frozenset[str]
    aggregations: frozenset[str]
    filters: frozenset[str]

    def kind(self, name: str) -> str:
        return self.names[name].split(":", 1)[0]

    def output_types(self, name: str) -> frozenset[str]:
        codes = self.names[name].split(":", 1)[1]
        return frozenset(OUTPUT_TYPES[c] for c in codes if c in OUTPUT_TYPES)

    def suggest(self, name: str, extra: Iterable[str] = ()) -> list[str]:
        return difflib.get_close_matches(name, [*extra, *self.names], n=3, cutoff=0.75)


_INDEX: Index | None = None


def standard_index(path: Path = INDEX_PATH) -> Index:
    global _INDEX
    if _INDEX is not None and path == INDEX_PATH:
        return _INDEX
    if not path.exists():
        raise FailedPrecondition(f"{path} is missing: run `make lm-eval-index` (python -m services.evaluation.lm_eval_tasks "
                                 "index with the serve venv)")
    doc = json.loads(gzip.decompress(path.read_bytes()))
    index = Index(version=doc["version"], names=doc["names"], task_keys=frozenset(doc["task_keys"]),
                  group_keys=frozenset(doc["group_keys"]), metrics=frozenset(doc["metrics"]),
                  aggregations=frozenset(doc["aggregations"]), filters=frozenset(doc["filters"]))
    if path == INDEX_PATH:
        _INDEX = index
    return index


def build_index() -> dict[str, Any]:
    """The index of the installed lm-eval (serve venv): every task, group and tag with its leaves' output types."""
    import dataclasses

    import lm_eval
    from lm_eval.api import registry
    from lm_eval.config.group import GroupConfig
    from lm_eval.config.task import TaskConfig
    from lm_eval.tasks import TaskManager

    tm = TaskManager()
    index = tm.task_index
    memo: dict[str, str] = {}

    def codes(name: str, seen: frozenset[str] = frozenset()) -> str:
        if name in memo:
            return memo[name]
        entry = index.get(name)
        if entry is None or name in seen:
            return ""
        kind = entry.kind.name
        cfg = entry.cfg or {}
        if kind in ("TASK", "PY_TASK"):
            out = TYPE_CODES.get(cfg.get("output_type") or "generate_until", "")
        else:
            # a group lists its members; a tag's entry holds the tasks that carry it
            members = (cfg.get("task") or []) if kind == "GROUP" else sorted(entry.tags)
            parts = set()
            for m in members if isinstance(members, list) else [members]:
                if isinstance(m, str):
                    parts |= set(codes(m, seen | {name}))
                elif isinstance(m, Mapping):
                    inner = m.get("group") or m.get("task")
                    own = m.get("output_type")
                    parts |= {TYPE_CODES[own]} if own in TYPE_CODES else set(codes(str(inner), seen | {name}))
            out = "".join(sorted(parts))
        memo[name] = out
        return out

    kinds = {"TASK": "task", "PY_TASK": "task", "GROUP": "group", "TAG": "tag"}
    names = {n: f"{kinds.get(e.kind.name, 'task')}:{codes(n)}" for n, e in sorted(index.items())}
    return {
        "version": lm_eval.__version__,
        "names": names,
        "task_keys": sorted(f.name for f in dataclasses.fields(TaskConfig)),
        "group_keys": sorted(f.name for f in dataclasses.fields(GroupConfig)),
        "metrics": sorted(registry.metric_registry.keys()),
        "aggregations": sorted(registry.aggregation_registry.keys()),
        "filters": sorted(registry.filter_registry.keys()),
    }


def write_index(path: Path = INDEX_PATH) -> Path:
    body = json.dumps(build_index(), sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(gzip.compress(body, mtime=0))  # byte-identical for the same lm-eval
    return path


# ------------------------------------------------------------------------------------------------ local task files
class FunctionRef(str):
    """A `!function module.name` value in a task YAML (lm-eval imports it from module.py beside the YAML)."""


class _TaskLoader(yaml.SafeLoader):
    pass


_TaskLoader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))


@dataclass
class LocalTask:
    name: str
    path: str  # the YAML that defines it
    kind: str  # "task" | "group"
    output_types: frozenset[str]
    split: str = ""
    data_file: str = ""  # "" for hub datasets
    docs: int | None = None  # rows of the evaluated split (None: not countable here, e.g. parquet)
    hub: str = ""  # what it needs from the Hugging Face hub at run time (a dataset id, evaluate metrics), or ""
    members: tuple[str, ...] = ()


@dataclass
class TaskFiles:
    files: dict[str, bytes]
    tasks: dict[str, LocalTask] = field(default_factory=dict)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for p in sorted(self.files):
            h.update(p.encode() + b"\0" + hashlib.sha256(self.files[p]).digest())
        return h.hexdigest()

    def leaf_tasks(self) -> list[str]:
        return [n for n, t in self.tasks.items() if t.kind == "task"]


def _relpath(path: str, where: str) -> str:
    """`path` normalised ("a/./b", "a/../b"), refused unless it stays inside the task files' root."""
    norm = posixpath.normpath(path) if path else ""
    if not norm or norm.startswith(("/", "../")) or norm in (".", "..") or "\\" in path:
        raise InvalidArgument.field(where, f"{path!r} must be a relative path inside the task files (no '..' "
                                           "above their root)")
    return norm


def _did_you_mean(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _data_rows(data: bytes, path: str, source: str) -> int | None:
    """Rows of a data file, checked line by line where the format allows (None: not countable without pyarrow)."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in (".parquet", ".arrow"):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{source}/{path}: not UTF-8 text (byte {e.start})") from None
    if suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("{") and "\n" in text.strip():
                return _data_rows(data, path[:-5] + ".jsonl", source)  # JSON lines in a .json file
            raise InvalidArgument(f"{source}/{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") \
                from None
        if isinstance(doc, list):
            return len(doc)
        return 1
    if suffix in (".jsonl", ".json"):
        n = 0
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgument(f"{source}/{path}: line {i}: malformed JSON (column {e.colno}: {e.msg})") \
                    from None
            if not isinstance(row, dict):
                raise InvalidArgument(f"{source}/{path}: line {i}: a row must be a JSON object, not "
                                      f"{type(row).__name__}")
            n += 1
        return n
    if suffix in (".csv", ".tsv"):
        rows = list(csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","))
        return max(0, len([r for r in rows if r]) - 1)  # the header row names the columns
    return len([ln for ln in text.splitlines() if ln.strip()])


def _data_files(kwargs: Any, where: str) -> dict[str, list[str]]:
    """dataset_kwargs.data_files as {split: [paths]}; a bare path or list is datasets' "train" split."""
    if not isinstance(kwargs, Mapping) or "data_files" not in kwargs:
        raise InvalidArgument.field(f"{where}.dataset_kwargs.data_files",
                                    "is required for a local dataset (the data file(s) of each split, relative to "
                                    "the task files)")
    df = kwargs["data_files"]
    if isinstance(df, str):
        return {"train": [df]}
    if isinstance(df, list) and all(isinstance(x, str) for x in df):
        return {"train": list(df)}
    if isinstance(df, Mapping) and all(isinstance(v, (str, list)) for v in df.values()):
        return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in df.items()}
    raise InvalidArgument.field(f"{where}.dataset_kwargs.data_files", "must be a path, a list of paths or "
                                                                      "{split: path(s)}")


def _functions(value: Any) -> list[FunctionRef]:
    if isinstance(value, FunctionRef):
        return [value]
    if isinstance(value, Mapping):
        return [f for v in value.values() for f in _functions(v)]
    if isinstance(value, list):
        return [f for v in value for f in _functions(v)]
    return []


def _check_task(cfg: dict[str, Any], yaml_path: str, files: Mapping[str, bytes], index: Index,
                rows: dict[str, int | None], source: str) -> LocalTask:
    name = cfg["task"]
    where = f"{source}/{yaml_path}: task {name!r}"
    if "class" in cfg:
        raise InvalidArgument.field(f"{where}.class", "Python task classes are not supported in task files; "
                                                      "describe the task in YAML (with !function helpers if needed)")
    unknown = sorted(k for k in cfg if k not in index.task_keys and k not in FACTORY_KEYS)
    if unknown:
        k = unknown[0]
        raise InvalidArgument.field(f"{where}.{k}", f"is not a key lm-eval {index.version} task configs accept"
                                                    f"{_did_you_mean(k, index.task_keys)}")
    out_type = cfg.get("output_type") or "generate_until"
    if out_type not in TYPE_CODES:
        raise InvalidArgument.field(f"{where}.output_type", f"{out_type!r} is not one of {', '.join(TYPE_CODES)}")
    for k in ("doc_to_text", "doc_to_target"):
        if cfg.get(k) is None and not (k == "doc_to_text" and out_type == "loglikelihood_rolling"):
            raise InvalidArgument.field(f"{where}.{k}", "is required (a Jinja template over the document's fields, "
                                                        "a field name, or !function)")
    if out_type == "multiple_choice" and cfg.get("doc_to_choice") is None:
        raise InvalidArgument.field(f"{where}.doc_to_choice", "is required for a multiple_choice task (the list "
                                                              "of choices, or a template or field giving it)")
    hub_metrics: list[str] = []
    for i, m in enumerate(cfg.get("metric_list") or []):
        if not isinstance(m, Mapping) or "metric" not in m:
            raise InvalidArgument.field(f"{where}.metric_list[{i}]", "must be a mapping with `metric`")
        metric = m["metric"]
        if m.get("hf_evaluate"):
            hub_metrics.append(str(metric))  # loaded with evaluate.load: from the hub at run time
        elif not isinstance(metric, FunctionRef) and metric not in index.metrics:
            raise InvalidArgument.field(f"{where}.metric_list[{i}].metric",
                                        f"unknown metric {metric!r}{_did_you_mean(str(metric), index.metrics)} "
                                        f"(lm-eval {index.version} has {', '.join(sorted(index.metrics))})")
        agg = m.get("aggregation")
        if agg is not None and not isinstance(agg, FunctionRef) and agg not in index.aggregations:
            raise InvalidArgument.field(f"{where}.metric_list[{i}].aggregation",
                                        f"unknown aggregation {agg!r}; one of {', '.join(sorted(index.aggregations))}")
    for i, f in enumerate(cfg.get("filter_list") or [] if isinstance(cfg.get("filter_list"), list) else []):
        for j, step in enumerate((f or {}).get("filter") or [] if isinstance(f, Mapping) else []):
            fn = step.get("function") if isinstance(step, Mapping) else None
            if fn is not None and not isinstance(fn, FunctionRef) and fn not in index.filters:
                raise InvalidArgument.field(f"{where}.filter_list[{i}].filter[{j}].function",
                                            f"unknown filter {fn!r}; one of {', '.join(sorted(index.filters))}")
    base = PurePosixPath(yaml_path).parent
    for ref in _functions(cfg):
        module, _, fn = str(ref).rpartition(".")
        if not module or not fn:
            raise InvalidArgument.field(where, f"!function {ref!r} must name module.function")
        if module.startswith("lm_eval."):
            continue  # lm-eval's own helpers are importable in the job
        py = (base / (module.replace(".", "/") + ".py")).as_posix()
        if py not in files:
            raise InvalidArgument.field(where, f"!function {ref}: {py} is not among the task files")
    dataset = cfg.get("dataset_path")
    if not isinstance(dataset, str) or not dataset:
        raise InvalidArgument.field(f"{where}.dataset_path", "is required: a local builder ("
                                    + ", ".join(LOCAL_BUILDERS) + ") with dataset_kwargs.data_files, or a "
                                    "Hugging Face dataset id")
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise InvalidArgument.field(f"{where}.test_split", "is required (or validation_split): the split lm-eval "
                                                           "evaluates")
    task = LocalTask(name=name, path=yaml_path, kind="task", output_types=frozenset({out_type}), split=str(split))
    if dataset not in LOCAL_BUILDERS:
        task.hub = f"dataset {dataset}"
        return task
    if hub_metrics:
        task.hub = f"evaluate metrics {', '.join(hub_metrics)}"
    splits = {k: [_relpath(p, f"{where}.dataset_kwargs.data_files") for p in paths]
              for k, paths in _data_files(cfg.get("dataset_kwargs"), where).items()}
    for rel in (rel for paths in splits.values() for rel in paths):
        if rel not in files:
            raise InvalidArgument.field(f"{where}.dataset_kwargs.data_files",
                                        f"{rel} is not among the task files ({', '.join(sorted(files))}); "
                                        "paths are relative to the task files' root")
        if rel not in rows:
            rows[rel] = _data_rows(files[rel], rel, source)
    if str(split) not in splits:
        raise InvalidArgument.field(f"{where}.{'test_split' if cfg.get('test_split') else 'validation_split'}",
                                    f"split {split!r} is not in dataset_kwargs.data_files (it has "
                                    f"{', '.join(splits)}; a bare path is the 'train' split)")
    counts = [rows[rel] for rel in splits[str(split)]]
    task.data_file = ", ".join(splits[str(split)])
    task.docs = None if any(c is None for c in counts) else sum(c or 0 for c in counts)
    if task.docs == 0:
        raise InvalidArgument.field(where, f"its {split!r} split ({task.data_file}) has no rows: zero tests")
    if cfg.get("process_docs") is not None:
        task.docs = None  # process_docs may drop or add documents
    return task


def _load_yaml(path: str, files: Mapping[str, bytes], source: str, included: set[str],
               seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """One task YAML with its `include`s merged (lm-eval's order: each include in turn, then the file's own keys);
    the files it includes are added to `included`."""
    if path in seen:
        raise InvalidArgument(f"{source}/{path}: include cycle ({' -> '.join((*seen, path))})")
    try:
        cfg = yaml.load(files[path].decode("utf-8"), Loader=_TaskLoader)
    except yaml.YAMLError as e:
        raise yaml_error(e, f"{source}/{path}") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{source}/{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(cfg, dict):
        raise InvalidArgument(f"{source}/{path}: a task config is a YAML mapping, not {type(cfg).__name__}")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict[str, Any] = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        if not isinstance(inc, str):
            raise InvalidArgument.field(f"{source}/{path}.include", "must be a path or a list of paths")
        rel = _relpath(inc if inc.startswith("/") else posixpath.join(posixpath.dirname(path), inc),
                       f"{source}/{path}.include")
        if rel not in files:
            raise InvalidArgument.field(f"{source}/{path}.include", f"{rel} is not among the task files")
        included.add(rel)
        merged.update(_load_yaml(rel, files, source, included, (*seen, path)))
    merged.update(cfg)
    return merged


def load_task_files(files: Mapping[str, bytes], source: str, index: Index | None = None) -> TaskFiles:
    """Check local lm-eval task files ({relative path: bytes}) as lm-eval will load them; raises InvalidArgument
    naming the file (and line) of the first problem."""
    index = index or standard_index()
    if not files:
        raise InvalidArgument.field(source, "has no files")
    clean: dict[str, bytes] = {}
    for p, data in files.items():
        rel = _relpath(p, f"{source}: file")
        suffix = PurePosixPath(rel).suffix.lower()
        if suffix == ".yml":
            raise InvalidArgument.field(f"{source}/{rel}", "lm-eval only reads task configs named *.yaml; rename it")
        if suffix not in FILE_SUFFIXES:
            raise InvalidArgument.field(f"{source}/{rel}", f"unsupported file type; task files are "
                                                           f"{', '.join(FILE_SUFFIXES)}")
        clean[rel] = bytes(data)
    out = TaskFiles(files=clean)
    rows: dict[str, int | None] = {}
    configs: dict[str, dict[str, Any]] = {}
    included: set[str] = set()
    for path in sorted(p for p in clean if p.endswith(".yaml")):
        configs[path] = _load_yaml(path, clean, source, included)
    if not configs:
        raise InvalidArgument.field(source, "holds no task config (*.yaml)")
    groups = {}
    for path, cfg in configs.items():
        if isinstance(cfg.get("group"), str) and "task" in cfg and not isinstance(cfg["task"], str):
            groups[path] = cfg
        elif isinstance(cfg.get("task"), str):
            name = cfg["task"]
            if name in out.tasks:
                raise InvalidArgument(f"{source}/{path}: task {name!r} is also defined in {out.tasks[name].path}")
            out.tasks[name] = _check_task(cfg, path, clean, index, rows, source)
        elif path not in included:
            raise InvalidArgument(f"{source}/{path}: defines neither `task` (a name) nor `group` with a `task` list, "
                                  "and no other task file includes it")
    for path, cfg in groups.items():
        name = cfg["group"]
        where = f"{source}/{path}: group {name!r}"
        unknown = sorted(k for k in cfg if k not in index.group_keys)
        if unknown:
            raise InvalidArgument.field(f"{where}.{unknown[0]}", f"is not a key lm-eval {index.version} group configs "
                                                                 f"accept ({', '.join(sorted(index.group_keys))})")
        members = cfg["task"] if isinstance(cfg["task"], list) else [cfg["task"]]
        names, types = [], set()
        for i, m in enumerate(members):
            member = m if isinstance(m, str) else (m.get("task") or m.get("group")) if isinstance(m, Mapping) else None
            if not isinstance(member, str):
                raise InvalidArgument.field(f"{where}.task[{i}]", "must be a task name or {task: name, ...}")
            if member in out.tasks:
                types |= out.tasks[member].output_types
            elif member in index.names:
                types |= index.output_types(member)
            else:
                raise InvalidArgument.field(f"{where}.task[{i}]", f"unknown task {member!r}"
                                                                  f"{_did_you_mean(member, out.tasks)}")
            names.append(member)
        if name in out.tasks:
            raise InvalidArgument(f"{source}/{path}: group {name!r} has the name of a task")
        out.tasks[name] = LocalTask(name=name, path=path, kind="group", output_types=frozenset(types),
                                    members=tuple(names))
    return out


# ------------------------------------------------------------------------------------------------------ resolution
@dataclass(frozen=True)
class Resolved:
    name: str
    source: str  # "local" | "standard"
    output_types: frozenset[str]
    hub: bool  # needs a dataset from the Hugging Face hub at run time


def resolve(names: Iterable[str], local: TaskFiles | None, index: Index | None = None,
            where: str = "spec.suite.lm_eval_tasks") -> list[Resolved]:
    """Each name a task or group of the local files (first) or of the pinned lm-eval; no names: every task the
    local files define."""
    index = index or standard_index()
    names = list(names)
    if not names and local is not None:
        names = local.leaf_tasks()
    out, seen = [], set()
    for i, n in enumerate(names):
        if not isinstance(n, str) or not re.fullmatch(r"[A-Za-z0-9_.\-:]+", n or ""):
            raise InvalidArgument.field(f"{where}[{i}]", f"{n!r} is not an lm-eval task name")
        if n in seen:
            raise InvalidArgument.field(f"{where}[{i}]", f"{n!r} is listed twice")
        seen.add(n)
        if local is not None and n in local.tasks:
            t = local.tasks[n]
            hub = bool(t.hub) or any(bool(local.tasks[m].hub) if m in local.tasks else True for m in t.members)
            out.append(Resolved(n, "local", t.output_types, hub))
        elif n in index.names:
            out.append(Resolved(n, "standard", index.output_types(n), True))
        else:
            near = index.suggest(n, local.tasks if local else ())
            raise InvalidArgument.field(f"{where}[{i}]", f"unknown lm-eval task {n!r}"
                                        + (f"; did you mean {', '.join(near)}?" if near else "")
                                        + f" (the tasks of lm-eval {index.version}"
                                        + (", or those the task files define" if local else "") + ")")
    if not out:
        raise InvalidArgument.field(where, "names no task (and the task files define none)")
    return out


# ------------------------------------------------------------------------------------------ the project's own tasks
def fact_task_files(rows: Iterable[Mapping[str, Any]], *, name: str = "fact_sentences", choices: int = 4,
                    seed: int = 0) -> dict[str, bytes]:
    """Facts ({id, answer, category, sentence}: the foundation fixture's facts.jsonl) as a local multiple-choice
    lm-eval task: the sentence up to its answer, scored by log-likelihood against `choices - 1` other answers of
    the same category (seeded). Facts whose sentence does not end with the answer are left out."""
    rows = [dict(r) for r in rows]
    rng = random.Random(seed)
    by_cat: dict[str, set[str]] = {}
    for r in rows:
        by_cat.setdefault(str(r.get("category", "")), set()).add(str(r["answer"]))
    docs = []
    for r in rows:
        sentence, answer = str(r.get("sentence") or ""), str(r["answer"])
        stem = sentence.rstrip(".!? ")
        if not stem.endswith(answer) or len(stem) == len(answer):
            continue
        others = sorted(by_cat[str(r.get("category", ""))] - {answer})
        if not others:
            continue
        opts = [answer, *rng.sample(others, min(choices - 1, len(others)))]
        rng.shuffle(opts)
        docs.append({"id": str(r.get("id", len(docs))), "context": stem[:-len(answer)].rstrip(), "choices": opts,
                     "label": opts.index(answer)})
    if not docs:
        raise InvalidArgument("fact_task_files: no fact has a sentence ending with its answer")
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
              "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1, "made_by": "tunery fact_task_files"}}
    return {f"{name}.yaml": yaml.safe_dump(config, sort_keys=False).encode(),
            f"{name}.jsonl": "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode()}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["index"]:
        raise SystemExit("usage: python -m services.evaluation.lm_eval_tasks index [PATH]   (with the serve venv)")
    path = write_index(Path(argv[1]) if len(argv) > 1 else INDEX_PATH)
    doc = json.loads(gzip.decompress(path.read_bytes()))
    print(f"{path}: lm-eval {doc['version']}, {len(doc['names'])} tasks, groups and tags")


if __name__ == "__main__":
    main()
