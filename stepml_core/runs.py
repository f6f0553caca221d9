"""Run folders: run-id parsing, metadata files, discovery in a data root.

A run id is ``YYYYMMDD-HHMMSS-<model>-tp<N>-<workload>`` (real runs) with an optional
``-synth`` suffix for StepML's synthetic runs, so a synthetic id never equals a real one.
Ids are validated before they become paths or Dagster partition keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from .catalog import canonical_model_name
from .errors import StepMLError

RUN_ID_RE = re.compile(
    r"^(?P<date>\d{8})-(?P<time>\d{6})-(?P<model>[a-z0-9][a-z0-9.-]*?)-tp(?P<tp>\d{1,2})"
    r"-(?P<workload>[a-z][a-z0-9]*)(?P<synth>-synth)?$"
)
MAX_RUN_ID_LEN = 120
TRACE_FILE_NAMES = ("traces.json", "traces.json.gz")
# what a run folder holds, in words (messages, --help): keep in step with discover_run_folders
RUN_FOLDER_CONTENTS = "traces.json[.gz] or requests.json[.gz] plus exp-config.yaml"
PROVENANCE_FILE = "provenance.json"


class RunIdError(StepMLError, ValueError):
    """A folder name that is not a valid run id."""


class RunMetadataError(StepMLError, ValueError):
    """A run's metadata file is missing or unreadable. ``problems``: every problem found in the run
    folder, each naming its file (the message joins them with "; ")."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


@dataclass(frozen=True)
class RunId:
    experiment_id: str
    started_at: datetime
    model_slug: str
    tp: int
    workload: str
    synthetic_suffix: bool

    @property
    def model(self) -> str:
        """Catalogue key of the model (raises UnknownModelError with what to add)."""
        return canonical_model_name(self.model_slug)


def parse_run_id(text: str) -> RunId:
    """Parse and validate a run id; raises RunIdError naming the problem."""
    if not isinstance(text, str) or not text or len(text) > MAX_RUN_ID_LEN:
        raise RunIdError(f"run id {text!r}: empty or longer than {MAX_RUN_ID_LEN} characters")
    m = RUN_ID_RE.match(text)
    if not m:
        raise RunIdError(
            f"run id {text!r} does not match YYYYMMDD-HHMMSS-<model>-tp<N>-<workload>[-synth] "
            "(lower-case letters, digits, '.', '-')"
        )
    try:
        started = datetime.strptime(m["date"] + m["time"], "%Y%m%d%H%M%S")
    except ValueError as e:
        raise RunIdError(f"run id {text!r}: bad date/time ({e})") from None
    tp = int(m["tp"])
    if tp < 1:
        raise RunIdError(f"run id {text!r}: tensor-parallel degree must be >= 1")
    return RunId(text, started, m["model"], tp, m["workload"], bool(m["synth"]))


def safe_load_yaml(path: Path) -> Any:
    """yaml.safe_load: plain data only, never Python object tags."""
    try:
        with open(path, "rb") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RunMetadataError(f"{path}:{where} not safe/plain YAML: {getattr(e, 'problem', e)}") from None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunMetadataError(f"{path}: not valid JSON ({e})") from None


@dataclass
class RunMetadata:
    """Everything about one run folder except its traces."""

    run: RunId
    folder: Path
    trace_path: Path | None
    source: str  # "real" or "synthetic"
    stands_for: str | None  # the real run a synthetic run is modelled on
    exp_config: dict = field(default_factory=dict)
    profile: dict = field(default_factory=dict)
    summary: dict | None = None  # inference-perf summary_lifecycle_metrics.json
    stages: list = field(default_factory=list)  # stage_<n>_lifecycle_metrics.json, in order
    provenance: dict | None = None

    @property
    def experiment_id(self) -> str:
        return self.run.experiment_id

    @property
    def model(self) -> str:
        return self.run.model

    @property
    def tp(self) -> int:
        return int(self.exp_config.get("tensor_parallelism", self.run.tp))

    @property
    def workload(self) -> str:
        return self.run.workload

    def as_record(self) -> dict:
        return {
            "experiment_id": self.experiment_id, "model": self.model, "tp": self.tp,
            "workload": self.workload, "source": self.source, "stands_for": self.stands_for,
            "trace_file": str(self.trace_path) if self.trace_path else None,
        }


def find_trace_file(folder: Path) -> Path | None:
    for name in TRACE_FILE_NAMES:
        p = folder / name
        if p.is_file():
            return p
    return None


