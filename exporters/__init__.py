"""Exporters: ONNX (with KV cache) and TensorRT engines."""
