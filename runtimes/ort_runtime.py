"""ONNX Runtime: runs an ``lp-deploy export onnx`` directory (``model.onnx`` + config + tokenizer).

CPU by default; the CUDA (and, on request, TensorRT) execution providers are used when the
installed onnxruntime has them. On CUDA, inputs and outputs stay on the GPU (IO binding).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, GenerationConfig

from lp_deploy.artifacts import CONFIG_FILE, ONNX_FILE
from lp_deploy.errors import LpDeployError

from .base import Runtime, dtype_name, eos_ids, parse_dtype
from .batching import Past

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_ORT_TYPES: dict[str, torch.dtype] = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(bfloat16)": torch.bfloat16,
}
_NP_TYPES: dict[torch.dtype, Any] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
}


def import_ort() -> Any:
    """``onnxruntime``, or a clear error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise LpDeployError(
            "onnxruntime is not installed: pip install 'lp-deploy[onnx]' "
            "(or onnxruntime-gpu on a machine with an NVIDIA GPU)"
        ) from exc
    return onnxruntime


def load_tokenizer(artifact_dir: Path) -> Any:
    """The export's tokenizer; a clear error when the directory has none (optimum's
    ``optimum-cli export onnx`` writes none, for instance)."""
    if not any(artifact_dir.glob("tokenizer*")):
        raise LpDeployError(
            f"{artifact_dir} has no tokenizer files (tokenizer.json / tokenizer_config.json): "
            "copy them from the source model's directory into it"
        )
    return AutoTokenizer.from_pretrained(artifact_dir)


def onnx_path(artifact_dir: str | Path) -> Path:
    """``artifact_dir/model.onnx``; a clear error when the directory is not an ONNX export."""
    path = Path(artifact_dir).expanduser()
    model = path / ONNX_FILE
    if not model.is_file():
        what = "does not exist" if not path.exists() else f"has no {ONNX_FILE}"
        raise LpDeployError(
            f"{path} {what}: the onnxruntime runtime needs a directory written by "
            "'lp-deploy export onnx' (model.onnx, config.json, tokenizer)"
        )
    return model


def choose_providers(ort: Any, requested: Sequence[str] | None) -> list[str]:
    """Requested providers (all must be available), else CUDA when present, then CPU."""
    available = list(ort.get_available_providers())
    if requested is None:
        return [p for p in (CUDA, CPU) if p in available]
    missing = [p for p in requested if p not in available]
    if missing:
        hint = (
            " TensorRT is not installed: pip install tensorrt and onnxruntime-gpu on a machine "
            "with an NVIDIA GPU."
            if TENSORRT in missing
            else ""
        )
        raise LpDeployError(
            f"execution provider(s) {missing} are not available in this onnxruntime "
            f"(available: {available}).{hint}"
        )
    return list(requested)


