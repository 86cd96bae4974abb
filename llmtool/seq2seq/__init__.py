"""Encoder-decoder models (T5, BART, Marian) through the four verbs.

* :mod:`~llmtool.seq2seq.export`: ``export_seq2seq``, the export pipeline (trace, write,
  validate against PyTorch, rename into place); graphs in :mod:`llmtool.export.seq2seq`.
* :mod:`~llmtool.seq2seq.validate`: the parity checks recorded in llmtool.json.
* :mod:`~llmtool.seq2seq.generate`: greedy / sampled generation and beam search.
* :mod:`~llmtool.seq2seq.pairs` and :mod:`~llmtool.seq2seq.evaluate`: source/target pairs,
  perplexity of targets given sources, BLEU and chrF (sacrebleu).
* :mod:`~llmtool.seq2seq.train`: ``llmtool train --arch t5|bart`` on pairs.

The runtime side is :mod:`llmtool.runtime.seq2seq`.
"""
