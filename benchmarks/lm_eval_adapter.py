"""lm-evaluation-harness adapter: any lp-deploy runtime as the lm-eval model ``lp-deploy``.

Importing this module registers :class:`LpDeployLM` under the name ``lp-deploy`` in
lm-eval's model registry (lm-eval 0.4.x has no entry-point discovery of third-party
models, so registration happens on import). Three ways to use it:

- Python, with a runtime you already built (PyTorch, ONNX Runtime, TensorRT, or an
  in-memory ``TorchRuntime(model, tokenizer)``)::

      from lp_deploy.benchmarks.lm_eval_adapter import LpDeployLM
      lm = LpDeployLM(runtime=rt, batch_size=8)
      lm_eval.simple_evaluate(model=lm, tasks=["copa"])

- Python, by name (after importing this module)::

      lm_eval.simple_evaluate(model="lp-deploy",
                              model_args="artifact=out/patched,runtime=torch,dtype=fp32")

- The lm-eval command line, through this module (which registers the model first)::

      python -m lp_deploy.benchmarks.lm_eval_adapter run --model lp-deploy \\
          --model_args artifact=out/onnx,runtime=onnxruntime,threads=2 --tasks copa

``model_args``: ``artifact`` (a patched checkpoint dir, dense model source or ONNX export),
``runtime`` (``torch``, ``onnxruntime``/``ort``, ``tensorrt``), ``batch_size`` (an integer;
``auto`` means :data:`AUTO_BATCH_SIZE`, capped by ``max_batch_size``: there is no memory
probing), ``max_length`` (the context window; default the runtime's), ``max_gen_toks``
(default generation length), ``device`` (torch runtime only;
a CUDA device falls back to ``cpu`` where CUDA is absent); every other key goes to
:func:`lp_deploy.runtimes.create_runtime` (``dtype``, ``threads``, ``compile``,
``padding_side``, ``providers``, ...).

Scoring follows lm-eval's ``HFLM``:

- ``loglikelihood``: the runtime's lm-eval split (trailing context spaces move to the
  continuation; an empty context becomes the BOS token, else EOS), sum of log-probabilities
  and whether every continuation token is the argmax. Requests are scored longest first
  in batches of ``batch_size``, exactly as one ``Runtime.loglikelihood`` call would batch
  them (so :mod:`lp_deploy.benchmarks.qa` gives identical numbers on the same requests).
- ``loglikelihood_rolling`` (perplexity tasks): the text's token ids (no special tokens)
  cut into disjoint windows of at most ``max_length`` predicted tokens with lm-eval's
  ``get_rolling_token_windows(prefix_token=BOS or EOS, context_len=1)``; each window is a
  token-level loglikelihood request; the result is the sum over windows.
- ``generate_until``: the runtime's ``generate`` (greedy unless the request asks for
  ``do_sample``/``temperature``), at most ``max_gen_toks`` new tokens, stopped at EOS;
  the decoded text is cut at the first occurrence of each ``until`` string, as lm-eval
  does. The context is encoded without special tokens and left-truncated to
  ``max_length - max_gen_toks``. To stop early on a stop string the runtime is called in
  chunks of 16, 32, 64, ... tokens (each chunk re-reads the prompt plus what was generated
  so far); a chunk may run past a stop string, which the cut then removes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lp_deploy.errors import LpDeployError
from lp_deploy.runtimes.base import Runtime

try:
    import lm_eval.models  # noqa: F401  (keeps lm-eval's own models registered too)
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-eval adapter needs lm-evaluation-harness: pip install 'lp-deploy[lmeval]' "
        f"(or pip install lm-eval); import failed with: {exc}"
    ) from exc

__all__ = ["AUTO_BATCH_SIZE", "MODEL_NAME", "LpDeployLM", "main"]

logger = logging.getLogger(__name__)

MODEL_NAME = "lp-deploy"
AUTO_BATCH_SIZE = 8  # what batch_size=auto means (no memory probing)
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default
FIRST_GEN_CHUNK = 16
CHUNK_BATCHES = 16  # batches per progress-bar step
MAX_TOKEN_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "seed")

TokenPair = tuple[list[int], list[int]]


def parse_batch_size(batch_size: int | str | None, max_batch_size: int | None = None) -> int:
    """An int from lm-eval's ``batch_size`` (``N``, ``"N"``, ``"auto"``, ``"auto:K"``)."""
    if batch_size is None:
        size = 1
    elif isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
        size = AUTO_BATCH_SIZE
        if max_batch_size:
            size = min(size, int(max_batch_size))
    else:
        try:
            size = int(batch_size)
        except ValueError as exc:
            raise LpDeployError(
                f"batch_size must be a positive integer or 'auto', got {batch_size!r}"
            ) from exc
    if size < 1:
        raise LpDeployError(f"batch_size must be >= 1, got {batch_size!r}")
    return size


