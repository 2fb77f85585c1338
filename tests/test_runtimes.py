"""Runtimes behind one interface: torch and ONNX Runtime agree; padding, sampling, scoring."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_model, save_model_dir

from lp_deploy.cli import main
from lp_deploy.errors import LpDeployError, ModelSourceError
from lp_deploy.exporters.onnx import OnnxExportConfig, export_onnx
from lp_deploy.runtimes import Runtime, create_runtime
from lp_deploy.runtimes.base import SamplingConfig, TextDeltas, next_token
from lp_deploy.runtimes.batching import pad_batch, positions_from_mask
from lp_deploy.runtimes.ort_runtime import OrtRuntime
from lp_deploy.runtimes.shared_context import pack_runs
from lp_deploy.runtimes.torch_runtime import TorchRuntime

PROMPT = "the city of the river was built in the early year"
REQUESTS = [
    ("the city of", " the river"),
    ("", "school game film"),
    ("a new song ", "was released"),
    ("the first team of the season played in the north", " ."),
    ("music", " and film"),
]


@pytest.fixture(scope="module")
def dense_export(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dense-onnx") / "onnx"
    return export_onnx(OnnxExportConfig(model=str(tiny_model_dir), out=out, decode_steps=2)).out


@pytest.fixture(scope="module")
def ort_rt(dense_export: Path) -> Runtime:
    return create_runtime("onnxruntime", dense_export, threads=1)


@pytest.fixture(scope="module")
def torch_rt(tiny_model_dir: Path) -> Runtime:
    return create_runtime("torch", tiny_model_dir)


@pytest.fixture(params=["torch", "onnxruntime"])
def runtime(request: pytest.FixtureRequest, ort_rt: Runtime, torch_rt: Runtime) -> Runtime:
    return torch_rt if request.param == "torch" else ort_rt


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- forward


def test_both_implement_the_protocol(ort_rt: Runtime, torch_rt: Runtime) -> None:
    assert isinstance(ort_rt, Runtime) and isinstance(torch_rt, Runtime)
    assert isinstance(ort_rt, OrtRuntime) and isinstance(torch_rt, TorchRuntime)


def test_forward_with_cache_matches(ort_rt: Runtime, torch_rt: Runtime) -> None:
    ids = _ids(24)[None]
    pos = torch.arange(20)[None]
    results = []
    for rt in (ort_rt, torch_rt):
        logits, past = rt.forward(ids[:, :20], torch.ones(1, 20, dtype=torch.long), pos, None)
        steps = [logits]
        for k in range(20, 24):
            mask = torch.ones(1, k + 1, dtype=torch.long)
            logits, past = rt.forward(ids[:, k : k + 1], mask, torch.tensor([[k]]), past)
            steps.append(logits)
        assert len(past) == 8 and past[0][0].shape == (1, 2, 24, 16)
        results.append((torch.cat(steps, 1), past))
    (a, pa), (b, pb) = results
    assert a.dtype == torch.float32 and a.shape == (1, 24, 128)
    assert (a - b).abs().max() < 1e-4
    assert max((x - y).abs().max() for (x, _), (y, _) in zip(pa, pb, strict=True)) < 1e-4


def test_left_padded_batch_equals_single_rows(runtime: Runtime) -> None:
    rows = [_ids(9, 1).tolist(), _ids(16, 2).tolist()]
    ids, mask, offsets = pad_batch(rows, 0, "left")
    logits, past = runtime.forward(ids, mask, positions_from_mask(mask), None)
    nxt = torch.tensor([[5], [6]])
    for _ in range(3):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step, past = runtime.forward(nxt, mask, positions_from_mask(mask)[:, -1:], past)
        logits = torch.cat([logits, step], 1)
    for i, row in enumerate(rows):
        full = torch.tensor([[*row, 5 + i, 5 + i, 5 + i]])
        single, _ = runtime.forward(full, torch.ones_like(full), torch.arange(full.shape[1])[None])
        got = logits[i, offsets[i] :]
        assert got.shape == single[0].shape
        assert (got - single[0]).abs().max() < 1e-4


# --------------------------------------------------------------------------- generate


def test_greedy_generation_matches_transformers(ort_rt: Runtime, torch_rt: Runtime) -> None:
    assert isinstance(torch_rt, TorchRuntime)
    prompt = torch_rt.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        hf = torch_rt.model.generate(
            torch.tensor([prompt]),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    expected = hf[0, len(prompt) :].tolist()
    for rt in (torch_rt, ort_rt):
        assert rt.generate(PROMPT, max_new_tokens=16, stop_token_ids=[]) == expected
    assert ort_rt.generate(prompt, max_new_tokens=16, stop_token_ids=[]) == expected


def test_stop_token_ends_generation(runtime: Runtime) -> None:
    first = runtime.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
    assert len(first) == 4
    assert runtime.generate(PROMPT, max_new_tokens=4, stop_token_ids=[first[1]]) == first[:2]
    assert runtime.generate(PROMPT, max_new_tokens=0) == []


def test_seeded_sampling(ort_rt: Runtime, torch_rt: Runtime) -> None:
    kw = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "stop_token_ids": []}
    a = torch_rt.generate(PROMPT, seed=3, **kw)
    assert a == torch_rt.generate(PROMPT, seed=3, **kw) == ort_rt.generate(PROMPT, seed=3, **kw)
    assert a != torch_rt.generate(PROMPT, seed=4, **kw)
    greedy = torch_rt.generate(PROMPT, max_new_tokens=12, stop_token_ids=[])
    assert torch_rt.generate(PROMPT, seed=5, top_k=1, **kw) == greedy
    assert torch_rt.generate(PROMPT, seed=5, top_p=1e-6, **kw) == greedy


def test_next_token_filters() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert next_token(logits, SamplingConfig()) == 1
    topk = SamplingConfig(do_sample=True, top_k=2)
    assert {next_token(logits, topk, gen) for _ in range(200)} == {1, 2}
    topp = SamplingConfig(do_sample=True, top_p=0.5)
    assert {next_token(logits, topp, gen) for _ in range(200)} <= {1, 2}
    for bad in ({"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            SamplingConfig(do_sample=True, **bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- loglikelihood


def _manual_loglikelihood(rt: TorchRuntime, context: str, continuation: str) -> tuple[float, bool]:
    ctx, cont = rt.encode_pair(context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = rt.model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(ctx) - 1 : -1]
    target = torch.tensor(cont)
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_loglikelihood_matches_manual_and_is_batch_invariant(
    ort_rt: Runtime, torch_rt: Runtime
) -> None:
    assert isinstance(torch_rt, TorchRuntime)
    expected = [_manual_loglikelihood(torch_rt, c, x) for c, x in REQUESTS]
    for rt in (torch_rt, ort_rt):
        for side in ("left", "right"):
            rt.padding_side = side
            for bs in (1, 3, 8):
                got = rt.loglikelihood(REQUESTS, batch_size=bs)
                assert len(got) == len(REQUESTS)
                for (lp, greedy), (want_lp, want_greedy) in zip(got, expected, strict=True):
                    assert lp == pytest.approx(want_lp, abs=1e-3)
                    assert greedy == want_greedy
        rt.padding_side = "right"
    assert all(lp < 0 for lp, _ in expected)


def test_encode_pair_follows_lm_eval(torch_rt: Runtime) -> None:
    ctx, cont = torch_rt.encode_pair("a new song ", "was released")
    assert torch_rt.decode(cont).strip() == "was released"
    assert torch_rt.decode(ctx) == "a new song"
    ctx, cont = torch_rt.encode_pair("", "the city")
    assert ctx == [torch_rt.tokenizer.bos_token_id] and len(cont) == 2


def test_greedy_continuation_is_flagged(torch_rt: Runtime) -> None:
    ids = torch_rt.encode(PROMPT)
    new = torch_rt.generate(ids, max_new_tokens=3, stop_token_ids=[])
    [(lp, greedy)] = torch_rt.loglikelihood_tokens([(ids, new)])
    assert greedy and lp <= 0
    [(_, not_greedy)] = torch_rt.loglikelihood_tokens([(ids, [(new[0] + 1) % 128])])
    assert not not_greedy


# --------------------------------------------------------------------------- registry / errors


def test_unknown_runtime_name(dense_export: Path) -> None:
    with pytest.raises(LpDeployError, match=r"unknown runtime 'tvm'.*torch, onnxruntime, tensorrt"):
        create_runtime("tvm", dense_export)


def test_wrong_artifact_kind(dense_export: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LpDeployError, match=r"has no model\.onnx.*lp-deploy export onnx"):
        create_runtime("onnxruntime", tiny_model_dir)
    with pytest.raises(LpDeployError, match="does not exist"):
        create_runtime("onnxruntime", tmp_path / "missing")
    with pytest.raises(ModelSourceError, match=r"ONNX export.*onnxruntime"):
        create_runtime("torch", dense_export)


def test_export_without_tokenizer_is_refused_clearly(dense_export: Path, tmp_path: Path) -> None:
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(dense_export, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(LpDeployError, match=r"has no tokenizer files.*copy them"):
        create_runtime("onnxruntime", bare)


def test_tensorrt_runtime_needs_tensorrt(dense_export: Path) -> None:
    import onnxruntime

    if "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("TensorRT execution provider present")
    with pytest.raises(LpDeployError, match="TensorRT is not installed"):
        create_runtime("tensorrt", dense_export)


def test_unsupported_dtypes(dense_export: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(LpDeployError, match=r"this export is fp32.*--dtype fp16"):
        create_runtime("onnxruntime", dense_export, dtype="fp16")
    with pytest.raises(LpDeployError, match="dtype 'int8' is not supported by the onnxruntime"):
        create_runtime("onnxruntime", dense_export, dtype="int8")
    with pytest.raises(LpDeployError, match="dtype 'int4' is not supported by the torch"):
        create_runtime("torch", tiny_model_dir, dtype="int4")
    with pytest.raises(LpDeployError, match="not available"):
        create_runtime("onnxruntime", dense_export, providers=["NoSuchExecutionProvider"])


def test_torch_runtime_dtype_option(tiny_model_dir: Path) -> None:
    rt = create_runtime("torch", tiny_model_dir, dtype="bf16")
    assert isinstance(rt, TorchRuntime) and rt.dtype == torch.bfloat16
    assert len(rt.generate(PROMPT, max_new_tokens=3, stop_token_ids=[])) == 3


def test_cli_generate(
    dense_export: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = []
    for name, artifact in (("onnxruntime", dense_export), ("torch", tiny_model_dir)):
        code = main(
            [
                "-q",
                "generate",
                str(artifact),
                "--runtime",
                name,
                "--max-new-tokens",
                "6",
                "--threads",
                "1",
                PROMPT,
            ]
        )
        assert code == 0
        texts.append(capsys.readouterr().out.strip())
    assert texts[0] == texts[1] and texts[0]
    assert main(["-q", "generate", str(tiny_model_dir), "--runtime", "onnxruntime", "x"]) == 2
    assert "has no model.onnx" in capsys.readouterr().err


@pytest.mark.heavy  # ~2 min of compilation on 2 CPU cores: `make test-all`
def test_torch_compile_matches_eager(tiny_model_dir: Path, torch_rt: Runtime) -> None:
    compiled = create_runtime("torch", tiny_model_dir, compile=True)
    want = torch_rt.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
    assert compiled.generate(PROMPT, max_new_tokens=4, stop_token_ids=[]) == want


def test_stream_yields_tokens_as_they_are_made(torch_rt: Runtime) -> None:
    """``stream`` is lazy (one forward per token pulled) and gives ``generate``'s tokens."""
    calls = []
    forward = torch_rt.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return forward(*args, **kwargs)

    torch_rt.forward = counting  # type: ignore[method-assign]
    try:
        stream = torch_rt.stream(PROMPT, max_new_tokens=5, stop_token_ids=[])
        assert calls == []
        first = next(stream)
        assert len(calls) == 1  # the prompt only
        rest = list(stream)
        assert len(calls) == 5
    finally:
        del torch_rt.forward
    assert [first, *rest] == torch_rt.generate(PROMPT, max_new_tokens=5, stop_token_ids=[])


