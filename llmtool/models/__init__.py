"""The bottom layer: a model spec to a PyTorch model and tokenizer, and llmtool's own model classes.

* :mod:`llmtool.models.loading`: specs (Hugging Face dir, ``.gguf``, ``smollm2``, export dir),
  safe loading of the fp32 model, tokenizer and config.
* :mod:`llmtool.models.recurrent_config` / :mod:`llmtool.models.recurrent`: the LSTM / RNN
  baselines (config without torch; the module with it).
"""