def read_run_metadata(folder: Path, *, data_root: Path | None = None) -> RunMetadata:
    """Read a run folder's id and metadata files.

    Requires exp-config.yaml (vLLM server args) and a model in the catalogue. profile.yaml,
    results/*.json and provenance.json are optional. A provenance.json with
    ``"source": "synthetic"`` marks the run synthetic. Every problem is reported at once: one
    RunMetadataError listing them all (unknown model, missing exp-config.yaml, unreadable files).
    """
    folder = Path(folder)
    if data_root is not None:
        check_inside_root(folder, data_root)
    run = parse_run_id(folder.name)
    problems: list[str] = []

    def attempt(read, default):
        try:
            return read()
        except StepMLError as e:
            problems.append(str(e))
            return default

    attempt(lambda: run.model, None)  # a model not in the catalogue
    exp_config = attempt(lambda: _read_exp_config(folder / "exp-config.yaml"), {})
    profile = attempt(lambda: _read_optional_yaml(folder / "profile.yaml"), {})
    summary, stages = attempt(lambda: _read_results(folder / "results"), (None, []))
    prov_path = folder / PROVENANCE_FILE
    provenance = attempt(lambda: _load_json(prov_path) if prov_path.is_file() else None, None)
    if problems:
        raise RunMetadataError("; ".join(problems), problems)
    synthetic = bool(provenance and provenance.get("source") == "synthetic") or run.synthetic_suffix
    return RunMetadata(
        run=run, folder=folder, trace_path=find_trace_file(folder),
        source="synthetic" if synthetic else "real",
        stands_for=(provenance or {}).get("stands_for"),
        exp_config=exp_config, profile=profile, summary=summary, stages=stages, provenance=provenance,
    )


def run_folder_problems(folder: Path, *, data_root: Path | None = None) -> list[str]:
    """Every problem that stops read_run_metadata on this folder, one message each naming its file
    (empty: the metadata reads). What `stepml run` checks before it starts a run."""
    try:
        read_run_metadata(folder, data_root=data_root)
    except RunMetadataError as e:
        return e.problems
    except StepMLError as e:
        return [str(e)]
    return []


def _read_exp_config(path: Path) -> dict:
    if not path.is_file():
        raise RunMetadataError(f"{path}: missing (every run folder needs its vLLM exp-config.yaml)")
    exp_config = safe_load_yaml(path) or {}
    if not isinstance(exp_config, dict):
        raise RunMetadataError(f"{path}: expected a mapping, got {type(exp_config).__name__}")
    return exp_config


def _read_optional_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = safe_load_yaml(path)
    return data if isinstance(data, dict) else {}


def _read_results(results: Path) -> tuple[dict | None, list]:
    """inference-perf's summary_lifecycle_metrics.json and stage_<n>_lifecycle_metrics.json (in order)."""
    summary_path = results / "summary_lifecycle_metrics.json"
    summary = _load_json(summary_path) if summary_path.is_file() else None
    stage_files = sorted(results.glob("stage_*_lifecycle_metrics.json"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)) if results.is_dir() else []
    return summary, [_load_json(p) for p in stage_files]


def check_inside_root(folder: Path, data_root: Path) -> None:
    """Refuse folders (or symlinks) that resolve outside the data root."""
    root = Path(data_root).resolve()
    real = Path(folder).resolve()
    if real != root and root not in real.parents:
        raise RunMetadataError(f"{folder}: resolves to {real}, outside the data root {root} (symlink or path traversal)")


def resolve_data_root(data_root: Path) -> Path:
    """The folder holding run folders: data_root itself, or its experiments/ sub-folder."""
    root = Path(data_root)
    if root.is_dir() and (root / "experiments").is_dir() and not any(RUN_ID_RE.match(p.name) for p in root.iterdir()):
        return root / "experiments"
    return root


def discover_run_folders(data_root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Run folders under a data root: (valid folders, [(rejected path, reason)]).

    Accepts either a root whose children are run folders or a root with an
    ``experiments/`` sub-folder. Rejected: names that are not run ids, symlinks out of the
    root, folders with neither a trace file nor a request log.
    """
    from .request_log import has_request_log

    root = resolve_data_root(data_root)
    good, bad = [], []
    if not root.is_dir():
        return good, bad
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        try:
            check_inside_root(p, root)
            parse_run_id(p.name)
        except (RunIdError, RunMetadataError) as e:
            bad.append((p, str(e)))
            continue
        if find_trace_file(p) is None and not has_request_log(p):
            bad.append((p, f"{p}: no traces.json[.gz] and no request log (requests.json[.gz] or "
                           "results/per_request_lifecycle_metrics.json)"))
            continue
        good.append(p)
    return good, bad
