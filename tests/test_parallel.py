"""Work that would start a process pool still runs inside a daemonic process (a Celery prefork worker).

Without ``stepml_core.parallel.process_workers`` both calls below fail there with
"daemonic processes are not allowed to have children" (CI, stop 16: request_calibration under Celery)."""

import multiprocessing as mp
from types import SimpleNamespace

from stepml_core.calibration.protocols import Fold, run_calibrations
from stepml_core.parallel import process_workers


def _in_daemon(target, *args):
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def body():
        try:
            q.put(("ok", target(*args)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            q.put(("error", f"{type(e).__name__}: {e}"))

    p = ctx.Process(target=body, daemon=True)
    p.start()
    out = q.get(timeout=120)
    p.join(30)
    return out


def _calibrate_two_folds():
    runs = {
        "a": SimpleNamespace(experiment_id="a", llm_model="m1", ctx=SimpleNamespace(tp=1)),
        "b": SimpleNamespace(experiment_id="b", llm_model="m2", ctx=SimpleNamespace(tp=1)),
        "c": SimpleNamespace(experiment_id="c", llm_model="m1", ctx=SimpleNamespace(tp=2)),
        "d": SimpleNamespace(experiment_id="d", llm_model="m2", ctx=SimpleNamespace(tp=2)),
    }
    folds = [Fold("roles", "m1", ("a", "b"), None), Fold("roles", "m2", ("c", "d"), None)]
    out = run_calibrations(folds, runs.__getitem__, workers=2)
    return sorted((k[0], v) for k, v in out.items())


def test_process_workers_is_one_in_a_daemonic_process():
    assert process_workers(2) == 2
    assert _in_daemon(process_workers, 2) == ("ok", 1)


def test_calibrations_with_two_workers_run_inside_a_daemonic_process():
    status, got = _in_daemon(_calibrate_two_folds)
    assert status == "ok", got
    assert [k for k, _ in got] == ["m1", "m2"]
    assert all("more than one LLM model" in v for _, v in got)
