"""Export-time rounding: GPTQ, the per-group scale sweep and activation clipping, all on the codecs' grids."""
