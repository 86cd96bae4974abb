"""Work past one process: resumable batch generation over a prompt file, and Ray Data sharding.

:func:`llmtool.batch.generate.generate_file` runs ``llmtool generate --prompt-file P --out R``:
prompts in, one JSON line per result out, written as it goes and resumed after a crash
(:mod:`llmtool.batch.rows`). :mod:`llmtool.batch.ray` runs the same generation, and
``llmtool eval``'s perplexity passes, on Ray Data ``map_batches`` actors (the optional
``llmtool[ray]`` extra). Nothing here imports torch, onnxruntime or Ray at import time.
"""
