"""StepML's Dagster layer: thin assets, checks, sensors and schedules over stepml_core."""
