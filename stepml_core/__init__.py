"""StepML core: trace formats, tables, physics, features, models, metrics and reports.

Pure Python; no Dagster import anywhere in this package.
"""

__version__ = "0.1.0"
