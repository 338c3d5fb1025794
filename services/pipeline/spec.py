"""The pipeline file and the pipeline job's typed spec.

A pipeline file is a PipelineSpec (protos/tunery/v1/pipeline.proto) in YAML, with four conveniences over the
message's own shape (examples/*.yaml):

- `quantize:` a list of forms, each a scheme name (`gptq-w4a16`) or a mapping of QuantizeSpec fields with one;
- `suite.lm_eval_files:` a directory (or a list of files) of local lm-eval task files, read into the request;
- `generate.recipe:` a datagen recipe file, read into `recipe_yaml`; `generate.teacher: base` uses the pipeline's
  own base as the local teacher;
- local paths (`base.source`, `data.source`, `train_extra[].source`, `fact_probes.source`) are relative to the
  file's folder and must exist.

load_file() checks the whole file before anything is sent (services.core.yamlspec: file and line in every problem);
the pipeline service checks it again as a request.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, Field

from services.core.errors import FieldViolation, InvalidArgument, check
from services.core.yamlspec import did_you_mean, load, where
from services.gen.tunery.v1 import evaluation_pb2, pipeline_pb2, quantization_pb2

# scheme names as the CLI and SDK write them (gptq-w4a16, gguf-q4_k_m); '-' and '_' are the same to the loader
SCHEMES = {quantization_pb2.QuantScheme.Name(v).removeprefix("QUANT_SCHEME_").lower().replace("_", "-", 1)
           .replace("gguf-q4-k-m", "gguf-q4_k_m").replace("gguf-q8-0", "gguf-q8_0"): v
           for v in quantization_pb2.QuantScheme.values() if v}

# The stages in the order the job runs them. A stage's idempotency key is <pipeline id>-<stage>.
STAGES = ("import", "data", "prompting", "train", "eval", "merge", "eval-merged", "quantize", "eval-quantized",
          "serve", "eval-deployment", "report")
# What skip_stages may name (each drops the stages that need it: no merge, no quantized forms).
SKIPPABLE = ("prompting", "eval", "merge", "quantize", "serve")
URL = re.compile(r"^[a-z][a-z0-9+.-]*://")
LOCAL_SOURCES = ("base.source", "data.source", "fact_probes.source")
# smoke mode's slice where the file's smoke: block leaves a field unset
SMOKE_DEFAULTS = {"max_steps": 6, "micro_batch_size": 4, "max_tests_per_block": 4, "calibration_samples": 8,
                  "num_examples": 8}
TEACHER_IS_BASE = "base"


class PipelineJobSpec(BaseModel):
    """What the pipeline job reads: the checked spec (PipelineSpec in its proto JSON form), the pipeline's id (the
    stages' keys derive from it), smoke mode, and where the stage services answer."""

    pipeline_id: str
    spec: dict
    smoke: bool = False
    endpoints: dict[str, str] = Field(default_factory=dict)
    token_file: str = ""                   # where the worker reads the token it calls the services with


def smoke_slice(spec: pipeline_pb2.PipelineSpec) -> dict[str, int]:
    given = {k: getattr(spec.smoke, k) for k in SMOKE_DEFAULTS}
    return {k: given[k] or v for k, v in SMOKE_DEFAULTS.items()}


def _quantize_hook(node, at, msg, key, problems) -> None:
    """`quantize:` a list of scheme names or QuantizeSpec mappings (quantize_forms); each form's index in the file
    is kept in msg's `_yaml_index` list (a form the file names wrongly is left out)."""
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    for i, item in enumerate(items):
        here = f"quantize[{i}]"
        if isinstance(item, yaml.ScalarNode):
            word = str(item.value).strip().lower()
            word = next((n for n in SCHEMES if n.replace("_", "-") == word.replace("_", "-")), word)
            if word not in SCHEMES:
                problems.append(FieldViolation(f"{where_of(at, item)}: {here}", f"{word!r} is not a scheme: one of "
                                               f"{', '.join(SCHEMES)}{did_you_mean(word, SCHEMES)}"))
            else:
                msg.quantize_forms.add(scheme=SCHEMES[word])
                QUANTIZE_INDEX.append(i)
            continue
        from services.core.yamlspec import Loader

        form = msg.quantize_forms.add()
        QUANTIZE_INDEX.append(i)
        loader = Loader(at.rsplit(":", 2)[0])
        loader.message(item, form, here)
        problems.extend(loader.problems)  # a form without a scheme: spec_problems names it


