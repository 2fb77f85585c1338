"""Runtimes behind one interface: PyTorch, ONNX Runtime, TensorRT."""
