"""Ship step-time models to the BLIS simulator (``stepml export --format blis``; docs/calibration.md).

BLIS (inference-sim) reads a StepML model file with ``--stepml-model FILE``
(../shared/reference/blis-stepml-format.md): ``version``, ``step_time`` or ``step_time_regimes``
(linear models over BLIS's own step features, optional ``expm1``), ``step_overhead_us`` (a clamp to
[o, 3o]), ``step_overhead_per_req_us``, ``queueing_time`` (linear in ``input_len``) and per-token
``output_token_processing_time_us``. BLIS reads an unknown feature name as 0 without a word, so
:func:`check_blis_doc` refuses one before a file is written, and :data:`BLIS_MODEL_SCHEMA` (JSON
Schema, written from that page) is what every exported file validates against.

What is exported per LLM model (:func:`choose_exports`): the step model the study recommends to a
simulator builder for a run it has not seen (``replay_fidelity``'s ``recommended_per_llm``: the lowest
mean of (|E2E| + |TTFT|)/2 over its out-of-sample rows on non-saturated scored runs; without it, the
step model most often ``recommended`` in replay.csv). A model calibrated
from request logs (``requests_*``) is shipped as ``requests_all``: the same recipe calibrated on every
run of the LLM model with ground truth. A step-trained BLIS-form model (``blackbox_2f``) is shipped
as fitted. A recommended model BLIS cannot express (trees, or linear models over StepML's 30
features) is replaced by the best BLIS-form one, and the manifest says what that costs: the
difference of the two models' mean |E2E| and |TTFT| errors over the runs where both were replayed
out of sample.

The manifest's ``errors`` are those measured for the file shipped, out of sample; ``requests_all`` has none
(every run with ground truth calibrated it), so its entry says so and quotes ``recipe_errors``: the same recipe
with one workload held out (``requests_lowo``), never another protocol's (a leave-one-model-out transfer's
errors say nothing of a model calibrated on the LLM model's own logs).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import polars as pl

from stepml_core.errors import StepMLError
from stepml_core.runs.rules import is_saturated
from stepml_core.stepmodels.sim_step_time import BLIS_OPS, BLIS_QUEUE_FEATURES, BLIS_STEP_FEATURES

BLIS_KINDS = ("blis_linear",)
FLOAT_FIELDS = (
    "step_overhead_us",
    "step_overhead_per_req_us",
    "output_token_processing_time_us",
    "scheduling_processing_time_us",
    "preemption_processing_time_us",
)


def _linear_schema(features: tuple[str, ...] | None, model_type: str | None) -> dict:
    coef = {"type": "object", "additionalProperties": {"type": "number"}}
    if features is not None:
        coef["propertyNames"] = {"enum": list(features)}
    return {
        "type": "object",
        "required": ["intercept"],
        "additionalProperties": False,
        "properties": {
            "model_type": {"const": model_type} if model_type else {"type": "string"},
            "intercept": {"type": "number"},
            "feature_coefficients": coef,
            "output_transform": {"type": "string"},
        },
    }


BLIS_MODEL_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "BLIS StepML model file (blis-stepml-format.md §1), as StepML writes it",
    "type": "object",
    "required": ["version"],
    "additionalProperties": False,
    "properties": {
        "version": {"type": "integer", "minimum": 1},
        "step_time": {**_linear_schema(BLIS_STEP_FEATURES, "linear"), "required": ["model_type", "intercept"]},
        "step_time_regimes": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["model"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "condition": {
                        "oneOf": [
                            {"type": "null"},
                            {
                                "type": "object",
                                "required": ["feature", "op", "value"],
                                "additionalProperties": False,
                                "properties": {
                                    "feature": {"enum": list(BLIS_STEP_FEATURES)},
                                    "op": {"enum": list(BLIS_OPS)},
                                    "value": {"type": "number"},
                                },
                            },
                        ]
                    },
                    "model": _linear_schema(BLIS_STEP_FEATURES, None),
                },
            },
        },
        "queueing_time": _linear_schema(BLIS_QUEUE_FEATURES, None),
        **{k: {"type": "number"} for k in FLOAT_FIELDS},
    },
    "anyOf": [
        {"required": ["step_time"]},
        {"required": ["step_time_regimes"], "properties": {"step_time_regimes": {"minItems": 1}}},
    ],
}


class ExportError(StepMLError, ValueError):
    """A model that cannot be written as a BLIS file (names the field)."""


def check_blis_doc(doc: dict, where: str = "model") -> dict:
    """Refuse what BLIS would misread: unknown feature names (BLIS reads them as 0), non-finite numbers,
    a top-level step_time whose model_type is not linear, unknown regime ops, version < 1. Returns doc."""
    if not isinstance(doc, dict):
        raise ExportError(f"{where}: not a JSON object")
    v = doc.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ExportError(f"{where}.version: an integer >= 1 is required")
    known_top = {"version", "step_time", "step_time_regimes", "queueing_time", *FLOAT_FIELDS}
    extra = sorted(set(doc) - known_top)
    if extra:
        raise ExportError(f"{where}: unknown field(s) {extra} (BLIS ignores them)")
    models = []
    if doc.get("step_time") is not None:
        if doc["step_time"].get("model_type") != "linear":
            raise ExportError(f'{where}.step_time.model_type: must be "linear"')
        models.append(("step_time", doc["step_time"], BLIS_STEP_FEATURES))
    for i, r in enumerate(doc.get("step_time_regimes") or []):
        c = r.get("condition")
        if c is not None:
            if c.get("feature") not in BLIS_STEP_FEATURES:
                raise ExportError(
                    f"{where}.step_time_regimes[{i}].condition.feature: unknown {c.get('feature')!r} "
                    f"(BLIS would read it as 0); known: {list(BLIS_STEP_FEATURES)}"
                )
            if c.get("op") not in BLIS_OPS:
                raise ExportError(f"{where}.step_time_regimes[{i}].condition.op: one of {list(BLIS_OPS)}")
            _finite(c.get("value"), f"{where}.step_time_regimes[{i}].condition.value")
        models.append((f"step_time_regimes[{i}].model", r.get("model") or {}, BLIS_STEP_FEATURES))
    if not models:
        raise ExportError(f"{where}: one of step_time / step_time_regimes is required")
    if doc.get("queueing_time") is not None:
        models.append(("queueing_time", doc["queueing_time"], BLIS_QUEUE_FEATURES))
    for name, m, known in models:
        _finite(m.get("intercept", 0.0), f"{where}.{name}.intercept")
        coef = m.get("feature_coefficients") or {}
        unknown = sorted(set(coef) - set(known))
        if unknown:
            raise ExportError(
                f"{where}.{name}.feature_coefficients: unknown feature(s) {unknown} (BLIS would read them "
                f"as 0); known: {list(known)}"
            )
        for k, x in coef.items():
            _finite(x, f"{where}.{name}.feature_coefficients.{k}")
    for k in FLOAT_FIELDS:
        if k in doc:
            _finite(doc[k], f"{where}.{k}")
    return doc


def _finite(x, where: str) -> None:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ExportError(f"{where}: a finite number is required, got {x!r}")


def validate_schema(doc: dict) -> None:
    """Validate against BLIS_MODEL_SCHEMA (jsonschema)."""
    import jsonschema

    jsonschema.validate(doc, BLIS_MODEL_SCHEMA)


def blis_text(doc: dict) -> str:
    """The file's text: checked, no NaN/Infinity, stable key order."""
    check_blis_doc(doc)
    return json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------- what to export


