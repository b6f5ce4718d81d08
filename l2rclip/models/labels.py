"""How every printed number says which backbone made it (no torch here: flows and reports import it)."""

# The label of every number a randomly initialised backbone produced (reports, figures, MLflow notes).
PIPELINE_CHECK = "PIPELINE CHECK (random-initialised backbone, NOT CLIP results)"
