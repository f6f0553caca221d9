"""`stepml export`: ship a study's recommended step-time model per LLM model.

  stepml export --format blis   [--study OUT] --out DIR   DIR/<model_short>.json in BLIS's StepML model format,
                                                          and per run of OUT with a request log DIR/runs/<run>/
                                                          trace.csv + run_blis.sh (its `blis run` command)
  stepml export --format blis   [--study OUT] --out DIR --requests RUN_FOLDER [RUN_FOLDER ...]
                                                          the same for run folders holding a request log (and the
                                                          profile/config files `stepml run` reads), not OUT's runs
  stepml export --format stepml [--study OUT] --out DIR   DIR/<model_short>.json in StepML's own JSON

OUT is a `stepml run` output folder (default out/): its replay.csv says which model is recommended,
its stored assets hold the models (replay_models, request_calibration) and the runs' request logs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepml_core.paths import PROJECT_ROOT


def add_parser(sub, parents=()) -> None:
    e = sub.add_parser(
        "export",
        parents=list(parents),
        help="write the recommended step-time model per LLM model (BLIS or StepML format)",
    )
    e.add_argument(
        "--format",
        choices=("blis", "stepml"),
        default="blis",
        help="blis: BLIS's --stepml-model file over BLIS features; stepml: StepML's own JSON (default blis)",
    )
    e.add_argument(
        "--study", type=Path, default=PROJECT_ROOT / "out", help="a `stepml run` output folder (default: out/)"
    )
    e.add_argument("--out", type=Path, required=True, help="folder to write <model_short>.json files into")
    e.add_argument(
        "--requests",
        type=Path,
        nargs="+",
        default=None,
        help="blis: run folders (a request log + the run's profile/config) to write BLIS traces and commands for, "
        "instead of the study's runs",
    )
    e.add_argument("--seed", type=int, default=0, help="the seed `stepml run` replayed with (default 0)")


def _stored(path: Path, what: str, required: bool):
    """A stored asset value (io_manager.read_object), None if absent and not required; a value that cannot be read
    (damaged, truncated, not what `stepml run` writes) is a UsageError naming it: one line, no traceback."""
    import polars as pl

    from stepml_core.errors import UsageError

    from .io_manager import read_object

    study = path.parents[2]
    try:
        return read_object(path)
    except FileNotFoundError:
        if required:
            raise UsageError(
                f"no stored {what} under {study / 'assets'} (run `stepml run --out {study}` first)"
            ) from None
        return None
    except (OSError, ValueError, pl.exceptions.PolarsError) as e:
        raise UsageError(
            f"{path}: the stored {what} cannot be read ({_one_line(e)}); re-run `stepml run --out {study}`"
        ) from None


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _load_study(study: Path):
    import polars as pl

    from stepml_core.errors import UsageError
    from stepml_core.runs.folders import RunIdError, parse_run_id

    rp = study / "replay.csv"
    if not rp.is_file():
        raise UsageError(f"{rp} not found (run `stepml run --out {study}` first)")
    try:
        rows = pl.read_csv(
            rp, schema_overrides={"observed": pl.Float64, "rel_err_pct": pl.Float64, "predicted": pl.Float64}
        )
        llm_of = {e: parse_run_id(e).model for e in set(rows["experiment_id"].to_list())}
    except (OSError, pl.exceptions.PolarsError, RunIdError) as e:
        raise UsageError(f"{rp}: not a replay.csv `stepml run` writes ({_one_line(e)})") from None
    specs = _stored(study / "assets" / "replay_models" / "__all__", "replay_models", True)
    cal = _stored(study / "assets" / "request_calibration" / "__all__", "request_calibration", False)
    fid = _stored(study / "assets" / "replay_fidelity" / "__all__", "replay_fidelity", False)
    try:
        shipped = dict(cal["shipped"]) if cal is not None else {}
        per = fid["recommended_per_llm"] if fid is not None and "recommended_per_llm" in fid else None
        per_llm = (
            dict(zip(per["llm_model"].to_list(), per["step_model"].to_list()))
            if per is not None and per.height
            else None
        )
        st = fid.get("runs") if fid is not None else None
        saturated = None
        if st is not None and "saturated" in st.columns:  # the study's run status (stepml_core.runs.rules.is_saturated)
            saturated = set(st.filter(pl.col("saturated").fill_null(False))["experiment_id"].to_list())
        return rows, list(specs), shipped, llm_of, per_llm, saturated
    except (KeyError, TypeError, AttributeError, pl.exceptions.PolarsError) as e:
        raise UsageError(
            f"{study / 'assets'}: stored values not as `stepml run` writes them ({_one_line(e)}); re-run it"
        ) from None


def run(a: argparse.Namespace) -> int:
    from stepml_core.errors import UsageError
    from stepml_core.stepmodels.blis import choose_exports

    rows, specs, shipped, llm_of, per_llm, saturated = _load_study(Path(a.study))
    chosen = choose_exports(rows, specs, shipped, llm_of, per_llm, saturated)
    if not chosen:
        raise UsageError(f"no exportable model in {a.study}")
    try:
        if a.format == "blis":  # ExportError (a StepMLError) names the field
            paths = _write_blis(chosen, Path(a.study), Path(a.out), a.requests, a.seed)
        else:
            paths = _write_stepml(chosen, specs, shipped, Path(a.out))
    except OSError as e:
        raise UsageError(f"--out {a.out}: cannot write there ({e.strerror or e})") from None
    for llm, c in sorted(chosen.items()):
        cost = c.get("fidelity_cost_pct_points")
        print(
            f"{llm}: {c['step_model']} (recommended: {c['recommended']}; fitted on {len(c['fitted_on'])} run(s))"
            + (f"; {c['note']}; costs {cost}" if c.get("note") else "")
        )
    print(f"wrote {len(paths)} file(s) under {a.out}")
    return 0


def _bundle_runs(study: Path, requests: list[Path] | None, seed: int) -> list:
    """The runs to write BLIS traces for: each --requests run folder (its request log read as `stepml run` reads it),
    else every run of the study with a stored request log. A run that cannot be read is a UsageError naming it."""
    from stepml_core import pipeline
    from stepml_core.errors import StepMLError, UsageError

    if requests:
        runs = []
        for folder in requests:
            folder = folder.resolve()
            try:
                value = pipeline.request_log(folder, data_root=folder.parent)
                if value is None:
                    raise UsageError(f"{folder}: no request log (requests.json[.gz]) in it")
                runs.append(pipeline.blis_bundle_run(folder.name, value, folder.parent, seed=seed))
            except (StepMLError, ValueError, OSError) as e:
                raise UsageError(f"--requests {folder}: {_one_line(e)}") from None
        return runs
    base = study / "assets" / "request_log"
    keys = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    runs = []
    for key in keys:
        stored = _stored(base / key, f"request_log of {key}", True)
        try:
            runs.append(pipeline.blis_bundle_run(key, stored, PROJECT_ROOT / "data", seed=seed))
        except (StepMLError, ValueError, KeyError, OSError) as e:
            print(f"warning: {key}: no BLIS trace written ({_one_line(e)})")
    return runs


def _write_blis(chosen: dict, study: Path, out: Path, requests: list[Path] | None, seed: int) -> list[Path]:
    """DIR/<llm>.json, DIR/runs/<run>/{trace.csv, run_blis.sh} and DIR/manifest.json (replay.blis_round_trip)."""
    from stepml_core.replay.blis_round_trip import write_bundle

    runs = _bundle_runs(study, requests, seed)
    manifest = write_bundle(chosen, runs, out, source=str(study), seed=seed)
    for e, why in sorted(manifest["runs_not_exported"].items()):
        print(f"warning: {e}: {why}")
    paths = [out / f"{llm}.json" for llm in sorted(chosen)]
    return paths + [out / r["script"] for r in manifest["runs"].values()]


def _write_stepml(chosen: dict, specs: list[dict], shipped: dict, out: Path) -> list[Path]:
    """StepML's own JSON: a step-trained model's stepml_core.stepmodels.json_export document, or the calibration record."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for llm, c in sorted(chosen.items()):
        rec = c["recommended"]
        spec = next(
            (s for s in specs if s.get("llm_model") == llm and s["name"] == rec and s.get("kind") == "stepml_export"),
            None,
        )
        doc = (
            spec["exported"]
            if spec
            else (
                shipped.get(llm)
                if c["step_model"].startswith("requests_")
                else next((s for s in specs if s.get("llm_model") == llm and s["name"] == c["step_model"]), None)
            )
        )
        p = out / f"{llm}.json"
        p.write_text(json.dumps(doc, indent=1, sort_keys=True, default=float) + "\n")
        paths.append(p)
    return paths
