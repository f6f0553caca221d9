"""Step-time models: what StepML fits, predicts with, replays and ships.

* A **recipe** (`recipes`: a `Recipe` subclass registered with ``@register`` in `recipes.REGISTRY`) says which
  feature columns a model reads, how it fits one target on a run's train and valid rows, and its roles in the
  study: ``replayed_on`` (real / synthetic runs), ``replay_in_blis_form``, ``generalization`` (leave-one-out
  folds), ``h1_trio``, ``teacher_forced_e2e``, ``simplicity`` (the recommendation's tie-break) and ``style``
  (the report's colour and marker). Every list of model names the study uses is read from the registry.
* A **fitted model** (`fitted`: a `FittedStepModel` subclass per ``kind``, registered once with
  ``@register_kind`` in `fitted.KINDS`) is what ``fit`` returns, stored as a plain JSON dict (no pickle):
  ``FittedStepModel.from_json(d)`` reads it, ``to_json()`` gives it back unchanged. It ``predict``s
  max(ŷ, floor_us), gives the simulator its step time (``step_time_model``), and BLIS's model file
  (``blis_form``) or `NoBlisForm` saying why not. Kinds: linear, log_linear, trees.
* `estimators` fits them (scikit-learn, stored as plain numbers); `json_export` writes a fitted model for
  simulators; `reference_predictor` predicts the built-in kinds in plain Python (stdlib only); `sim_step_time`
  turns a model file (BLIS's linear form or StepML's JSON) into the simulator's step time; `blis` ships
  BLIS-form models.

Adding a model: one ``@register`` recipe class (in `recipes`, or any module imported before the study runs)
whose ``fit`` returns a dict with name, target, kind, features, floor_us, recipe, fitted_on and n_fit. A new
fitted form adds one ``@register_kind`` class with ``score`` (ŷ before the floor) and, if BLIS can read it,
``blis_form``. The study then fits, scores, replays, exports and plots it with no other edit
(tests/test_step_model_kinds.py does exactly that).
"""
