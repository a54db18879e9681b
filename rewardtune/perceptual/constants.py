"""Names shared by the library and the CLI (no heavy imports, so `rewardtune --help` stays fast)."""

OBJECTIVES = ("paper", "gaussian_ml", "linear_ml")
COMBINES = ("doubling", "sum", "furthest", "expected")
DEFAULT_OBJECTIVE = "gaussian_ml"   # measured better on the Table 1 protocol; see BENCHMARKS.md (perceptual section)