QUANTIZE_INDEX: list[int] = []  # per quantize form, its index in the file being loaded (load_file resets it)


def where_of(at: str, node: yaml.Node) -> str:
    return where(at.rsplit(":", 2)[0], node)


def _files_hook(base: Path):
    def hook(node, at, msg, key, problems) -> None:
        names = [node] if isinstance(node, yaml.ScalarNode) else list(node.value) if isinstance(
            node, yaml.SequenceNode) else []
        if not names:
            problems.append(FieldViolation(f"{at}: suite.lm_eval_files", "a folder of lm-eval task files, or a list "
                                           "of files"))
            return
        for n in names:
            p = (base / str(n.value)).resolve()
            if p.is_dir():
                files = sorted(f for f in p.rglob("*") if f.is_file())
                root = p
            elif p.is_file():
                files, root = [p], p.parent
            else:
                problems.append(FieldViolation(f"{where_of(at, n)}: suite.lm_eval_files", f"{p} does not exist"))
                continue
            for f in files:
                msg.lm_eval_files.add(path=str(f.relative_to(root)), content=f.read_bytes())
    return hook


def _recipe_hook(base: Path):
    def hook(node, at, msg, key, problems) -> None:
        p = (base / str(node.value)).resolve()
        if not isinstance(node, yaml.ScalarNode) or not p.is_file():
            problems.append(FieldViolation(f"{at}: generate.recipe", f"{p} is not a recipe file"))
            return
        msg.recipe_yaml = p.read_text(encoding="utf-8")
    return hook


def _teacher_hook(node, at, msg, key, problems) -> None:
    if isinstance(node, yaml.ScalarNode) and str(node.value) == TEACHER_IS_BASE:
        msg.teacher.model.uri = TEACHER_IS_BASE  # the job puts the imported base's id here
        return
    from services.core.yamlspec import Loader

    loader = Loader(at.rsplit(":", 2)[0])
    loader.message(node, msg.teacher, "generate.teacher")
    problems.extend(loader.problems)


def node_at(root: yaml.Node, dotted: str) -> yaml.Node | None:
    """The node at `a.b[2].c`, or None."""
    node = root
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", dotted):
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(node, yaml.SequenceNode) or i >= len(node.value):
                return None
            node = node.value[i]
            continue
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((v for k, v in node.value if k.value == part), None)
        if node is None:
            return None
    return node


