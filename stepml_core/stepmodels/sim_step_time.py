"""Step-time models that drive the simulator's :class:`~stepml_core.sim.timing.CycleClock`.

Each has ``step_time_us(batch) -> float`` over the :class:`~stepml_core.sim.engine.BatchView` the
scheduler just formed, and a name. Request-level overheads around the steps come with them in a
:class:`ServingModel` (queueing delay per request, delay per streamed token).

* :class:`LinearStepTime` — the BLIS StepML model file (docs/calibration.md, *Export to BLIS*): a linear model (or
  regimes of them) over BLIS's step features, optional ``expm1`` transform, the
  ``step_overhead_us`` clamp and per-request overhead, ``queueing_time`` on ``input_len`` and
  ``output_token_processing_time_us`` — computed here exactly as BLIS documents it;
* :class:`ExportedStepTime` — a StepML export (``stepml_core.stepmodels.json_export``: linear, log-linear or
  boosted trees on the 30 features) through the stdlib reference predictor, with the per-request
  batch (``kv_source`` journey/snapshot) or the BATCH_SUMMARY proxies (``proxy_blocks``) the model
  was trained on.

BLIS's step features (PI = a request's progress index before the step: tokens already computed):
prefill = requests with PI < prompt length, decode = the rest; ``kv_*`` over the PI of every
scheduled request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stepml_core.stepmodels.reference_predictor import batch_sums

BLIS_STEP_FEATURES = (
    "prefill_tokens",
    "decode_tokens",
    "num_prefill_reqs",
    "num_decode_reqs",
    "scheduled_tokens",
    "kv_sum",
    "kv_max",
    "kv_mean",
    "kv_std",
    "prefill_x_decode",
    "decode_x_kv_mean",
    "prefill_sq",
)
BLIS_QUEUE_FEATURES = ("input_len",)
BLIS_OPS = ("==", "<", "<=", ">", ">=")
NEEDS_ALL_REQUESTS = {"kv_max", "kv_std"}  # every other BLIS feature is O(1) from the engine's running sums


class StepModelError(ValueError):
    """A step-time model file that cannot be used (names the file/field)."""


def blis_feature_values(b) -> tuple[float, ...]:
    """BLIS's step features of a batch as a tuple in BLIS_STEP_FEATURES order (blis-stepml-format.md §1), kv_max and
    kv_std 0 (they need every request: blis_features).

    O(1) from the engine's sums: decoders contribute PI = context − 1 each (Σ PI = Σ context − n);
    prompt chunks contribute their tokens computed before the step."""
    n_dec = b.scheduled_tokens - b.new_prompt_tokens  # one token per running decoder
    pf_tok = pf_n = dx_tok = dx_n = 0
    pi_chunks = 0
    for q, c, p in b.chunks:
        pi_chunks += c
        if c < p:
            pf_tok += q
            pf_n += 1
        else:  # recompute of a preempted request's output: BLIS counts it as decode
            dx_tok += q
            dx_n += 1
    P = float(pf_tok)
    D = float(n_dec + dx_tok)
    n_req = n_dec + pf_n + dx_n
    kv_sum = float(b.decode_context_tokens - n_dec + pi_chunks)
    kv_mean = kv_sum / n_req if n_req else 0.0
    n_decode = float(n_dec + dx_n)
    return (P, D, float(pf_n), n_decode, P + D, kv_sum, 0.0, kv_mean, 0.0, P * D, n_decode * kv_mean, P * P)


def blis_features(b, needs_requests: bool = False) -> dict[str, float]:
    """BLIS's step features of a batch by name (blis_feature_values), with kv_max and kv_std over every scheduled
    request when ``needs_requests``."""
    v = blis_feature_values(b)
    f = dict(zip(BLIS_STEP_FEATURES, v))
    if needs_requests and b.scheduled_tokens - b.new_prompt_tokens + len(b.chunks):
        pis = [r[0] for r in b.requests()]
        f["kv_max"] = float(max(pis))
        if len(pis) > 1:
            m = sum(pis) / len(pis)
            f["kv_std"] = math.sqrt(max(sum((x - m) ** 2 for x in pis) / len(pis), 0.0))
    return f


@dataclass(frozen=True)
class LinearModel:
    intercept: float
    coefficients: dict  # {feature name: coefficient}
    transform: str = ""  # "expm1" or identity

    def value(self, f: dict) -> float:
        s = self.intercept
        for k, w in self.coefficients.items():
            s += w * f.get(k, 0.0)
        return math.expm1(s) if self.transform == "expm1" else s


def _linear(d, where: str, known: tuple[str, ...] | None) -> LinearModel:
    if not isinstance(d, dict):
        raise StepModelError(f"{where}: expected an object with intercept and feature_coefficients")
    coef = d.get("feature_coefficients") or {}
    if not isinstance(coef, dict):
        raise StepModelError(f"{where}.feature_coefficients: expected an object")
    vals = [d.get("intercept", 0.0), *coef.values()]
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) for v in vals):
        raise StepModelError(f"{where}: intercept and coefficients must be finite numbers")
    if known is not None:
        unknown = sorted(set(coef) - set(known))
        if unknown:
            raise StepModelError(
                f"{where}: unknown feature(s) {unknown} (BLIS would read them as 0); known: {list(known)}"
            )
    return LinearModel(
        float(d.get("intercept", 0.0)), {str(k): float(v) for k, v in coef.items()}, d.get("output_transform") or ""
    )


@dataclass
class LinearStepTime:
    """A BLIS StepML model file (``version``, ``step_time`` or ``step_time_regimes``, ``step_overhead_us``,
    ``step_overhead_per_req_us``, ``queueing_time``, ``output_token_processing_time_us``), evaluated as BLIS does."""

    doc: dict
    name: str = "blis_linear"
    strict: bool = True  # refuse unknown feature names (BLIS silently reads them as 0)
    step: LinearModel | None = field(init=False, default=None)
    regimes: list = field(init=False, default_factory=list)

    def __post_init__(self):
        d = self.doc
        known = BLIS_STEP_FEATURES if self.strict else None
        if not isinstance(d.get("version"), int) or isinstance(d.get("version"), bool) or d["version"] < 1:
            raise StepModelError("version: must be an integer >= 1")
        if d.get("step_time") is not None:
            if d["step_time"].get("model_type") != "linear":
                raise StepModelError('step_time.model_type: must be "linear"')
            self.step = _linear(d["step_time"], "step_time", known)
        for i, r in enumerate(d.get("step_time_regimes") or []):
            cond = r.get("condition")
            if cond is not None:
                if cond.get("op") not in BLIS_OPS:
                    raise StepModelError(f"step_time_regimes[{i}].condition.op: one of {BLIS_OPS}")
                if self.strict and cond.get("feature") not in BLIS_STEP_FEATURES:
                    raise StepModelError(f"step_time_regimes[{i}].condition.feature: unknown {cond.get('feature')!r}")
            self.regimes.append((cond, _linear(r.get("model"), f"step_time_regimes[{i}].model", known)))
        if self.step is None and not self.regimes:
            raise StepModelError("one of step_time / step_time_regimes is required")
        self.queue = (
            _linear(d["queueing_time"], "queueing_time", BLIS_QUEUE_FEATURES if self.strict else None)
            if d.get("queueing_time") is not None
            else None
        )
        self.overhead_us = float(d.get("step_overhead_us") or 0.0)
        self.overhead_per_req_us = float(d.get("step_overhead_per_req_us") or 0.0)
        self.otpt_us = max(0.0, float(d.get("output_token_processing_time_us") or 0.0))
        used = set(self.step.coefficients if self.step else ())
        for cond, m in self.regimes:
            used |= set(m.coefficients) | ({cond["feature"]} if cond else set())
        self.needs_requests = bool(used & NEEDS_ALL_REQUESTS)
        # one linear model over known features (every calibrated model, blackbox_2f): evaluated on the feature tuple
        # with the same operations in the same order as predict_features_us, so the same float, without the dict
        self._terms = None
        self._regime_terms = None
        if (
            self.step is not None
            and not self.regimes
            and not self.needs_requests
            and set(used) <= set(BLIS_STEP_FEATURES)
        ):
            self._terms = tuple((BLIS_STEP_FEATURES.index(k), w) for k, w in self.step.coefficients.items())
        elif self.regimes and not self.needs_requests and set(used) <= set(BLIS_STEP_FEATURES):
            # regimes over known features (the piecewise calibrated form): the first matching one on the tuple, as
            # predict_features_us does on the dict (same operations, same order); a fall-through to step_time or 1
            models = [(c, m) for c, m in self.regimes] + ([(None, self.step)] if self.step is not None else [])
            self._regime_terms = tuple(
                (
                    None if c is None else (BLIS_STEP_FEATURES.index(c["feature"]), c["op"], float(c["value"])),
                    m,
                    tuple((BLIS_STEP_FEATURES.index(k), w) for k, w in m.coefficients.items()),
                )
                for c, m in models
            )
        self._reads_values = self._terms is not None or self._regime_terms is not None  # step_time_us, per step

    @staticmethod
    def _holds(cond: dict | None, f: dict) -> bool:
        if cond is None:
            return True
        x, op, v = f.get(cond["feature"], 0.0), cond["op"], float(cond["value"])
        return (
            x == v if op == "==" else x < v if op == "<" else x <= v if op == "<=" else x > v if op == ">" else x >= v
        )

    def predict_features_us(self, f: dict) -> float:
        """BLIS's StepTime on a feature dict: regimes (first match) or step_time, transform, clamp, per-request overhead, ≥ 1."""
        p = None
        for cond, m in self.regimes:
            if self._holds(cond, f):
                p = m.value(f)
                break
        if p is None:
            p = self.step.value(f) if self.step is not None else 1.0
        if self.overhead_us > 0:
            p = min(max(p, self.overhead_us), 3 * self.overhead_us)
        if self.overhead_per_req_us > 0:
            p += self.overhead_per_req_us * (f["num_prefill_reqs"] + f["num_decode_reqs"])
        return max(p, 1.0)

    def predict_values_us(self, v: tuple) -> float:
        """predict_features_us on blis_feature_values' tuple (a model without per-request features)."""
        terms = self._terms
        if terms is not None:  # one linear model (every linear calibrated model): the hot path
            m = self.step
        else:
            m, terms = None, ()
            for cond, mm, tt in self._regime_terms:
                if cond is None or _holds_value(v[cond[0]], cond[1], cond[2]):
                    m, terms = mm, tt
                    break
        if m is None:
            p = 1.0
        else:
            p = m.intercept
            for i, w in terms:
                p += w * v[i]
            if m.transform == "expm1":
                p = math.expm1(p)
        if self.overhead_us > 0:
            p = min(max(p, self.overhead_us), 3 * self.overhead_us)
        if self.overhead_per_req_us > 0:
            p += self.overhead_per_req_us * (v[2] + v[3])
        return max(p, 1.0)

    @property
    def reads_values(self) -> bool:
        """Whether predict_values_us applies (linear models over features blis_feature_values computes)."""
        return self._terms is not None or self._regime_terms is not None

    def step_time_us(self, b) -> float:
        if self._reads_values:
            return self.predict_values_us(blis_feature_values(b))
        return self.predict_features_us(blis_features(b, self.needs_requests))

    def queueing_us(self, input_len: float) -> float:
        if self.queue is None:
            return 0.0
        return max(0.0, self.queue.value({"input_len": float(input_len)}))


