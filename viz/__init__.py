"""Pictures of a trained network and of a study (receptive fields, gradient-ascent images,
learning curves, the HTML report). Filled in by the report issue; uses `model/` only."""
