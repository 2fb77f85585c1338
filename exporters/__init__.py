"""Exporters: ONNX graphs with a KV cache (validated in ONNX Runtime) and TensorRT engines.

This folder (``exporters/`` in the repository) is installed as ``lp_deploy.exporters``:
import ``lp_deploy.exporters.onnx``, ``lp_deploy.exporters.tensorrt``. Exporters may import
the core and the runtimes (validation runs the export), never the benchmarks.
"""
