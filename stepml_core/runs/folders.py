"""Run folders: run-id parsing, metadata files, discovery in a data root.

A run id is ``YYYYMMDD-HHMMSS-<model>-tp<N>-<workload>`` (real runs) with an optional
``-synth`` suffix for StepML's synthetic runs, so a synthetic id never equals a real one.
Ids are validated before they become paths or Dagster partition keys.
"""

# long module: a run folder's whole contract in one place: discovery, run ids, metadata files, their size and YAML
# limits

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import yaml

from stepml_core.catalog import canonical_model_name
from stepml_core.errors import StepMLError
from stepml_core.runs.limits import DEFAULT_LIMITS, InputLimitError, InputLimits

# ASCII digits only ([0-9], not \d, which also matches full-width and other Unicode digits), the
# tensor-parallel degree without a leading zero (one spelling per run), and \Z (not $, which also
# matches before a trailing newline): one run folder has exactly one id.
RUN_ID_RE = re.compile(
    r"^(?P<date>[0-9]{8})-(?P<time>[0-9]{6})-(?P<model>[a-z0-9][a-z0-9.-]*?)-tp(?P<tp>[1-9][0-9]?)"
    r"-(?P<workload>[a-z][a-z0-9]*)(?P<synth>-synth)?\Z",
    re.ASCII,
)
MAX_RUN_ID_LEN = 120
TRACE_FILE_NAMES = ("traces.json", "traces.json.gz")
# what a run folder holds, in words (messages, --help): keep in step with discover_run_folders
RUN_FOLDER_CONTENTS = "traces.json[.gz] or requests.json[.gz] plus exp-config.yaml"
PROVENANCE_FILE = "provenance.json"
REQUESTS_FILES = ("requests.json", "requests.json.gz")  # request logs (stepml_core.runs.request_log reads them)
GROUND_TRUTH_FILES = ("ground_truth.json", "ground_truth.json.gz")
LIFECYCLE_FILE = "results/per_request_lifecycle_metrics.json"


class RunIdError(StepMLError, ValueError):
    """A folder name that is not a valid run id."""


class RunMetadataError(StepMLError, ValueError):
    """A run's metadata file is missing, unreadable, not a regular file or not valid. ``problems``: every
    problem found in the run folder, each naming its file (the message joins them with "; ")."""

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
        hint = ""
        if not text.isascii() or not text.isprintable():
            hint = ": only ASCII lower-case letters, digits, '.' and '-' (no spaces, newlines or other characters)"
        elif re.search(r"-tp0[0-9]", text):
            hint = ": write the tensor-parallel degree without a leading zero (tp2, not tp02), one spelling per run"
        raise RunIdError(
            f"run id {text!r} does not match YYYYMMDD-HHMMSS-<model>-tp<N>-<workload>[-synth] "
            f"(lower-case letters, digits, '.', '-'){hint}"
        )
    try:
        started = datetime.strptime(m["date"] + m["time"], "%Y%m%d%H%M%S")
    except ValueError as e:
        raise RunIdError(f"run id {text!r}: bad date/time ({e})") from None
    return RunId(text, started, m["model"], int(m["tp"]), m["workload"], bool(m["synth"]))


# --------------------------------------------------------------------------------------------
# Reading input files: regular files inside the data root only, bounded, fingerprinted as read
# --------------------------------------------------------------------------------------------


