"""Partition workers (`stepml run --workers N`): a worker that has done its share of partitions is
replaced, never handed one more partition that it would drop by exiting (seen on the real 16:
"the worker process ... died: exited with code 0")."""

import operator

from stepml_dagster.workers import run_in_workers


def test_workers_replaced_after_their_share_lose_no_partition():
    keys = [f"k{i:02d}" for i in range(24)]
    got = list(run_in_workers(operator.add, ("p-",), keys, workers=2, tasks_per_worker=1))
    assert [m for _, _, m in got if m] == []
    assert sorted(k for k, _, _ in got) == keys
    assert all(r == "p-" + k for k, r, _ in got)