def nearest_node(root: yaml.Node, dotted: str) -> yaml.Node | None:
    """The node at `dotted`, else at the nearest part of it the file has (a missing key: its mapping)."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", dotted)
    while parts:
        node = node_at(root, "".join(p if p.startswith("[") else f".{p}" for p in parts).lstrip("."))
        if node is not None:
            return node
        parts.pop()
    return None


def load_file(path: Path | str, overrides: list[str] = ()) -> pipeline_pb2.PipelineSpec:
    """A pipeline file as a PipelineSpec, checked as a whole: InvalidArgument lists every problem with file and line.
    Relative local paths become absolute (relative to the file's folder)."""
    path = Path(path)
    base = path.resolve().parent
    QUANTIZE_INDEX.clear()
    hooks = {"quantize": _quantize_hook, "suite.lm_eval_files": _files_hook(base),
             "generate.recipe": _recipe_hook(base), "generate.teacher": _teacher_hook}
    spec, root, problems = load(path, pipeline_pb2.PipelineSpec, overrides=overrides, hooks=hooks,
                                raise_problems=False)

    def local(dotted: str, msg, node) -> None:
        src = msg.source
        if not src or URL.match(src):
            return
        p = Path(src) if Path(src).is_absolute() else base / src
        if not p.exists():
            at = f"{where(str(path), node)}: " if node is not None else f"{path}: "
            problems.append(FieldViolation(f"{at}{dotted}", f"{p} does not exist"))
            return
        msg.source = str(p.resolve())

    for dotted in LOCAL_SOURCES:
        holder = getattr(spec, dotted.split(".")[0])
        local(dotted, holder, node_at(root, dotted))
    extra = node_at(root, "train_extra")
    for i, item in enumerate(spec.train_extra):
        local(f"train_extra[{i}].source", item, extra.value[i] if isinstance(extra, yaml.SequenceNode) else None)
    for v in spec_problems(spec, ""):
        field = re.sub(r"^quantize\[(\d+)\]", lambda m: f"quantize[{QUANTIZE_INDEX[int(m.group(1))]}]"
                       if int(m.group(1)) < len(QUANTIZE_INDEX) else m.group(0), v.field)
        node = nearest_node(root, field)
        problems.append(FieldViolation(f"{where(str(path), node) if node is not None else str(path)}: {field}",
                                       v.description))
    check(problems)
    return spec


def spec_problems(spec: pipeline_pb2.PipelineSpec, source: str = "spec") -> list[FieldViolation]:
    """What the whole spec needs, beyond each field's type: the service runs the same checks on a request."""
    p: list[FieldViolation] = []

    def need(cond: bool, field: str, text: str) -> None:
        if not cond:
            p.append(FieldViolation(f"{source}: {field}" if source else field, text))

    need(bool(spec.base.source), "base.source", "is required: the base model's folder (or hf://org/name)")
    need(bool(spec.data.source or spec.HasField("generate") or spec.prepare.dataset.uri), "data",
         "give data.source (a JSONL/JSON/CSV/Parquet file), a generate: block, or prepare.dataset (an artifact)")
    need(spec.HasField("train"), "train", "is required: the training spec (method, lora, epochs, ...)")
    for i, s in enumerate(spec.skip_stages):
        need(s in SKIPPABLE, f"skip_stages[{i}]",
             f"{s!r} is not a stage that can be skipped: one of {', '.join(SKIPPABLE)}{did_you_mean(s, SKIPPABLE)}")
    forms = list(spec.quantize_forms) + ([spec.quantize] if spec.HasField("quantize") else [])
    schemes = [f.scheme for f in forms]
    need(len(schemes) == len(set(schemes)), "quantize", "names a scheme twice")
    for i, f in enumerate(forms):
        need(f.scheme != 0, f"quantize[{i}].scheme", f"is required: one of {', '.join(SCHEMES)}")
        need(not f.model.uri, f"quantize[{i}].model", "is the merged model: the pipeline fills it in")
    g = spec.gates
    if g.HasField("min_target_pass_rate"):
        need(0 <= g.min_target_pass_rate <= 1, "gates.min_target_pass_rate", "is a share from 0 to 1 (0.8 = 80%)")
    for name in ("max_general_drop_points", "max_tool_calling_drop_points"):
        if g.HasField(name):
            need(0 <= getattr(g, name) <= 100, f"gates.{name}", "is in points, from 0 to 100")
    if spec.HasField("max_form_drop_points"):
        need(0 <= spec.max_form_drop_points <= 100, "max_form_drop_points", "is in points, from 0 to 100")
    need(0 <= spec.few_shot_k <= 16, "few_shot_k", "from 0 to 16 examples")
    if spec.serve.name:
        from services.core.keys import NAME_RE

        need(bool(NAME_RE.match(spec.serve.name)), "serve.name", f"{spec.serve.name!r} is not a valid name: "
             "lowercase letters, digits, '.', '_' or '-'")
    need(not spec.serve.model.uri, "serve.model", "is the form that passed its gates: the pipeline fills it in")
    return p


def gates_text(g: evaluation_pb2.Gates) -> str:
    parts = []
    if g.HasField("min_target_pass_rate"):
        parts.append(f"target ≥ {g.min_target_pass_rate:.0%}")
    if g.HasField("max_general_drop_points"):
        parts.append(f"general drop ≤ {g.max_general_drop_points:g} pts")
    return ", ".join(parts) or "the default (a target gain beyond the noise)"


def check_id(pipeline_id: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,80}", pipeline_id):
        raise InvalidArgument(f"pipeline id {pipeline_id!r}: lowercase letters, digits, '.', '_' or '-'")
    return pipeline_id