def torch_device(device: str) -> str:
    """``device``, or ``cpu`` for a CUDA device on a machine without CUDA (lm-eval's
    command line asks for ``cuda:0`` unless told otherwise; ``HFLM`` falls back the same way)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device=%s asked for but CUDA is not available: using cpu", device)
        return "cpu"
    return device


def _split_stop(until: Any) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, list | tuple):
        return [str(u) for u in until]
    raise LpDeployError(f"generation 'until' must be a string or a list, got {until!r}")


def cut_at_stop(text: str, until: Iterable[str]) -> str:
    """lm-eval's post-processing: the text before the first occurrence of each stop string."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


@register_model(MODEL_NAME)
class LpDeployLM(LM):  # type: ignore[misc]
    """An lm-eval ``LM`` over an lp-deploy :class:`~lp_deploy.runtimes.base.Runtime`.

    Give either ``runtime=<Runtime instance>`` or ``artifact=DIR`` with ``runtime`` a
    runtime name (lm-eval's ``model_args``); the remaining keyword arguments go to
    :func:`~lp_deploy.runtimes.create_runtime`.
    """

    def __init__(
        self,
        artifact: str | Path | None = None,
        runtime: str | Runtime = "torch",
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        **runtime_opts: Any,
    ) -> None:
        super().__init__()
        if isinstance(runtime, str):
            if artifact is None:
                raise LpDeployError(
                    f"the {MODEL_NAME} lm-eval model needs artifact=DIR in model_args (a "
                    "checkpoint dir, model source or ONNX export), or a runtime instance"
                )
            if device is not None:
                if runtime == "torch":
                    runtime_opts["device"] = torch_device(device)
                else:
                    logger.info(
                        "device=%s is ignored by the %s runtime (choose providers instead)",
                        device,
                        runtime,
                    )
            from lp_deploy.runtimes import create_runtime

            self.runtime: Runtime = create_runtime(runtime, artifact, **runtime_opts)
            self.artifact: str | None = str(artifact)
        else:
            if artifact is not None or runtime_opts:
                extra = ", ".join(["artifact", *runtime_opts] if artifact else list(runtime_opts))
                raise LpDeployError(
                    f"a ready runtime instance was given: drop {extra} (they only apply when "
                    "the adapter builds the runtime from artifact=DIR)"
                )
            if not isinstance(runtime, Runtime):
                raise LpDeployError(
                    f"runtime must be a runtime name or an lp-deploy Runtime (a subclass of "
                    f"lp_deploy.runtimes.Runtime), got {type(runtime).__name__}"
                )
            self.runtime = runtime
            self.artifact = None
        self.batch_size = parse_batch_size(batch_size, max_batch_size)
        self.max_gen_toks = int(max_gen_toks)
        if self.max_gen_toks < 1:
            raise LpDeployError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        self._max_length = int(max_length) if max_length else None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ properties

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.runtime.tokenizer

    @property
    def max_length(self) -> int:
        """Context window in tokens: ``max_length`` if given, else the runtime's."""
        return self._max_length or int(self.runtime.max_length)

    @property
    def tokenizer_name(self) -> str:
        name = getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__
        return str(name).replace("/", "__")

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: BOS, else EOS (lm-eval's ``HFLM`` rule)."""
        return self.runtime.context_token()

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by ``simple_evaluate`` in ``results['config']``."""
        return {
            "lp_deploy_runtime": self.runtime.name,
            "lp_deploy_artifact": self.artifact,
            "lp_deploy_max_length": self.max_length,
        }

    # ------------------------------------------------------------------ helpers

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def _input_length(self, pair: TokenPair) -> int:
        """The scored input length after the runtime's left truncation."""
        return min(len(pair[0]) + len(pair[1]), self.max_length + 1) - 1

    def _score_pairs(
        self, pairs: Sequence[TokenPair], desc: str, disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """Token-level log-likelihoods, batched longest first as one runtime call would.

        The requests are sorted (stably) by input length and handed over in blocks of
        whole batches, so every batch is the one ``loglikelihood_tokens`` would make from
        all of them at once, with a progress bar between blocks.
        """
        order = sorted(range(len(pairs)), key=lambda i: -self._input_length(pairs[i]))
        block = self.batch_size * CHUNK_BATCHES
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        with tqdm(total=len(pairs), desc=desc, disable=disable_tqdm or not pairs) as bar:
            for start in range(0, len(order), block):
                idx = order[start : start + block]
                scored = self.runtime.loglikelihood_tokens([pairs[i] for i in idx], self.batch_size)
                for i, (ll, greedy) in zip(idx, scored, strict=True):
                    out[i] = (float(ll), bool(greedy))
                bar.update(len(idx))
        return cast(list[tuple[float, bool]], out)

    # ------------------------------------------------------------------ lm-eval API

    def loglikelihood(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), is_greedy)`` per ``(context, continuation)``."""
        args = [(str(r.args[0]), str(r.args[1])) for r in requests]
        pairs = [self.runtime.encode_pair(c, x) for c, x in args]
        results = self._score_pairs(pairs, "lp-deploy loglikelihood", disable_tqdm)
        for arg, res in zip(args, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", arg, res)
        return results

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-likelihood of each whole text, over disjoint ``max_length`` windows."""
        texts = [str(r.args[0]) for r in requests]
        pairs: list[TokenPair] = []
        counts: list[int] = []
        for text in texts:
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.runtime.encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            pairs.extend((list(a), list(b)) for a, b in windows)
            counts.append(len(windows))
        scored = self._score_pairs(pairs, "lp-deploy loglikelihood_rolling", disable_tqdm)
        out: list[float] = []
        start = 0
        for text, n in zip(texts, counts, strict=True):
            total = float(sum(ll for ll, _ in scored[start : start + n]))
            start += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generated text per ``(context, gen_kwargs)``, cut at the ``until`` strings."""
        out = []
        for req in tqdm(requests, desc="lp-deploy generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args[0], (req.args[1] if len(req.args) > 1 else {})
            text = self._generate_one(str(context), dict(gen_kwargs or {}))
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out

    def _generate_one(self, context: str, kwargs: dict[str, Any]) -> str:
        until = _split_stop(kwargs.pop("until", None))
        given = [kwargs.pop(k, None) for k in MAX_TOKEN_ALIASES]  # lm-eval's priority order
        max_gen = next((int(v) for v in given if v is not None), self.max_gen_toks)
        sampling = {k: kwargs.pop(k) for k in SAMPLING_KEYS if k in kwargs}
        if "max_length" in kwargs:
            raise LpDeployError("use max_gen_toks, not max_length, in generation kwargs")
        if kwargs:
            self._warn_once(f"{MODEL_NAME}: ignoring generation kwargs {sorted(kwargs)}")
        temperature = float(sampling.get("temperature") or 0.0)
        do_sample = sampling.get("do_sample")
        do_sample = temperature > 0 if do_sample is None else bool(do_sample)
        if max_gen >= self.max_length:
            raise LpDeployError(
                f"max_gen_toks={max_gen} must be below the context window {self.max_length}"
            )
        ids = self.runtime.encode(context)[-(self.max_length - max_gen) :] if context else []
        ids = ids or [self.prefix_token_id]
        opts: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            opts.update(temperature=temperature if temperature > 0 else 1.0)
            opts.update(top_k=int(sampling.get("top_k") or 0))
            opts.update(top_p=float(sampling.get("top_p") or 1.0))
        seed = sampling.get("seed")
        eos = set(self.runtime.eos_token_ids)
        new: list[int] = []
        chunk = FIRST_GEN_CHUNK
        for step in range(max_gen):  # at most max_gen chunks; usually a few
            n = min(chunk, max_gen - len(new))
            if do_sample and seed is not None:
                opts["seed"] = int(seed) + step
            got = self.runtime.generate([*ids, *new], max_new_tokens=n, **opts)
            new.extend(got)
            finished = len(got) < n or (bool(got) and got[-1] in eos)
            if (
                finished
                or len(new) >= max_gen
                or any(s and s in self.runtime.decode(new) for s in until)
            ):
                break
            chunk *= 2
        return cut_at_stop(self.runtime.decode(new), until)


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``lp-deploy`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0], *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
