"""SCOUT selection: surrogates propose, measured end-to-end KL decides (`stage.stage_select`)."""
