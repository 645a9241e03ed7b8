"""greater: optimise a local model's task prompt with gradients over reasoning (GReaTer).

    import greater
    run = greater.optimize(model="smollm2-135m", task="arithmetic", size="demo", difficulty=1)
    print(run.prompt, run.accuracy["optimised"], run.accuracy["zero-shot CoT"])

Settings are the keys of ``greater optimize --help`` with underscores (``top_k``,
``max_reasoning``, ...), checked as the command line checks them: a bad one raises
``ValueError`` naming it. Runs go to a folder (``out``) that the command line reads too
(``greater report``, ``greater optimize --resume``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from . import _greater

__all__ = ["Accuracy", "Paired", "Run", "Task", "defaults", "evaluate", "load_run", "optimize", "protocol", "screen"]
__version__ = _greater.__version__

#: Called with (kind, data) for every event of a run: "info", "start", "step",
#: "eval_start", "eval_progress", "finished".
EventCallback = Callable[[str, dict], None]

ANSWER_KINDS = ("choice", "yes_no", "true_false", "valid_invalid", "true_false_uncertain", "integer", "text")


@dataclass(frozen=True)
class Accuracy:
    """A measured accuracy: ``value`` = ``correct`` / ``n``, with its 95% Wilson interval."""

    value: float
    correct: int
    n: int
    interval: tuple
    cut_by_budget: Optional[int] = None
    unparsed: Optional[int] = None

    @classmethod
    def _from(cls, e: Mapping[str, Any]) -> "Accuracy":
        return cls(e["accuracy"], e["correct"], e["n"], tuple(e["interval"]), e.get("cut_by_budget"), e.get("unparsed"))


@dataclass(frozen=True)
class Paired:
    """The returned prompt against zero-shot CoT on the same test questions: how many only
    the returned prompt got right, how many only zero-shot CoT, and the exact two-sided
    McNemar ``p_value`` of that split."""

    only_optimised: int
    only_zero_shot_cot: int
    n: int
    p_value: float


@dataclass
class Run:
    """A run folder as Python sees it, finished or not.

    ``prompt`` is the returned prompt and ``accuracy`` the test accuracy of "zero-shot CoT",
    "initial" and "optimised" once the run has finished (None and empty before);
    ``steps`` are the step log's records (one dict per step); ``settings`` the recorded
    settings; ``summary`` summary.json as a dict.
    """

    folder: Path
    settings: dict
    steps: list = field(default_factory=list)
    summary: Optional[dict] = None

    @property
    def finished(self) -> bool:
        return self.summary is not None

    @property
    def last_step(self) -> int:
        """The last finished step (0 before the first)."""
        return self.steps[-1]["step"] if self.steps else 0

    @property
    def prompt(self) -> Optional[str]:
        return self.summary["best_prompt"] if self.summary else None

    @property
    def accuracy(self) -> dict:
        if not self.summary:
            return {}
        return {e["label"]: Accuracy._from(e) for e in self.summary["evaluations"]}

    @property
    def paired(self) -> Optional[Paired]:
        """The returned prompt against zero-shot CoT question by question (None before the
        run has finished, without test questions, or in folders of versions without it)."""
        p = self.summary.get("paired") if self.summary else None
        return Paired(p["only_first"], p["only_second"], p["n"], p["p_value"]) if p else None

    @property
    def selected(self) -> Optional[str]:
        """Which contender the returned prompt is ("train #1", "initial", ...)."""
        return self.summary["selected"] if self.summary else None


def load_run(path: Union[str, os.PathLike]) -> Run:
    """Reads the run folder at ``path`` (finished or interrupted)."""
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no run (no config.json)")
    run = json.loads(_greater.read_run(str(folder)))
    return Run(folder=folder, settings=run["settings"], steps=run["steps"], summary=run["summary"])


@dataclass(frozen=True)
class Task:
    """A task from Python records: ``[{"question": ..., "answer": ...}, ...]``.

    ``answer_kind`` is one of ``ANSWER_KINDS`` ("choice" needs ``choices``, the number of
    options, answered as letters); ``extractor`` and ``initial_prompt`` default to the
    paper's for the kind. The records are written once to a folder named by their content
    under the cache, so that a run can be resumed later.
    """

    records: Sequence[Mapping[str, Any]]
    answer_kind: str
    name: str = "custom"
    choices: Optional[int] = None
    extractor: Optional[str] = None
    initial_prompt: Optional[str] = None

    def __post_init__(self):
        if self.answer_kind not in ANSWER_KINDS:
            raise ValueError(f"answer_kind {self.answer_kind!r}: one of {', '.join(ANSWER_KINDS)}")
        for i, r in enumerate(self.records):
            if "question" not in r or "answer" not in r:
                raise ValueError(f"record {i}: needs 'question' and 'answer'")

    def path(self) -> str:
        """The task file written for these records."""
        lines = "".join(json.dumps({"question": str(r["question"]), "answer": str(r["answer"])}) + "\n" for r in self.records)
        spec = {"name": self.name, "data": "data.jsonl", "question": "question", "answer": "answer", "answer_kind": self.answer_kind}
        for key in ("choices", "extractor", "initial_prompt"):
            if getattr(self, key) is not None:
                spec[key] = getattr(self, key)
        toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in spec.items())
        digest = hashlib.sha256((toml + lines).encode()).hexdigest()[:16]
        folder = _cache() / "tasks" / f"{self.name}-{digest}"
        if not (folder / "task.toml").exists():
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "data.jsonl").write_text(lines)
            (folder / "task.toml").write_text(toml)
        return str(folder / "task.toml")


def _cache() -> Path:
    if os.environ.get("GREATER_CACHE"):
        return Path(os.environ["GREATER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "greater"


def _settings_json(model, task, settings: Mapping[str, Any]) -> str:
    keys = dict(settings)
    if model is not None:
        keys["model"] = str(model)
    if task is not None:
        keys["task"] = task.path() if isinstance(task, Task) else str(task)
    if "data_dir" in keys:
        keys["data_dir"] = str(Path(keys["data_dir"]).resolve())
    for key, value in keys.items():
        # JSON has no NaN or infinity: say which setting holds one.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"setting {key} must be a finite number, not {value}")
    return json.dumps({k: v for k, v in keys.items() if v is not None})


class _Progress:
    """Draws a run's events with tqdm when it is installed, else passes them to ``callback``."""

    def __init__(self, show: bool, callback: Optional[EventCallback]):
        self.callback = callback
        self.bar = None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.tqdm = tqdm if show else None

    def __call__(self, kind: str, text: str) -> None:
        data = json.loads(text)
        if self.callback is not None:
            self.callback(kind, data)
        if self.tqdm is None:
            return
        if kind == "start":
            self._close()
            self.bar = self.tqdm(total=data["total"], initial=data["done"], desc="steps", unit="step")
        elif kind == "step" and self.bar is not None:
            self.bar.set_postfix_str(f"best {data['best_score']:.3f}")
            self.bar.update(1)
        elif kind == "eval_start":
            self._close()
            self.bar = self.tqdm(total=data["questions"], desc=data["label"], unit="q")
        elif kind == "eval_progress" and self.bar is not None:
            self.bar.update(data["done"] - self.bar.n)
        elif kind == "finished":
            self._close()

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def optimize(
    model: Optional[str] = None,
    task: Union[str, Task, None] = None,
    *,
    out: Union[str, os.PathLike, None] = None,
    size: Optional[str] = None,
    preset: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    callback: Optional[EventCallback] = None,
    **settings: Any,
) -> Run:
    """Optimises the prompt of ``model`` on ``task`` and returns the finished run.

    model: an alias (``greater models``), a GGUF file or a Hugging Face folder.
    task: a built-in task name, a task TOML file, or a :class:`Task`.
    out: the run folder (default: ``greater-runs/<task>-<time>``).
    size: "demo", "light" (default), "medium" or "paper": question counts, steps, budget.
    preset: "reference" for every method setting at the reference implementation's value.
    resume: continue the run in ``out`` with its recorded settings (``steps`` may change).
    progress: a tqdm bar when tqdm is installed.
    callback: called with (kind, data) for every event.
    settings: any other setting by its key, e.g. ``train=20, dev=50, top_k=40``.

    Ctrl-C raises KeyboardInterrupt; the steps finished so far stay in ``out``.
    """
    if out is None:
        if resume:
            raise ValueError("resume=True needs out=FOLDER")
        name = Path(task.path()).parent.name if isinstance(task, Task) else Path(str(task or "arithmetic")).stem
        out = Path("greater-runs") / f"{name}-{int(time.time())}"
    if resume:
        extra = set(settings) - {"steps"}
        if extra or model is not None or task is not None or size or preset:
            raise ValueError("resume=True keeps the recorded settings; only steps= may change")
        _greater.optimize("{}", str(out), _Progress(progress, callback), resume=True, steps=settings.get("steps"))
    else:
        _greater.optimize(_settings_json(model, task, settings), str(out), _Progress(progress, callback), size=size, preset=preset)
    return load_run(out)


