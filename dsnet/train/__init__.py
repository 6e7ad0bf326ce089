"""The training algorithms: Stage I (sandwich rule + in-place ensemble bootstrapping), BN
recalibration, Stage II gate training (SGS + complexity penalty).

``engine`` runs one stage with hooks (console, checkpoints); ``stages`` holds the per-stage
runners; ``losses``, ``sampling``, ``bn_calibration``, ``optim``, ``ema``, ``precision`` and
``distributed`` are the pieces they are made of.
"""
