"""Export-time rounding: GPTQ, the per-group scale sweep and activation clipping, all on the codecs' grids; the
ranges stage (`ranges`: static input ranges, once for every candidate) and the round stage (`stage`)."""
