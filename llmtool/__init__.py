"""llmtool: train, export, verify and run causal Transformer LMs with ONNX Runtime."""

__version__ = "0.1.0"
