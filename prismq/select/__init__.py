"""SCOUT selection: surrogates propose, measured end-to-end KL decides.

`stage.stage_select` (before rounding: L2 `perturbed`, L3 `measured` + `scout`, the validated `frontier`) and
`polish_stage.stage_polish` (after rounding: `polish`'s coordinate descent, each move measured by `shipped` on the
weights exactly as they ship).
"""
