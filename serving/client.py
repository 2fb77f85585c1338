"""Clients of the generate model: Triton's HTTP generate endpoints and gRPC streaming.

``tritonclient`` does not wrap ``/v2/models/NAME/generate`` and ``/generate_stream`` (plain
HTTP with JSON; the stream is server-sent events), so they are called with the standard
library; gRPC streaming uses ``tritonclient.grpc``'s ``stream_infer``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import queue
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPResponse
from typing import Any

from lp_deploy.errors import LpDeployError

PROTOCOLS = ("http", "http-stream", "grpc-stream")


class ServingError(LpDeployError):
    """The server answered a request with an error."""


@dataclass
class Generation:
    """A finished generation as a client saw it: text, token ids, and when the pieces came
    (seconds since the request was sent)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    chunks: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    total: float = 0.0

    @property
    def first_token(self) -> float:
        return self.times[0] if self.times else self.total

    def add(self, text: str, ids: list[int], t: float) -> None:
        self.text += text
        self.token_ids += ids
        self.chunks.append(text)
        self.times.append(t)


def request_body(
    prompt: str, max_tokens: int | None, stream: bool, **params: Any
) -> dict[str, Any]:
    """The JSON/inputs of a generate request (``params``: temperature, top_k, top_p, seed,
    stop; None values are left out)."""
    body: dict[str, Any] = {"text_input": prompt, "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update({k: v for k, v in params.items() if v is not None})
    return body


def _split(url: str) -> tuple[str, int]:
    url = url.split("://", 1)[-1].rstrip("/")
    host, _, port = url.rpartition(":")
    return (host or "127.0.0.1"), int(port)


@contextlib.contextmanager
def _post(url: str, path: str, body: dict[str, Any], timeout: float) -> Iterator[HTTPResponse]:
    """The response to a POST (a :class:`ServingError` unless 200); the connection is closed
    on leaving, an error or not."""
    host, port = _split(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ServingError(f"HTTP {resp.status}: {_error_text(resp.read())}")
        yield resp
    finally:
        conn.close()


def _error_text(raw: bytes) -> str:
    try:
        return str(json.loads(raw).get("error", raw.decode(errors="replace")))
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def http_generate(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int | None = None,
    timeout: float = 300,
    **params: Any,
) -> Generation:
    """One request to ``/v2/models/MODEL/generate`` (one final response)."""
    start = time.perf_counter()
    body = request_body(prompt, max_tokens, False, **params)
    with _post(url, f"/v2/models/{model}/generate", body, timeout) as resp:
        data = json.loads(resp.read())
    out = Generation()
    out.add(
        str(data.get("text_output", "")), _ids(data.get("token_ids")), time.perf_counter() - start
    )
    out.total = out.times[-1]
    return out


def sse_events(resp: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream; a :class:`ServingError` for an error
    event."""
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        event = json.loads(line[5:])
        if "error" in event:
            raise ServingError(str(event["error"]))
        yield event


def http_generate_stream(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int | None = None,
    timeout: float = 300,
    **params: Any,
) -> Iterator[tuple[str, list[int]]]:
    """``/v2/models/MODEL/generate_stream`` with ``stream`` true: (text, token ids) per
    response, as they arrive (closing the iterator drops the connection)."""
    body = request_body(prompt, max_tokens, True, **params)
    with _post(url, f"/v2/models/{model}/generate_stream", body, timeout) as resp:
        for event in sse_events(resp):
            yield str(event.get("text_output", "")), _ids(event.get("token_ids"))


def http_stream_generation(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int | None = None,
    timeout: float = 300,
    **params: Any,
) -> Generation:
    """All of :func:`http_generate_stream`, timed."""
    start = time.perf_counter()
    out = Generation()
    for text, ids in http_generate_stream(url, model, prompt, max_tokens, timeout, **params):
        out.add(text, ids, time.perf_counter() - start)
    out.total = time.perf_counter() - start
    return out


_GRPC_TYPES: dict[str, tuple[str, Any]] = {
    "text_input": ("BYTES", object),
    "stop": ("BYTES", object),
    "max_tokens": ("INT32", "int32"),
    "top_k": ("INT32", "int32"),
    "stream": ("BOOL", bool),
    "temperature": ("FP32", "float32"),
    "top_p": ("FP32", "float32"),
    "seed": ("UINT64", "uint64"),
}


def grpc_inputs(body: dict[str, Any]) -> list[Any]:
    """``tritonclient.grpc.InferInput`` tensors for a request body."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in body.items():
        triton_type, np_type = _GRPC_TYPES[name]
        values = value if isinstance(value, list) else [value]
        if np_type is object:
            values = [v.encode("utf-8") if isinstance(v, str) else v for v in values]
        array = np.array(values, dtype=np_type)
        tensor = grpcclient.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def grpc_stream(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int | None = None,
    stream: bool = True,
    timeout: float = 300,
    **params: Any,
) -> Iterator[tuple[str, list[int]]]:
    """One request over gRPC bidirectional streaming (``stream_infer``): (text, token ids)
    per response, as they arrive (one per token when ``stream``)."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(url.split("://", 1)[-1])
    try:
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer(
            model,
            grpc_inputs(request_body(prompt, max_tokens, stream, **params)),
            enable_empty_final_response=True,
        )
        while True:
            try:
                result, error = events.get(timeout=timeout)
            except queue.Empty:
                raise ServingError(f"no response from {url} within {timeout:g} s") from None
            if error is not None:
                raise ServingError(str(error))
            response = result.get_response()
            if response.outputs:
                text = result.as_numpy("text_output")
                ids = result.as_numpy("token_ids")
                yield (
                    b"".join(text.reshape(-1)).decode("utf-8") if text is not None else "",
                    [int(i) for i in ids.reshape(-1)] if ids is not None else [],
                )
            if response.parameters["triton_final_response"].bool_param:
                return
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def grpc_generate(
    url: str,
    model: str,
    prompt: str,
    max_tokens: int | None = None,
    stream: bool = True,
    timeout: float = 300,
    **params: Any,
) -> Generation:
    """All of :func:`grpc_stream`, timed."""
    start = time.perf_counter()
    out = Generation()
    for text, ids in grpc_stream(url, model, prompt, max_tokens, stream, timeout, **params):
        out.add(text, ids, time.perf_counter() - start)
    out.total = time.perf_counter() - start
    return out


def generate(
    url: str,
    model: str,
    prompt: str,
    protocol: str = "http",
    max_tokens: int | None = None,
    grpc_url: str | None = None,
    **params: Any,
) -> Generation:
    """A generation over ``protocol`` (one of :data:`PROTOCOLS`)."""
    if protocol == "http":
        return http_generate(url, model, prompt, max_tokens, **params)
    if protocol == "http-stream":
        return http_stream_generation(url, model, prompt, max_tokens, **params)
    if protocol == "grpc-stream":
        if not grpc_url:
            raise LpDeployError(
                "protocol 'grpc-stream' needs the server's gRPC address (grpc_url / --grpc-url, "
                "e.g. 127.0.0.1:8001): the HTTP url does not speak gRPC"
            )
        return grpc_generate(grpc_url, model, prompt, max_tokens, True, **params)
    raise LpDeployError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
