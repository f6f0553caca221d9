"""The `experiment` partitions: one dynamic partition per run folder (key = run id)."""

import dagster as dg

experiment_partitions = dg.DynamicPartitionsDefinition(name="experiment")
PART = dict(partitions_def=experiment_partitions)
