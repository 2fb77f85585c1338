"""The ``README.md`` written into a model repository: how to serve it and call it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .triton_repo import TritonRepoConfig, TritonRepoResult

_TEMPLATE = """# Triton model repository written by lp-deploy {version}

Source export: `{export}`.

| model | what | platform / backend |
|---|---|---|
| `{gen}` | text generation (decoupled; one response per token when `stream` is true) \
| python backend, ONNX Runtime inside (`{device}`, {instances} instance(s), up to \
{max_batch} sequences decoded together per instance) |
| `{onnx}` | the raw ONNX graph, KV cache inputs/outputs included | `onnxruntime_onnx` |
{trt_row}
`{gen}` inputs: `text_input` (BYTES), optional `max_tokens` (INT32, default {max_tokens}),
`stream` (BOOL), `temperature`, `top_p` (FP32), `top_k` (INT32), `seed` (UINT64), `stop`
(BYTES, stop strings: the text ends where one begins). Greedy unless `temperature`, `top_k`
or `top_p` is given; `temperature` 0 is greedy whatever `top_k` and `top_p` say. Outputs:
`text_output` (the continuation without the prompt; per token when streaming) and `token_ids`
(INT32).

The python model (`{gen}/1/model.py`) imports `lp_deploy.serving.python_model`: the python
backend's Python environment needs lp-deploy and onnxruntime installed **with numpy<2** (the
2.51 python backend stub corrupts tensors with numpy 2), e.g.
`pip install "numpy<2" "lp-deploy[onnx]"` in the image, or lp-deploy's `make triton`
(`.venv-triton`).

All `config.pbtxt` files were parsed against Triton's `ModelConfig` schema and checked against
the exported graph's inputs and outputs. lp-deploy's own tests serve `{gen}` with the
`tritonserver` 2.51 of the PyPI wheel `nvidia-pytriton==0.7.0`, which has **only the python
backend**: `{onnx}`{trt_note} were validated but **not served** there; they need a Triton
build with the onnxruntime (and TensorRT) backends, such as the NGC container.

## Serve

With lp-deploy (the bundled server, bound to 127.0.0.1, explicit model control):

    lp-deploy triton serve {repo} --http-port 8000 --grpc-port 8001

In a Triton container (lp-deploy installed in it as above):

    tritonserver --model-repository=/models --model-control-mode=explicit --load-model={gen}

## Call

    curl -s localhost:8000/v2/models/{gen}/generate \\
      -d '{{"text_input": "The history of Paris", "max_tokens": 32}}'
    curl -sN localhost:8000/v2/models/{gen}/generate_stream \\
      -d '{{"text_input": "The history of Paris", "max_tokens": 32, "stream": true}}'
    lp-deploy triton generate localhost:8000 {gen} "The history of Paris" --stream

gRPC streaming from Python (`pip install "tritonclient[grpc]"`):

```python
import numpy as np
import tritonclient.grpc as grpcclient

def tensor(name, value, dtype):
    t = grpcclient.InferInput(name, [1], dtype)
    t.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else None))
    return t

client = grpcclient.InferenceServerClient("localhost:8001")
client.start_stream(callback=lambda result, error: print(
    error or result.as_numpy("text_output")[0].decode(), end="", flush=True))
client.async_stream_infer("{gen}", [
    tensor("text_input", "The history of Paris", "BYTES"),
    tensor("max_tokens", np.int32(32), "INT32"),
    tensor("stream", True, "BOOL"),
])
client.stop_stream()
```
"""


def repo_readme(cfg: TritonRepoConfig, result: TritonRepoResult) -> str:
    from lp_deploy import __version__

    trt = result.tensorrt_model
    return _TEMPLATE.format(
        version=__version__,
        export=cfg.export_dir,
        gen=result.generate_model,
        onnx=result.onnx_model,
        device=cfg.device,
        instances=cfg.instances,
        max_batch=cfg.max_batch,
        max_tokens=cfg.max_tokens,
        repo=cfg.repo,
        trt_row=f"| `{trt}` | the TensorRT engine | `tensorrt_plan` |\n" if trt else "",
        trt_note=f" and `{trt}`" if trt else " (and a `tensorrt_plan` model, when built)",
    )