def evaluate(
    model: Optional[str] = None,
    task: Union[str, Task, None] = None,
    prompt: str = "Let's think step by step.",
    *,
    size: Optional[str] = None,
    progress: bool = True,
    callback: Optional[EventCallback] = None,
    **settings: Any,
) -> dict:
    """Scores ``prompt`` on the test questions of ``task`` that the settings choose.

    Returns a dict: "task", "model", "prompt", "report" (accuracy, correct, n, interval,
    majority_floor, cut_by_budget, unparsed, tokens_generated, seconds) and "records" (one
    per question: question, reasoning, raw and parsed answer, gold, correct).
    """
    text = _greater.evaluate(_settings_json(model, task, settings), prompt, _Progress(progress, callback), size=size)
    return json.loads(text)


def protocol(
    model: Optional[str] = None,
    tasks: Optional[Sequence[str]] = None,
    *,
    out: Union[str, os.PathLike],
    methods: Optional[Sequence[str]] = None,
    baseline_tasks: Optional[int] = None,
    transfer_to: Optional[str] = None,
    size: Optional[str] = None,
    preset: Optional[str] = None,
    shard: Optional[tuple] = None,
    resume: bool = False,
    progress: bool = True,
    callback: Optional[EventCallback] = None,
    **settings: Any,
) -> dict:
    """Runs ``optimize`` with one configuration over ``tasks`` (default: the paper's five),
    a run folder each under ``out``, and returns the table (a dict, as protocol.json).

    methods: e.g. ["greater", "ape", "gcg"]; baseline_tasks: run the methods after the
    first on the first n tasks only (the first method runs on every task first); transfer_to:
    a second model each task's prompt is also measured on. shard=(i, n) runs only task j where j % n == i, beside other
    shards on the same ``out`` (other processes or machines, e.g. Ray tasks); the table
    covers the tasks finished so far, and ``protocol(out=..., resume=True)`` (or the last
    shard) gives the whole one.
    """
    if resume:
        if settings or model is not None or tasks is not None or methods or baseline_tasks or transfer_to or size or preset:
            raise ValueError("resume=True keeps the recorded settings")
        text = _greater.protocol("{}", [], str(out), _Progress(progress, callback), shard=shard, resume=True)
    else:
        text = _greater.protocol(
            _settings_json(model, None, settings),
            list(tasks or []),
            str(out),
            _Progress(progress, callback),
            methods=list(methods) if methods else None,
            baseline_tasks=baseline_tasks,
            transfer_to=transfer_to,
            size=size,
            preset=preset,
            shard=shard,
        )
    return json.loads(text)


