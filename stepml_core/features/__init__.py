"""Step features: what a model sees of one engine step.

* ``step_features`` — the seed's 30 features (docs/features.md §4), for a step table and for one batch.
* ``roofline`` — roofline terms of one step (docs/features.md §3): compute and memory time per GPU, bf16.
"""