def file_kind(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for a non-regular st_mode."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_file_inside_root(path: Path, root: Path) -> Path:
    """The resolved path of a file; RunMetadataError if it (through a symlink) lies outside the root."""
    root_r = Path(root).resolve()
    real = Path(path).resolve()
    if root_r not in real.parents:
        raise RunMetadataError(
            f"{path}: a symlink to {real}, outside the data root {root_r}; "
            "StepML reads files inside the data folder only"
        )
    return real


def open_input(path: Path, root: Path | None = None):
    """(binary file object, os.stat_result) of an input file that is a regular file inside root.

    Opened non-blocking (opening a FIFO never waits for a writer), then checked with fstat on the
    open descriptor: a directory, FIFO, socket or device gets RunMetadataError saying what it is.
    """
    path = Path(path)
    target = check_file_inside_root(path, root) if root is not None else path
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise RunMetadataError(f"{path}: cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RunMetadataError(f"{path}: {file_kind(st.st_mode)}, not a regular file; StepML reads regular files only")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st


def file_record(folder: Path, path: Path, st: os.stat_result, size: int, sha256: str) -> dict:
    """Fingerprint of a file as read: {file, size_bytes (bytes read), mtime_ns (before reading), sha256 (of those bytes)}."""
    return {
        "file": str(Path(path).relative_to(folder)),
        "size_bytes": int(size),
        "mtime_ns": int(st.st_mtime_ns),
        "sha256": sha256,
    }


def read_input_bytes(
    path: Path,
    *,
    root: Path | None,
    max_bytes: int,
    limit: str,
    limits: InputLimits = DEFAULT_LIMITS,
    reads: dict | None = None,
    folder: Path | None = None,
) -> bytes:
    """All bytes of a small input file (at most max_bytes, else InputLimitError naming the limit);
    records its fingerprint as read in ``reads`` (keyed by path relative to folder)."""
    f, st = open_input(path, root)
    with f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputLimitError(f"{path}: larger than {max_bytes} bytes (limit {limits.describe(limit)})")
    if reads is not None and folder is not None:
        reads[str(Path(path).relative_to(folder))] = file_record(
            folder, path, st, len(data), hashlib.sha256(data).hexdigest()
        )
    return data


def _yaml_error(path: Path, e: yaml.YAMLError) -> RunMetadataError:
    mark = getattr(e, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return RunMetadataError(f"{path}:{where} not safe/plain YAML: {getattr(e, 'problem', None) or e}")


def _expanded_nodes(node, limit: int) -> int:
    """Nodes of a composed YAML document with every alias expanded (memoized: never expands)."""
    sizes: dict[int, int] = {}

    def size(n) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a recursive alias counts once (safe_load builds it as a cycle)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    return size(node) if node is not None else 0


def safe_load_yaml(
    path: Path,
    *,
    root: Path | None = None,
    limits: InputLimits = DEFAULT_LIMITS,
    reads: dict | None = None,
    folder: Path | None = None,
) -> Any:
    """yaml.safe_load of a bounded file: plain data only (never Python object tags), at most
    limits.max_metadata_bytes, at most limits.max_yaml_nodes nodes with aliases expanded."""
    data = read_input_bytes(
        path,
        root=root,
        max_bytes=limits.max_metadata_bytes,
        limit="max_metadata_bytes",
        limits=limits,
        reads=reads,
        folder=folder,
    )
    try:
        node = yaml.compose(data, Loader=yaml.SafeLoader)
        n = _expanded_nodes(node, limits.max_yaml_nodes)
        if n > limits.max_yaml_nodes:
            raise InputLimitError(
                f"{path}: more than {limits.max_yaml_nodes} YAML nodes once aliases are expanded "
                f"(limit {limits.describe('max_yaml_nodes')}); an alias bomb?"
            )
        return yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    except RecursionError:
        raise RunMetadataError(f"{path}: YAML nested too deeply") from None


def _load_json(path: Path, **kw) -> Any:
    data = read_input_bytes(path, max_bytes=kw["limits"].max_metadata_bytes, limit="max_metadata_bytes", **kw)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunMetadataError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise RunMetadataError(f"{path}: JSON nested too deeply") from None


# --------------------------------------------------------------------------------------------
# exp-config.yaml schema (the vLLM server arguments StepML reads)
# --------------------------------------------------------------------------------------------

# key: (lowest, highest) accepted integer. Bounds from what the engine can run: a TP degree is a
# GPU count (at most 1024); a step's token budget and a model's context fit in 2^24 tokens; the
# running batch is at most 2^20 sequences.
EXP_CONFIG_INT_KEYS: dict[str, tuple[int, int]] = {
    "tensor_parallelism": (1, 1024),
    "max_num_batched_tokens": (1, 1 << 24),
    "max_num_seqs": (1, 1 << 20),
    "max_model_len": (1, 1 << 24),
}
EXP_CONFIG_STR_KEYS = ("model", "app")


def validate_exp_config(cfg: Any, path: Path, run: RunId) -> dict:
    """exp-config.yaml as a mapping whose known keys have valid values; RunMetadataError naming the
    file and the key otherwise. Unknown keys are kept (vLLM has many more arguments)."""
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise RunMetadataError(f"{path}: expected a mapping of vLLM arguments, got {type(cfg).__name__}")
    for k, v in cfg.items():
        if not isinstance(k, str):
            raise RunMetadataError(f"{path}: key {k!r}: keys must be strings")
        if k in EXP_CONFIG_INT_KEYS:
            lo, hi = EXP_CONFIG_INT_KEYS[k]
            if isinstance(v, bool) or not isinstance(v, int):
                raise RunMetadataError(f"{path}: key {k}: expected an integer from {lo} to {hi}, got {_short_repr(v)}")
            if not lo <= v <= hi:
                raise RunMetadataError(f"{path}: key {k}: {v} is outside {lo}..{hi}")
        elif k in EXP_CONFIG_STR_KEYS and v is not None and not isinstance(v, str):
            raise RunMetadataError(f"{path}: key {k}: expected a string, got {_short_repr(v)}")
    tp = cfg.get("tensor_parallelism")
    if tp is not None and tp != run.tp:
        raise RunMetadataError(
            f"{path}: key tensor_parallelism: {tp}, but the run id {run.experiment_id!r} says tp{run.tp}"
        )
    return cfg


def _short_repr(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


# --------------------------------------------------------------------------------------------
# Run metadata
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunMetadata:
    """Everything about one run folder except its traces: read once (read_run_metadata) and handed on typed; JSON only
    where a stored value holds it (``to_json`` / ``from_json``: the request_log asset's ``run_metadata``)."""

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
    issues: list = field(
        default_factory=list
    )  # [{file, reason}]: optional files left out (malformed, not regular, ...)
    reads: dict = field(default_factory=dict)  # {relative path: fingerprint of the bytes read}

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
            "experiment_id": self.experiment_id,
            "model": self.model,
            "tp": self.tp,
            "workload": self.workload,
            "source": self.source,
            "stands_for": self.stands_for,
            "trace_file": str(self.trace_path) if self.trace_path else None,
        }

    def to_json(self) -> dict:
        """Every field as JSON values (paths as strings, the run as its id): what a stored value holds."""
        return {
            "experiment_id": self.experiment_id,
            "folder": str(self.folder),
            "trace_path": str(self.trace_path) if self.trace_path else None,
            "source": self.source,
            "stands_for": self.stands_for,
            "exp_config": self.exp_config,
            "profile": self.profile,
            "summary": self.summary,
            "stages": self.stages,
            "provenance": self.provenance,
            "issues": self.issues,
            "reads": self.reads,
        }

    @classmethod
    def from_json(cls, d: Mapping) -> RunMetadata:
        """The RunMetadata of ``to_json``'s value (the run id parsed and validated again)."""
        return cls(
            run=parse_run_id(d["experiment_id"]),
            folder=Path(d["folder"]),
            trace_path=Path(d["trace_path"]) if d.get("trace_path") else None,
            source=d["source"],
            stands_for=d.get("stands_for"),
            exp_config=dict(d.get("exp_config") or {}),
            profile=dict(d.get("profile") or {}),
            summary=d.get("summary"),
            stages=list(d.get("stages") or []),
            provenance=d.get("provenance"),
            issues=list(d.get("issues") or []),
            reads=dict(d.get("reads") or {}),
        )


def trace_file_entries(folder: Path) -> list[Path]:
    """Entries named traces.json / traces.json.gz of any type (a FIFO or directory too: reading says what it is)."""
    return [Path(folder) / n for n in TRACE_FILE_NAMES if os.path.lexists(Path(folder) / n)]


def find_trace_file(folder: Path) -> Path | None:
    """The run's one trace file (None if none); RunMetadataError if there are two."""
    found = trace_file_entries(folder)
    if len(found) > 1:
        sizes = []
        for p in found:
            try:
                sizes.append(f"{p.name} ({os.lstat(p).st_size} bytes)")
            except OSError:
                sizes.append(p.name)
        raise RunMetadataError(
            f"{folder}: two trace files, {' and '.join(sizes)}; StepML reads one: "
            "remove the one that is not the whole run"
        )
    return found[0] if found else None


def find_request_entries(folder: Path) -> dict[str, Path]:
    """{'requests', 'ground_truth', 'lifecycle': path} of the request-log entries present (of any type: reading says
    what a FIFO or directory is); RunMetadataError naming both when a run has two forms of one file (as traces)."""
    folder = Path(folder)
    out = {}
    for kind, names in (("requests", REQUESTS_FILES), ("ground_truth", GROUND_TRUTH_FILES)):
        found = [folder / n for n in names if os.path.lexists(folder / n)]
        if len(found) > 1:
            sizes = " and ".join(f"{p.name} ({_lsize(p)} bytes)" for p in found)
            raise RunMetadataError(
                f"{folder}: two {kind.replace('_', ' ')} files, {sizes}; StepML reads one: remove the one that is "
                "not the whole run"
            )
        if found:
            out[kind] = found[0]
    if os.path.lexists(folder / LIFECYCLE_FILE):
        out["lifecycle"] = folder / LIFECYCLE_FILE
    return out


def _lsize(p: Path) -> int | str:
    try:
        return os.lstat(p).st_size
    except OSError:
        return "?"


def _optional_json(path: Path, issues: list, **kw) -> Any:
    """An optional JSON object (results/*.json): None and an issue if unreadable, malformed or not a regular file."""
    try:
        doc = _load_json(path, **kw)
    except (RunMetadataError, InputLimitError, OSError) as e:
        issues.append({"file": str(path), "reason": f"optional file left out: {e}"})
        return None
    if not isinstance(doc, dict):
        issues.append(
            {
                "file": str(path),
                "reason": f"optional file left out: {path}: expected a JSON object, got {type(doc).__name__}",
            }
        )
        return None
    return doc


def read_run_metadata(folder: Path, *, data_root: Path | None = None, limits: InputLimits | None = None) -> RunMetadata:
    """Read a run folder's id and metadata files.

    Requires exp-config.yaml (vLLM server args; validated by validate_exp_config) and a model in
    the catalogue. profile.yaml, results/*.json and provenance.json are optional; a malformed or
    unreadable results/*.json file is left out and listed in ``issues`` (the steps survive). A
    provenance.json with ``"source": "synthetic"`` marks the run synthetic. Every problem is
    reported at once: one RunMetadataError listing them all (unknown model, missing or invalid
    exp-config.yaml, unreadable files, two trace files, a limit passed). Every file is read once,
    as a regular file inside the data root (default: the folder's parent), within ``limits``;
    ``reads`` holds the fingerprint of the bytes read.
    """
    folder = Path(folder)
    limits = limits or DEFAULT_LIMITS
    if data_root is not None:
        check_inside_root(folder, data_root)
    root = Path(data_root) if data_root is not None else folder.parent
    run = parse_run_id(folder.name)
    problems: list[str] = []
    reads: dict = {}
    issues: list = []
    kw = dict(root=root, limits=limits, reads=reads, folder=folder)

    def attempt(read, default):
        try:
            return read()
        except StepMLError as e:
            problems.append(str(e))
            return default

    attempt(lambda: run.model, None)  # a model not in the catalogue
    exp_config = attempt(lambda: _read_exp_config(folder / "exp-config.yaml", run, kw), {})
    profile = attempt(lambda: _read_optional_yaml(folder / "profile.yaml", kw), {})
    summary, stages = _read_results(folder / "results", issues, kw)  # optional: left out with an issue, never a problem
    provenance = attempt(lambda: _read_provenance(folder / PROVENANCE_FILE, kw), None)
    trace_path = attempt(lambda: find_trace_file(folder), None)
    attempt(lambda: find_request_entries(folder), None)  # two forms of a request file: refused as two trace files
    if problems:
        raise RunMetadataError("; ".join(problems), problems)
    synthetic = bool(provenance and provenance.get("source") == "synthetic") or run.synthetic_suffix
    return RunMetadata(
        run=run,
        folder=folder,
        trace_path=trace_path,
        source="synthetic" if synthetic else "real",
        stands_for=(provenance or {}).get("stands_for"),
        exp_config=exp_config,
        profile=profile,
        summary=summary,
        stages=stages,
        provenance=provenance,
        issues=issues,
        reads=reads,
    )


def run_folder_problems(folder: Path, *, data_root: Path | None = None, limits: InputLimits | None = None) -> list[str]:
    """Every problem that stops read_run_metadata on this folder, one message each naming its file
    (empty: the metadata reads). What `stepml run` checks before it starts a run."""
    try:
        read_run_metadata(folder, data_root=data_root, limits=limits)
    except RunMetadataError as e:
        return e.problems
    except StepMLError as e:
        return [str(e)]
    return []


def _read_exp_config(path: Path, run: RunId, kw: dict) -> dict:
    if not os.path.lexists(path):
        raise RunMetadataError(f"{path}: missing (every run folder needs its vLLM exp-config.yaml)")
    return validate_exp_config(safe_load_yaml(path, **kw), path, run)


def _read_optional_yaml(path: Path, kw: dict) -> dict:
    if not os.path.lexists(path):
        return {}
    data = safe_load_yaml(path, **kw)
    return data if isinstance(data, dict) else {}


def _read_results(results: Path, issues: list, kw: dict) -> tuple[dict | None, list]:
    """inference-perf's summary_lifecycle_metrics.json and stage_<n>_lifecycle_metrics.json (in order);
    each optional: one that cannot be used is left out with an issue."""
    summary, stages = None, []
    if results.is_dir() and not results.is_symlink():
        summary_path = results / "summary_lifecycle_metrics.json"
        if os.path.lexists(summary_path):
            summary = _optional_json(summary_path, issues, **kw)
        stage_files = sorted(
            results.glob("stage_*_lifecycle_metrics.json"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)
        )
        stages = [d for d in (_optional_json(p, issues, **kw) for p in stage_files) if d is not None]
    elif os.path.lexists(results):
        issues.append(
            {"file": str(results), "reason": "optional results/ left out: not a folder inside the run folder"}
        )
    return summary, stages


def _read_provenance(path: Path, kw: dict) -> dict | None:
    if not os.path.lexists(path):
        return None
    doc = _load_json(path, **kw)
    if not isinstance(doc, dict):
        raise RunMetadataError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _has_request_log(folder: Path, names: set[str]) -> bool:
    """An entry named like a request log (of any type: reading it says what is wrong)."""
    return bool(names & set(REQUESTS_FILES)) or os.path.lexists(folder / LIFECYCLE_FILE)


def check_inside_root(folder: Path, data_root: Path) -> None:
    """Refuse folders (or symlinks) that resolve outside the data root."""
    root = Path(data_root).resolve()
    real = Path(folder).resolve()
    if real != root and root not in real.parents:
        raise RunMetadataError(
            f"{folder}: resolves to {real}, outside the data root {root} (symlink or path traversal)"
        )


def resolve_data_root(data_root: Path) -> Path:
    """The folder holding run folders: data_root itself, or its experiments/ sub-folder."""
    root = Path(data_root)
    if root.is_dir() and (root / "experiments").is_dir() and not any(RUN_ID_RE.match(p.name) for p in root.iterdir()):
        return root / "experiments"
    return root


def discover_run_folders(data_root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Run folders under a data root: (valid folders, [(rejected path, reason)]).

    Accepts either a root whose children are run folders or a root with an ``experiments/``
    sub-folder. Rejected: names that are not run ids, symlinks out of the root, a second name for
    a folder already found (a symlink to another run folder: one physical run is one partition),
    folders that cannot be listed, folders with neither an entry named traces.json[.gz] nor a
    request log.
    """
    root = resolve_data_root(data_root)
    good, bad = [], []
    if not root.is_dir():
        return good, bad
    seen: dict[tuple[int, int], str] = {}
    entries = sorted(root.iterdir(), key=lambda p: (p.is_symlink(), p.name))  # real folders claim their identity first
    for p in entries:
        try:
            if not p.is_dir() or p.name.startswith("."):
                continue
            check_inside_root(p, root)
            parse_run_id(p.name)
            st = p.stat()
            ident = (st.st_dev, st.st_ino)
            if ident in seen:
                bad.append(
                    (p, f"{p}: the same run folder as {seen[ident]!r} (a symlink): one physical run is one partition")
                )
                continue
            names = set(os.listdir(p))
        except (RunIdError, RunMetadataError) as e:
            bad.append((p, str(e)))
            continue
        except OSError as e:
            bad.append((p, f"{p}: cannot be read ({e.strerror or e})"))
            continue
        seen[ident] = p.name
        if not names & set(TRACE_FILE_NAMES) and not _has_request_log(p, names):
            bad.append(
                (
                    p,
                    f"{p}: no traces.json[.gz] and no request log (requests.json[.gz] or "
                    "results/per_request_lifecycle_metrics.json)",
                )
            )
            continue
        good.append(p)
    good.sort(key=lambda p: p.name)
    return good, bad