def screen(
    model: Optional[str] = None,
    tasks: Optional[Sequence[str]] = None,
    *,
    configurations: Union[str, os.PathLike, Mapping[str, Mapping[str, Any]], None] = None,
    out: Union[str, os.PathLike],
    size: Optional[str] = None,
    preset: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    callback: Optional[EventCallback] = None,
    **settings: Any,
) -> dict:
    """Runs the search under each of ``configurations`` on each of ``tasks``, judged on train
    and dev only (no test question is evaluated), a run folder each under ``out``, and
    returns the table (a dict, as screen.json): per configuration and task, the dev accuracy
    of zero-shot CoT, the initial prompt and the best searched prompt, and its gain.

    configurations: a dict from a name to the settings it changes from the others given
    here, e.g. ``{"base": {}, "budget-1024": {"max_reasoning": 1024}}`` (run in this order),
    or a TOML file of them as ``greater screen --configurations`` takes.
    ``screen(out=..., resume=True)`` continues a screening that was stopped.
    """
    if resume:
        if settings or model is not None or tasks is not None or configurations is not None or size or preset:
            raise ValueError("resume=True keeps the recorded settings")
        text = _greater.screen("{}", [], str(out), _Progress(progress, callback), resume=True)
    else:
        if not tasks:
            raise ValueError("a screening needs tasks=[...]")
        if isinstance(configurations, Mapping):
            pairs = [(str(name), _settings_json(None, None, changes)) for name, changes in configurations.items()]
            named = dict(configurations=pairs)
        elif configurations is not None:
            named = dict(file=str(configurations))
        else:
            raise ValueError("pass configurations={name: {setting: value}} or a TOML file of them")
        text = _greater.screen(
            _settings_json(model, None, settings),
            list(tasks),
            str(out),
            _Progress(progress, callback),
            size=size,
            preset=preset,
            **named,
        )
    return json.loads(text)


def export(run: Union[str, os.PathLike], to: str, out: Union[str, os.PathLike, None] = None) -> str:
    """The finished run's prompt laid out as the run laid it out, for `to`: "jinja" or
    "llamacpp" (a chat template), "hf" (a tokenizer_config.json; an existing `out` keeps its
    other keys), "ollama" (a Modelfile) or "python" (a llama-cpp-python script). Written to
    `out` when given; the file's text is returned."""
    return _greater.export(str(run), to, None if out is None else str(out))


def defaults(size: Optional[str] = None) -> dict:
    """Every setting's key with its default value (at ``size``)."""
    return json.loads(_greater.defaults(size))