def _mean_abs(x) -> float:
    v = [abs(a) for a in x if a is not None and math.isfinite(a)]
    return sum(v) / len(v) if v else float("nan")


def choose_exports(
    replay_rows: pl.DataFrame,
    specs: list[dict],
    shipped: dict[str, dict],
    llm_of: dict[str, str],
    per_llm: dict[str, str] | None = None,
    saturated: set[str] | None = None,
) -> dict[str, dict]:
    """Per LLM model: {'doc', 'step_model', 'recommended', 'fitted_on', 'kind', 'note', 'fidelity_cost_pct_points', 'errors'}.

    ``replay_rows``: replay.csv; ``specs``: the replay_models specs; ``shipped``: requests_all specs per LLM
    model; ``llm_of``: run → LLM model; ``per_llm``: LLM model → the study's recommended step model; ``saturated``:
    the study's saturated runs (replay_fidelity's run status)."""
    rows = replay_rows.with_columns(pl.col("experiment_id").replace_strict(llm_of, default=None).alias("llm_model"))
    out = {}
    for llm in sorted({m for m in llm_of.values() if m}):
        r = rows.filter(pl.col("llm_model") == llm)
        recommended = (per_llm or {}).get(llm)
        if recommended is None:
            rec = r.filter(pl.col("recommended")).select("experiment_id", "step_model").unique()
            counts = rec.group_by("step_model").len().sort(["len", "step_model"], descending=[True, False])
            recommended = counts["step_model"][0] if counts.height else None
        err = _errors(r, saturated)
        exportable = _exportable(llm, specs, shipped)
        if not exportable:
            continue
        pick = recommended if recommended in exportable else None
        note = ""
        if pick is None:
            # the best BLIS-form model by the same criterion: mean (|E2E| + |TTFT|)/2 over out-of-sample scored runs
            ranked = sorted(exportable, key=lambda m: (err.get(m, {}).get("score", float("inf")), m))
            pick = ranked[0]
            if recommended:
                why = _no_blis_form_reason(llm, recommended, specs)
                note = f"recommended {recommended} has no BLIS form ({why}); exported the best BLIS-form model"
        spec = exportable[pick]
        if spec.get("load_delay"):  # calibration.load_delay: StepML's replay only
            ld = spec["load_delay"]
            left = (
                f"its load delay ({ld['shift_us']:.0f} µs + {ld['per_request_us']:.1f} µs per request in a token's step) "
                "is not in the file: BLIS's queueing_time reads input_len only; the file is the model without it"
            )
            note = f"{note}; {left}" if note else left
        basis = _evidence_model(spec, pick, err)
        cost = None
        if recommended and basis and basis != recommended:
            a, b = err.get(recommended, {}), err.get(basis, {})
            cost = {
                k: (b.get(k, float("nan")) - a.get(k, float("nan"))) for k in ("e2e_mean_abs_pct", "ttft_mean_abs_pct")
            }
        out[llm] = {
            "doc": spec["doc"],
            "step_model": spec["name"],
            "recommended": recommended,
            "fitted_on": spec["fitted_on"],
            "kind": spec["kind"],
            "protocol": spec.get("protocol", ""),
            "note": note,
            "fidelity_cost_pct_points": cost,
            "fidelity_cost_basis": basis if cost is not None else None,
            **_shipped_errors(llm, spec, basis, err),
        }
    return out