class OrtRuntime(Runtime):
    """An ONNX export under ONNX Runtime (``intra_op_num_threads`` sets the CPU threads)."""

    name = "onnxruntime"

    def __init__(
        self,
        artifact_dir: str | Path,
        providers: Sequence[str] | None = None,
        intra_op_num_threads: int | None = None,
        dtype: str | None = None,
        io_binding: bool | None = None,
        graph_optimization_level: str | None = None,
        padding_side: str = "right",
    ) -> None:
        ort = import_ort()
        path = onnx_path(artifact_dir)
        self.artifact_dir = path.parent
        self.providers = choose_providers(ort, providers)
        opts = ort.SessionOptions()
        if intra_op_num_threads:
            opts.intra_op_num_threads = int(intra_op_num_threads)
            opts.inter_op_num_threads = 1
        if graph_optimization_level:
            opts.graph_optimization_level = getattr(
                ort.GraphOptimizationLevel, graph_optimization_level
            )
        self.kv_dtype = self._graph_kv_dtype(ort, path)
        self._check_dtype(dtype)
        self.session = ort.InferenceSession(str(path), opts, providers=self.providers)
        self._read_io()
        self.padding_side = padding_side
        config_file = self.artifact_dir / CONFIG_FILE
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.max_length = int(self.config.get("max_position_embeddings") or 2048)
        self.tokenizer = load_tokenizer(self.artifact_dir)
        self.eos_token_ids = eos_ids(self.tokenizer, self._generation_config())
        on_cuda = CUDA in self.session.get_providers() or TENSORRT in self.session.get_providers()
        self.io_binding = on_cuda if io_binding is None else io_binding and on_cuda

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _graph_kv_dtype(ort: Any, path: Path) -> torch.dtype:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        past = [i for i in graph.input if i.name.startswith("past_key_values.")]
        if not past:
            raise LpDeployError(
                f"{path} has no past_key_values inputs; re-export it with lp-deploy"
            )
        elem = past[0].type.tensor_type.elem_type
        return {
            onnx.TensorProto.FLOAT: torch.float32,
            onnx.TensorProto.FLOAT16: torch.float16,
            onnx.TensorProto.BFLOAT16: torch.bfloat16,
        }.get(elem, torch.float32)

    def _check_dtype(self, dtype: str | None) -> None:
        wanted = parse_dtype(dtype, "onnxruntime")
        if wanted is not None and wanted != self.kv_dtype:
            raise LpDeployError(
                f"this export is {dtype_name(self.kv_dtype)} and ONNX Runtime cannot change a "
                f"graph's dtype; re-export with 'lp-deploy export onnx ... --dtype {dtype}'"
            )
        if self.kv_dtype == torch.bfloat16 and self.providers == [CPU]:
            raise LpDeployError(
                "dtype bf16 is not supported by ONNX Runtime's CPU provider (no bf16 kernels); "
                "export with --dtype fp32 or fp16, or run on a CUDA provider"
            )

    def _read_io(self) -> None:
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        past = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.num_layers = len(past) // 2
        self.kv_heads, self.head_dim = int(past[0].shape[1]), int(past[0].shape[3])
        logits = self.session.get_outputs()[0]
        self.vocab_size = int(logits.shape[-1])
        self.logits_dtype = _ORT_TYPES.get(logits.type, torch.float32)
        self.has_position_ids = "position_ids" in self.input_names

    def _generation_config(self) -> GenerationConfig | None:
        if not (self.artifact_dir / "generation_config.json").is_file():
            return None
        return GenerationConfig.from_pretrained(self.artifact_dir)

    # ------------------------------------------------------------------ forward

    def _feed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Past | None,
    ) -> dict[str, torch.Tensor]:
        batch = input_ids.shape[0]
        feed = {"input_ids": input_ids.long(), "attention_mask": attention_mask.long()}
        if self.has_position_ids:
            feed["position_ids"] = position_ids.long()
        if past is None:
            empty = torch.zeros(batch, self.kv_heads, 0, self.head_dim, dtype=self.kv_dtype)
            past = [(empty, empty)] * self.num_layers
        if len(past) != self.num_layers:
            raise LpDeployError(f"past has {len(past)} layers, the graph {self.num_layers}")
        for i, (key, value) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = key
            feed[f"past_key_values.{i}.value"] = value
        return feed

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Past | None = None,
    ) -> tuple[torch.Tensor, Past]:
        feed = self._feed(input_ids, attention_mask, position_ids, past)
        outs = self._run_bound(feed) if self.io_binding else self._run_cpu(feed)
        present = [(outs[1 + 2 * i], outs[2 + 2 * i]) for i in range(self.num_layers)]
        return outs[0].float(), present

    def _run_cpu(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feed.items()}
        return [torch.from_numpy(o) for o in self.session.run(self.output_names, arrays)]

    def _run_bound(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Inputs and outputs bound to CUDA buffers owned by torch (no host copies)."""
        dev = torch.device("cuda", 0)
        binding = self.session.io_binding()
        keep = {k: v.to(dev).contiguous() for k, v in feed.items()}
        for name, t in keep.items():
            binding.bind_input(name, "cuda", 0, _NP_TYPES[t.dtype], list(t.shape), t.data_ptr())
        batch, seq = feed["input_ids"].shape
        total = feed["attention_mask"].shape[1]
        outs = [torch.empty(batch, seq, self.vocab_size, dtype=self.logits_dtype, device=dev)]
        kv_shape = (batch, self.kv_heads, total, self.head_dim)
        outs += [
            torch.empty(kv_shape, dtype=self.kv_dtype, device=dev)
            for _ in range(2 * self.num_layers)
        ]
        for name, t in zip(self.output_names, outs, strict=True):
            binding.bind_output(name, "cuda", 0, _NP_TYPES[t.dtype], list(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)
        return outs