def test_text_deltas_join_to_the_decoded_text(torch_rt: Runtime) -> None:
    tokens = torch_rt.generate(PROMPT, max_new_tokens=12, stop_token_ids=[])
    deltas = TextDeltas(torch_rt.decode)
    pieces = [deltas.push(t) for t in tokens]
    assert "".join(pieces) + deltas.finish() == torch_rt.decode(tokens)
    # an incomplete character is held back until the next token completes it
    held = TextDeltas(lambda ids: "ab\ufffd" if len(ids) == 1 else "abc")
    assert (held.push(1), held.push(2), held.finish()) == ("", "abc", "")


def test_generation_longer_than_the_context_is_refused(
    torch_rt: Runtime, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = len(torch_rt.encode(PROMPT))
    ok = torch_rt.max_length - n
    assert len(torch_rt.generate(PROMPT, max_new_tokens=1)) == 1
    with pytest.raises(
        LpDeployError, match=rf"exceeds the model's context of {torch_rt.max_length}"
    ):
        torch_rt.generate(PROMPT, max_new_tokens=ok + 1)
    argv = ["-q", "generate", str(tiny_model_dir), "--max-new-tokens", "100000", PROMPT]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "at most" in captured.err and "context of 256" in captured.err


#: multiple-choice layout: runs of requests with one context (and an empty context)
MC_REQUESTS = [
    ("the city of the river was", " built"),
    ("the city of the river was", " the first school of the north ."),
    ("the city of the river was", " a"),
    ("the city of the river was", " old great long high house ."),
    ("music", " and film"),
    ("music", " ."),
    ("the team played", " in the south"),
    ("", "school game"),
    ("", "film"),
]
SHARED_TOL = 1e-3  # |log-likelihood| difference, cached continuation vs whole sequence (fp32)


def test_shared_context_scoring_equals_plain_scoring(runtime: Runtime) -> None:
    pairs = [runtime.encode_pair(c, x) for c, x in MC_REQUESTS]
    assert runtime._context_groups(pairs) == [[0, 1, 2, 3], [4, 5], [6], [7, 8]]
    plain = runtime.loglikelihood(MC_REQUESTS, batch_size=1, shared_context=False)
    for bs in (1, 2, 8):
        shared = runtime.loglikelihood(MC_REQUESTS, batch_size=bs)
        for (lp, greedy), (want_lp, want_greedy) in zip(shared, plain, strict=True):
            assert lp == pytest.approx(want_lp, abs=SHARED_TOL)
            assert greedy == want_greedy


#: several multiple-choice items of different context lengths (and one-token choices, as in
#: boolq), so that batched context passes pad and continuations index several KV caches
MANY_ITEMS = [
    *MC_REQUESTS[:6],
    ("the first team of the season played in the north of the city", " yes"),
    ("the first team of the season played in the north of the city", " no"),
    ("a song", " was released in the early year"),
    ("a song", " ."),
    ("a song", " and a film of the river"),
    ("the school of music and film was built in the south", " in"),
    ("the school of music and film was built in the south", " by the team of the city"),
]


def _count_forwards(runtime: Runtime, call: Any) -> tuple[Any, int]:
    calls = 0
    original = runtime.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    runtime.forward = counted  # type: ignore[method-assign]
    try:
        return call(), calls
    finally:
        del runtime.forward


def test_batched_shared_scoring_across_items_equals_plain_scoring(runtime: Runtime) -> None:
    plain = runtime.loglikelihood(MANY_ITEMS, batch_size=1, shared_context=False)
    counts = {}
    for bs in (1, 2, 3, 5, 64):
        shared, counts[bs] = _count_forwards(
            runtime, partial(runtime.loglikelihood, MANY_ITEMS, bs)
        )
        for (lp, greedy), (want_lp, want_greedy) in zip(shared, plain, strict=True):
            assert lp == pytest.approx(want_lp, abs=SHARED_TOL)
            assert greedy == want_greedy
    # the 5 contexts share one pass (they pad to far fewer than SHARED_CONTEXT_TOKENS); then
    # batch 1 runs each continuation of 2+ tokens alone, batch 64 all of them in one pass
    longer = sum(len(runtime.encode_pair(c, x)[1]) > 1 for c, x in MANY_ITEMS)
    assert longer >= 5 and counts[1] == 1 + longer and counts[64] == 2


def _window_pairs() -> list[tuple[list[int], list[int]]]:
    """Contexts of 20 and 6 tokens (the tiny models' window is 8) batched: their caches pad."""
    ids = partial(torch.randint, 4, 120, generator=torch.Generator().manual_seed(0))
    long, short = ids((20,)).tolist(), ids((6,)).tolist()
    return [(ctx, ids((n,)).tolist()) for ctx, n in ((long, 3), (long, 4), (short, 5), (short, 6))]


def _assert_shared_equals_plain(rt: Runtime, pairs: list[tuple[list[int], list[int]]]) -> None:
    plain = rt.loglikelihood_tokens(pairs, 1)
    for bs in (1, 4):
        shared = rt.loglikelihood_shared(pairs, bs)
        for (lp, greedy), (want_lp, want_greedy) in zip(shared, plain, strict=True):
            assert lp == pytest.approx(want_lp, abs=SHARED_TOL)
            assert greedy == want_greedy


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3"])
def test_batched_shared_scoring_under_sliding_windows_equals_plain(
    arch: str, tokenizer: Any
) -> None:
    """Contexts longer and shorter than the window, their continuations in one batch (the
    window counts cache slots: padding between a context and its continuation would shift it)."""
    model = make_tiny_model(arch)
    _assert_shared_equals_plain(TorchRuntime(model, tokenizer), _window_pairs())


def test_batched_shared_scoring_under_sliding_windows_onnx(tmp_path: Path, tokenizer: Any) -> None:
    src = save_model_dir(make_tiny_model("mistral"), tokenizer, tmp_path / "mistral")
    out = export_onnx(OnnxExportConfig(model=str(src), out=tmp_path / "onnx", decode_steps=2)).out
    _assert_shared_equals_plain(create_runtime("onnxruntime", out, threads=1), _window_pairs())


def test_pack_runs_bounds_requests_and_padded_context_tokens() -> None:
    runs = [[0, 1, 2, 3], [4, 5], [6, 7], [8], [9, 10, 11, 12, 13]]
    lengths = [9, 8, 8, 7, 3]
    assert pack_runs(runs, lengths, rows=8, tokens=100) == [runs[:3], runs[3:]]
    assert pack_runs(runs, lengths, rows=3, tokens=100) == [
        [runs[0]],
        [runs[1]],
        runs[2:4],
        [runs[4]],
    ]
    # padded tokens are runs x the first (longest) context: 2 x 9 fit in 18, 3 x 9 do not
    assert pack_runs(runs, lengths, rows=64, tokens=18) == [runs[:2], runs[2:4], runs[4:]]
    assert pack_runs(runs, lengths, rows=64, tokens=16) == [[runs[0]], runs[1:3], runs[3:]]