def _holds_value(x: float, op: str, v: float) -> bool:
    """A regime's condition on one feature's value (LinearStepTime._holds without the dict)."""
    return x == v if op == "==" else x < v if op == "<" else x <= v if op == "<=" else x > v if op == ">" else x >= v


def sums_from_decode_stats(decode: tuple, chunks) -> tuple:
    """reference_predictor.batch_sums of a batch given as its decoders' (n, Σc, Σc², max c, min c) and its prompt
    chunks (q, c, prompt length): the same sums in O(chunks) (a chunk from c ≥ prompt length — recomputed output —
    counts as a decode, as there)."""
    return batch_sums([(c, q, p) for q, c, p in chunks], decode)


class ExportedStepTime:
    """A StepML export (30 features) through the stdlib reference predictor.

    ``kv_source``: what the model's KV features were computed from when it was fitted —
    ``proxy_blocks`` (BATCH_SUMMARY-only runs: every decoder at the mean context
    (blocks_total − blocks_free)·16 / max(running, 1), prompt chunks from c = 0 with the mean chunk
    size, the documented proxies of ``stepml_core.features.step_features``) or ``journey``/``snapshot`` (the batch's own
    requests). Token counts follow the trace's BATCH_SUMMARY labels either way.

    ``predict_features``: {feature: value} → µs; by default the reference predictor on ``exported`` (a fitted
    model's ``predict_features``, stepml_core.stepmodels.fitted, for a kind the reference predictor lacks)."""

    def __init__(self, exported: dict, *, kv_source: str, name: str, predict_features=None):
        from stepml_core.stepmodels import reference_predictor as rp

        self.exported = exported
        self._predict = predict_features or (lambda f: rp.predict_from_features(f, exported))
        self.kv_source = kv_source
        self.name = name
        self._rp = rp
        m = exported["model_spec"]
        self._consts = rp._consts(m, int(exported["tp"]))
        self._gpu, self._tp, self._names, self._model = (
            exported["gpu_spec"],
            int(exported["tp"]),
            exported["model_names"],
            m["name"],
        )

    def sums(self, b) -> tuple:
        """The batch sums the features are computed from (reference_predictor.batch_sums' layout)."""
        if self.kv_source != "proxy_blocks":
            return sums_from_decode_stats(b.decode_context_stats(), b.chunks)
        P, D, n_pf, n_dc = b.prefill_tokens, b.decode_tokens, b.num_prefill_reqs, b.num_decode_reqs
        pm = (b.kv_blocks_total - b.kv_blocks_free) * 16 / max(b.num_running, 1) if n_dc else 0.0
        q = P / n_pf if n_pf else 0.0
        return (P, D, n_pf, n_dc, n_pf * q * (q + 1) / 2, 0.0, n_pf + n_dc, pm, 0.0, pm, pm, pm * n_dc)

    def step_time_us(self, b) -> float:
        f = self._rp.features_from_sums(self.sums(b), self._consts, self._gpu, self._tp, self._names, self._model)
        return self._predict(f)
