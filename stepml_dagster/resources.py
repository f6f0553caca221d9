"""Where StepML reads runs and writes outputs (one resource, set per deployment)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from stepml_core.paths import DEFAULT_EXPERIMENTS_DIR, PROJECT_ROOT
from stepml_core.runs.folders import check_inside_root, parse_run_id, resolve_data_root
from stepml_core.runs.limits import InputLimits
from stepml_core.study.h1 import POOLED_SETS, FoldCache

DEFAULT_OUT_DIR = PROJECT_ROOT / "out"
_SHARED_REAL = PROJECT_ROOT.parent / "shared" / "real" / "experiments"
DEFAULT_REAL_REFERENCE_DIR = str(_SHARED_REAL) if _SHARED_REAL.is_dir() else ""


@dataclass(frozen=True)
class SensorLimits:
    """One experiment_sensor tick: settle_s (a folder whose files are all older is launched even if it looks
    unfinished), hash_budget_bytes (bytes hashed or inflated per tick), time_budget_s (seconds per tick)."""

    settle_s: float = 60.0
    hash_budget_bytes: int = 4096 * 2**20
    time_budget_s: float = 20.0

    @classmethod
    def from_env(
        cls, *, settle_s: float | None = None, hash_budget_mb: float | None = None, time_budget_s: float | None = None
    ) -> "SensorLimits":
        """Given values, else STEPML_SENSOR_SETTLE_S / _HASH_BUDGET_MB / _TIME_BUDGET_S, else the defaults
        (an unparsable variable counts as unset)."""
        settle = _env_float("STEPML_SENSOR_SETTLE_S", settle_s, 60.0)
        mb = _env_float("STEPML_SENSOR_HASH_BUDGET_MB", hash_budget_mb, 4096.0)
        budget = _env_float("STEPML_SENSOR_TIME_BUDGET_S", time_budget_s, 20.0)
        return cls(settle_s=max(0.0, settle), hash_budget_bytes=max(1, int(mb * 2**20)), time_budget_s=max(0.1, budget))


def _env_float(name: str, given: float | None, default: float) -> float:
    if given is not None:
        return float(given)
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


class StepMLSettings(dg.ConfigurableResource):
    """data_dir: folder of run folders (the landing zone); out_dir: report, metrics.csv, verdict.json, stored assets."""

    data_dir: str = str(DEFAULT_EXPERIMENTS_DIR)
    out_dir: str = str(DEFAULT_OUT_DIR)
    seed: int = 0
    real_reference_dir: str = (
        DEFAULT_REAL_REFERENCE_DIR  # real run folders to calibrate synthetic runs against ("" = none)
    )
    fit_threads: int = min(2, os.cpu_count() or 1)  # threads for the pooled folds of the study assets
    reuse_fits: bool = True  # pooled folds whose training data and code are unchanged reuse their stored fit
    # input limits per run (None: STEPML_<NAME> from the environment, else the default in stepml_core.runs.limits.InputLimits)
    max_trace_bytes: int | None = None
    max_inflate_ratio: float | None = None
    max_line_bytes: int | None = None
    max_unreadable_lines: int | None = None
    max_quarantine_rows: int | None = None
    max_metadata_bytes: int | None = None
    max_yaml_nodes: int | None = None
    max_request_bytes: int | None = None
    max_request_span_s: float | None = None
    # experiment_sensor's tick (None: STEPML_SENSOR_<NAME> from the environment, else the default in SensorLimits)
    sensor_settle_s: float | None = None  # a folder unchanged this long is launched even if it looks unfinished
    sensor_hash_budget_mb: float | None = None  # MiB one tick may hash or inflate
    sensor_time_budget_s: float | None = None  # seconds one tick may spend (Dagster stops an evaluation at 60 s)
    # calibrate the piecewise decode form too (None: STEPML_PIECEWISE_DECODE=1 from the environment, else off;
    # docs/calibration.md, *The piecewise decode form*)
    piecewise_decode_form: bool | None = None
    # calibrate with the load-delay stage (None: STEPML_LOAD_DELAY=1 from the environment, else off;
    # docs/calibration.md, *What the TTFT goals ask of the cycle*, point 5)
    load_delay_stage: bool | None = None
    # check the what-if against the recorded runs in the study (None: STEPML_WHATIF_CHECK=1 from the environment)
    whatif_check_runs: bool | None = None

    # replay every run with two paths too (None: STEPML_TWO_PATH from the environment: 1, or a step-times CSV)
    two_path_steps: str | None = None

    def two_path_steps_file(self):
        """The step-times CSV the study's two_path asset reads; None: not asked (opt-in; stepml_core.replay.two_path)."""
        from stepml_core.paths import PROJECT_ROOT
        from stepml_core.replay.two_path import TWO_PATH_ENV, steps_file

        given = self.two_path_steps if self.two_path_steps is not None else os.environ.get(TWO_PATH_ENV, "")
        return steps_file(given, PROJECT_ROOT)

    @property
    def whatif_check(self) -> bool:
        """Whether the study's whatif_check asset predicts every run from its profile alone (opt-in)."""
        if self.whatif_check_runs is not None:
            return bool(self.whatif_check_runs)
        return os.environ.get("STEPML_WHATIF_CHECK", "").strip().lower() in ("1", "true", "yes", "on")

    @property
    def piecewise_decode(self) -> bool:
        """Whether request_calibration calibrates the piecewise decode form beside the linear one (opt-in)."""
        if self.piecewise_decode_form is not None:
            return bool(self.piecewise_decode_form)
        return os.environ.get("STEPML_PIECEWISE_DECODE", "").strip().lower() in ("1", "true", "yes", "on")

    @property
    def load_delay(self) -> bool:
        """Whether request_calibration adds the load-delay stage (calibration.load_delay; opt-in)."""
        if self.load_delay_stage is not None:
            return bool(self.load_delay_stage)
        return os.environ.get("STEPML_LOAD_DELAY", "").strip().lower() in ("1", "true", "yes", "on")

    def input_limits(self) -> InputLimits:
        """The limits a run folder is read under: these fields, else STEPML_<NAME>, else the defaults."""
        return InputLimits.from_env(
            max_trace_bytes=self.max_trace_bytes,
            max_inflate_ratio=self.max_inflate_ratio,
            max_line_bytes=self.max_line_bytes,
            max_unreadable_lines=self.max_unreadable_lines,
            max_quarantine_rows=self.max_quarantine_rows,
            max_metadata_bytes=self.max_metadata_bytes,
            max_yaml_nodes=self.max_yaml_nodes,
            max_request_bytes=self.max_request_bytes,
            max_request_span_s=self.max_request_span_s,
        )

    def sensor_limits(self) -> "SensorLimits":
        """What one experiment_sensor tick may spend: these fields, else STEPML_SENSOR_<NAME>, else the defaults."""
        return SensorLimits.from_env(
            settle_s=self.sensor_settle_s,
            hash_budget_mb=self.sensor_hash_budget_mb,
            time_budget_s=self.sensor_time_budget_s,
        )

    def fold_caches(self) -> dict[str, FoldCache] | None:
        """<out_dir>/cache/<asset>/ per pooled asset: fitted folds keyed by content (see stepml_core.study.h1.fold_key)."""
        return (
            {name: FoldCache(Path(self.out_dir) / "cache" / name) for name in POOLED_SETS} if self.reuse_fits else None
        )

    def out_dir_path(self) -> Path:
        return Path(self.out_dir)

    def assets_dir(self) -> Path:
        """Where the parquet IO manager stores asset values."""
        return Path(self.out_dir) / "assets"

    def data_root(self) -> Path:
        return Path(self.data_dir)

    def run_folder(self, experiment_id: str) -> Path:
        """The run folder of a partition key, validated (run-id syntax, inside the data root)."""
        parse_run_id(experiment_id)
        folder = self.data_root() / experiment_id
        check_inside_root(folder, self.data_root())
        return folder


def settings_from_env() -> StepMLSettings:
    """STEPML_DATA_DIR may name the run folders' parent or a folder with an experiments/ sub-folder."""
    return StepMLSettings(
        data_dir=str(resolve_data_root(Path(os.environ.get("STEPML_DATA_DIR", str(DEFAULT_EXPERIMENTS_DIR))))),
        out_dir=os.environ.get("STEPML_OUT_DIR", str(DEFAULT_OUT_DIR)),
        real_reference_dir=os.environ.get("STEPML_REAL_REFERENCE_DIR", DEFAULT_REAL_REFERENCE_DIR),
    )