def _no_blis_form_reason(llm: str, model: str, specs: list[dict]) -> str:
    """Why a replayed step model has no BLIS form: its fitted kind's own answer (fitted.FittedStepModel.blis_form)."""
    from stepml_core.stepmodels.fitted import FittedStepModel, NoBlisForm

    for s in specs:
        if s.get("llm_model") == llm and s["name"] == model and s.get("kind") == "stepml_export":
            try:
                FittedStepModel.from_json(s["exported"]).blis_form()
            except NoBlisForm as e:
                return str(e)
            except (KeyError, TypeError, ValueError):  # an export without the fitted numbers: say what is known
                break
            return "replayed as a StepML export"
    return "StepML features or trees"


def _evidence_model(spec: dict, pick: str, err: dict) -> str | None:
    """The replayed step model whose out-of-sample errors speak for the file shipped: the model itself, or for
    ``requests_all`` (replayed nowhere out of sample: every run with ground truth calibrated it) the same recipe
    with one workload held out (``requests_lowo``), where it was replayed."""
    if not _is_all(spec["name"]):
        return pick if pick in err else None
    lowo = spec["name"].removesuffix("all") + "lowo"  # requests_all → requests_lowo, requests_pw_all → requests_pw_lowo
    return lowo if lowo in err else None


