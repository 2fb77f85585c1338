"""The Triton python-backend generate model (``TritonPythonModel``) that ``model.py`` imports.

It runs inside Triton's python backend stub, where ``triton_python_backend_utils`` exists; the
stub's environment needs numpy<2 (the 2.51 stub corrupts tensors with numpy 2). Requests are
checked, queued to a :class:`BatchEngine` (in-flight batching on lp-deploy's ONNX Runtime
runtime) and answered from its thread: one response per token when ``stream`` is true, one
final response otherwise (decoupled transaction policy).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes import create_runtime

from .engine import BatchEngine, GenerateRequest, parse_request

log = logging.getLogger(__name__)

INPUTS = ("text_input", "max_tokens", "stream", "temperature", "top_k", "top_p", "seed", "stop")


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils

    return pb_utils


class TritonSink:
    """Answers one request through its response sender."""

    def __init__(self, request: Any, sender: Any, stream: bool) -> None:
        self.request = request
        self.sender = sender
        self.stream = stream
        self.pb = _pb()

    def _response(self, ids: list[int], text: str) -> Any:
        pb = self.pb
        return pb.InferenceResponse(
            output_tensors=[
                pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                pb.Tensor("token_ids", np.array(ids, dtype=np.int32)),
            ]
        )

    def token(self, token_id: int, text: str) -> None:
        if self.stream:
            self.sender.send(self._response([token_id], text))

    def finish(self, token_ids: list[int], text: str, tail: str) -> None:
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not self.stream:
            self.sender.send(self._response(token_ids, text), flags=final)
        elif tail:
            self.sender.send(self._response([], tail), flags=final)
        else:
            self.sender.send(flags=final)

    def fail(self, message: str) -> None:
        send_error(self.sender, message)

    def cancelled(self) -> bool:
        return bool(self.request.is_cancelled())


def send_error(sender: Any, message: str) -> None:
    pb = _pb()
    sender.send(
        pb.InferenceResponse(error=pb.TritonError(message)),
        flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )


def _answer_error(sender: Any, message: str) -> None:
    """:func:`send_error`, logged instead of raised when the client is gone."""
    try:
        send_error(sender, message)
    except Exception:
        log.exception("could not send the error %r", message)


def request_inputs(request: Any) -> dict[str, Any]:
    """The generate inputs of a Triton request as numpy arrays (absent: not in the dict)."""
    pb = _pb()
    found = {}
    for name in INPUTS:
        tensor = pb.get_input_tensor_by_name(request, name)
        if tensor is not None:
            found[name] = tensor.as_numpy()
    return found


class TritonPythonModel:
    """Triton's python-backend entry points: ``initialize``, ``execute``, ``finalize``."""

    engine: BatchEngine
    default_max_tokens: int

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"]) / args["model_version"]
        export = model_dir / params.get("export_dir", "export")
        opts: dict[str, Any] = {}
        if params.get("device", "cpu") == "gpu":
            opts["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            opts["providers"] = ["CPUExecutionProvider"]
        threads = int(params.get("threads") or 0)
        if threads:
            opts["threads"] = threads
        runtime = create_runtime("onnxruntime", export, **opts)
        self.default_max_tokens = int(params.get("max_tokens") or 32)
        self.engine = BatchEngine(runtime, int(params.get("max_batch") or 8))
        self.engine.start()
        log.info("%s: serving %s (%s)", config.get("name"), export, opts)

    def execute(self, requests: list[Any]) -> None:
        """Queue every request (decoupled: the engine's thread answers them)."""
        for request in requests:  # one request's failure is its own: the others go on
            try:
                sender = request.get_response_sender()
            except Exception:
                log.exception("a request without a response sender was dropped")
                continue
            try:
                req: GenerateRequest = parse_request(
                    request_inputs(request), self.default_max_tokens
                )
                self.engine.submit(req, TritonSink(request, sender, req.stream))
            except (LpDeployError, ValueError) as exc:
                _answer_error(sender, str(exc))
            except Exception as exc:
                log.exception("a request failed")
                _answer_error(sender, f"internal error: {type(exc).__name__}: {exc}")
        return None

    def finalize(self) -> None:
        self.engine.stop()
