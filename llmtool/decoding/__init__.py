"""What shapes the next-token distribution beyond temperature/top-k/top-p.

* :mod:`~llmtool.decoding.processors`: penalties and bans over a row's token history
  (repetition, presence/frequency, no-repeat n-grams), with transformers' maths.
* :mod:`~llmtool.decoding.structured`: a token mask per step from a JSON schema or regex
  (llguidance), so every output parses.
"""