def _is_all(name: str) -> bool:
    """A calibration on every run with ground truth (requests_all, requests_pw_all): replayed nowhere out of sample."""
    return name.startswith("requests_") and name.endswith("_all")


def _shipped_errors(llm: str, spec: dict, basis: str | None, err: dict) -> dict:
    """The manifest's ``errors`` (measured for the file shipped, else None), ``recipe_errors`` and a note saying
    which replays measured them."""
    if not _is_all(spec["name"]):
        return {
            "errors": err.get(basis) if basis else None,
            "errors_note": "" if basis else "not replayed out of sample",
        }
    note = (
        f"{spec['name']} is calibrated on every run of {llm} with ground truth ({len(spec['fitted_on'])} run(s)): "
        "no out-of-sample error of this file exists. "
    )
    if basis:
        note += (
            f"recipe_errors: the same recipe calibrated on the model's other workloads ({basis}), replayed on "
            "the held-out workload's runs"
        )
    else:
        note += "No replay of the same recipe out of sample exists in this study."
    return {
        "errors": None,
        "recipe_errors": ({"step_model": basis, **err[basis]} if basis else None),
        "errors_note": note,
    }


def _errors(r: pl.DataFrame, saturated: set[str] | None = None) -> dict[str, dict]:
    """Per step model: mean |E2E mean err| and |TTFT mean err| (%) over its out-of-sample rows on non-saturated
    scored runs (the recommendation's criterion). ``saturated``: the study's saturated runs (replay_fidelity's run
    status); without it, stepml_core.runs.rules.is_saturated on what replay.csv holds (its mean TTFT; the failures need
    the run's request count, which replay.csv lacks)."""
    if saturated is None:
        ttft = r.filter(pl.col("metric") == "ttft_mean").select("experiment_id", "observed").unique("experiment_id")
        saturated = {e for e, t in ttft.iter_rows() if is_saturated(None, t)}
    sat = saturated
    o = r.filter(
        (pl.col("sample") == "out_of_sample")
        & pl.col("rel_err_pct").is_not_null()
        & ~pl.col("experiment_id").is_in(sorted(sat))
    )
    out = {}
    for m in sorted(set(o["step_model"])):
        x = o.filter(pl.col("step_model") == m)
        e2e = _mean_abs(x.filter(pl.col("metric") == "e2e_mean")["rel_err_pct"].to_list())
        ttft = _mean_abs(x.filter(pl.col("metric") == "ttft_mean")["rel_err_pct"].to_list())
        out[m] = {
            "e2e_mean_abs_pct": e2e,
            "ttft_mean_abs_pct": ttft,
            "score": (e2e + ttft) / 2,
            "runs": int(x["experiment_id"].n_unique()),
        }
    return out


def _exportable(llm: str, specs: list[dict], shipped: dict[str, dict]) -> dict[str, dict]:
    """Step-model name → the BLIS-form spec shipped for it: requests_* → requests_all (requests_pw_* → the piecewise
    form's requests_pw_all, shipped under "<model>:piecewise"), blackbox_2f → its fit."""
    out = {}
    for s in specs:
        if s.get("llm_model") != llm or s.get("kind") not in BLIS_KINDS:
            continue
        if s["name"].startswith("requests_"):
            key = llm if s.get("form", "linear") == "linear" else f"{llm}:{s['form']}"
            if key in shipped:
                out[s["name"]] = shipped[key]
        elif s["name"] not in out:
            out[s["name"]] = s
    return out


def write_exports(chosen: dict[str, dict], out_dir: Path, *, source: str) -> list[Path]:
    """DIR/<model_short>.json per LLM model (checked and schema-validated before writing) + DIR/manifest.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, manifest = [], {"source": source, "format": "BLIS StepML model file (--stepml-model)", "models": {}}
    for llm, c in sorted(chosen.items()):
        text = blis_text(c["doc"])
        validate_schema(json.loads(text))
        p = out_dir / f"{llm}.json"
        tmp = out_dir / f".{llm}.json.tmp"
        tmp.write_text(text)
        os.replace(tmp, p)
        paths.append(p)
        manifest["models"][llm] = {k: v for k, v in c.items() if k != "doc"} | {"file": p.name}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return paths
