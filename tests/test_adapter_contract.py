"""The adapter contract, checked for every supported architecture.

Every generic pass (statistics, pruning, folding, export) trusts what an adapter says about
its model: which modules read and write the residual stream, where the boundaries are. One
parametrised class checks those promises numerically on a tiny random model of each family
(``conftest.ARCHS``); :func:`test_every_adapter_is_covered` keeps that list and the adapter
registry in step, so a new adapter cannot land without passing the contract.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import ARCHS, make_tiny_model
from torch import nn

from lp_deploy.adapters import ADAPTERS, ModelAdapter, get_adapter, supported_model_types
from lp_deploy.adapters.base import reading_module
from lp_deploy.errors import UnsupportedArchitectureError
from lp_deploy.modules import PatchedInput, ScalePatch, unwrap

LAYERS = 4
HIDDEN = 64


def test_every_adapter_is_covered() -> None:
    """Each supported model type has a tiny test model here, and nothing else does."""
    covered = {make_tiny_model(arch, num_layers=2).config.model_type for arch in ARCHS}
    assert covered == set(supported_model_types())
    types = [t for cls in ADAPTERS for t in cls.model_types]
    assert len(types) == len(set(types)), "a model type claimed by two adapters"


def test_unsupported_architecture_names_the_fix() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedArchitectureError) as info:
        get_adapter(model)
    message = str(info.value)
    assert "'gpt2'" in message and "lp_deploy/adapters/" in message
    assert all(t in message for t in supported_model_types())


def _ids(n: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(4, 100, (n, length), generator=torch.Generator().manual_seed(5))


def _inputs(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The first input of ``module`` during ``run()``."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def _outputs(module: nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The output of ``module`` during ``run()``."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def _param_owners(layer: nn.Module, run: Callable[[], Any]) -> dict[nn.Module, torch.Tensor]:
    """First input of every module owning parameters inside ``layer`` (linears, routers,
    experts; norms too) during ``run()``."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        seen.setdefault(m, x.detach())

    handles = [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in layer.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def _same(x: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal values, whatever the batch/token layout (experts read a flattened stream)."""
    d = ref.shape[-1]
    if x.shape[-1] != d or x.numel() != ref.numel():
        return False
    return x.reshape(-1, d).equal(ref.reshape(-1, d))


def reader_problems(model: Any, adapter: ModelAdapter) -> list[str]:
    """Where the listed readers differ from the modules that actually read each norm (or,
    without a norm, the stream the first listed reader reads)."""
    ids = _ids()
    run = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    problems = []
    for i, layer in enumerate(adapter.layers):
        la = adapter.layer_adapter(layer)
        inputs = _param_owners(unwrap(layer), run)
        for name, norm, listed in (
            ("attn", la.attn_norm, la.attn_inputs),
            ("mlp", la.mlp_norm, la.mlp_inputs),
        ):
            modules = {reading_module(p) for p in listed}
            if norm is not None:
                ref = _outputs(norm, run)
            else:
                ref = inputs[reading_module(listed[0])]
                if name == "attn" and not _same(ref, _inputs(layer, run)):
                    problems.append(f"layer {i}: attn readers without a norm miss the stream")
            actual = {m for m, x in inputs.items() if m is not norm and _same(x, ref)}
            if actual != modules:
                problems.append(
                    f"layer {i}: {name} readers {len(modules)} listed, {len(actual)} read"
                )
    return problems


def writer_problems(model: Any, adapter: ModelAdapter) -> list[str]:
    """Where a layer's update of the stream is not the sum of its writers' outputs times the
    residual multiplier (checked for families whose stream can be rotated: the fold relies
    on it)."""
    from lp_deploy.fold import fold_blockers

    if fold_blockers(adapter):
        return []
    ids = _ids()
    run = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    problems = []
    for i, layer in enumerate(adapter.layers):
        la = adapter.layer_adapter(layer)
        before, after = _inputs(layer, run), _outputs(layer, run)
        after = after[0] if isinstance(after, tuple) else after
        written = sum(
            _outputs(reading_module(p), run).reshape(after.shape)
            for p in (la.attn_output, la.mlp_output)
        )
        update = (after - before) / adapter.residual_multiplier
        if not torch.allclose(update, written, rtol=1e-4, atol=1e-5):
            problems.append(f"layer {i}: the stream's update is not attn_output + mlp_output")
    return problems


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("arch", list(ARCHS))
class TestAdapterContract:
    """What every adapter promises, on a tiny random model of its family."""

    @pytest.fixture
    def model(self, arch: str, tied: bool) -> Any:
        return make_tiny_model(arch, tied=tied, num_layers=LAYERS, hidden=HIDDEN)

    @pytest.fixture
    def adapter(self, model: Any) -> ModelAdapter:
        return get_adapter(model)

    def test_registered_for_its_model_type(self, model: Any, adapter: ModelAdapter) -> None:
        assert type(adapter) in ADAPTERS
        assert model.config.model_type in adapter.model_types

    def test_shapes(self, model: Any, adapter: ModelAdapter) -> None:
        d = adapter.hidden_size
        assert d == HIDDEN == adapter.embeddings.weight.shape[1]
        assert len(adapter.layers) == model.config.num_hidden_layers == LAYERS
        assert adapter.lm_head.in_features == d
        assert adapter.lm_head.out_features == model.config.vocab_size
        for layer in adapter.layers:
            la = adapter.layer_adapter(layer)
            for norm in (la.attn_norm, la.mlp_norm):
                assert norm is None or norm.weight.shape == (d,)
            assert all(p.weight.shape[-1] == d for p in [*la.attn_inputs, *la.mlp_inputs])
            assert la.attn_output.weight.shape[-2] == la.mlp_output.weight.shape[-2] == d

    def test_tied_embeddings(self, model: Any, adapter: ModelAdapter, tied: bool) -> None:
        assert adapter.tied_embeddings == tied

    def test_boundaries(self, model: Any, adapter: ModelAdapter) -> None:
        """The stream enters layer i+1 as layer i left it, and the final norm reads the last
        layer's output; the backbone returns the final norm's output."""
        ids = _ids()
        run = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
        layers = list(adapter.layers)
        for prev, nxt in itertools.pairwise(layers):
            out = _outputs(prev, run)
            out = out[0] if isinstance(out, tuple) else out
            torch.testing.assert_close(_inputs(nxt, run), out)
        last = _outputs(layers[-1], run)
        last = last[0] if isinstance(last, tuple) else last
        torch.testing.assert_close(_inputs(adapter.final_norm, run), last)
        with torch.no_grad():
            hidden = adapter.backbone(input_ids=ids).last_hidden_state
        torch.testing.assert_close(hidden, _outputs(adapter.final_norm, run))
        torch.testing.assert_close(model(input_ids=ids).logits, adapter.logits(hidden))

    def test_readers_are_exactly_the_linears_reading_the_norms(
        self, model: Any, adapter: ModelAdapter
    ) -> None:
        assert reader_problems(model, adapter) == []

    def test_writers_are_what_updates_the_stream(self, model: Any, adapter: ModelAdapter) -> None:
        assert writer_problems(model, adapter) == []

    def test_unwraps_patched_layers_and_final_norm(self, adapter: ModelAdapter) -> None:
        layer = adapter.layers[1]
        wrapped = PatchedInput(layer, ScalePatch(torch.ones(HIDDEN)))
        assert adapter.layer_adapter(wrapped).layer is unwrap(wrapped) is layer
        norm = adapter.final_norm
        adapter.set_final_norm(PatchedInput(norm, ScalePatch(torch.ones(HIDDEN))))
        assert unwrap(adapter.final_norm) is norm

    def test_set_layers_renumbers(self, model: Any, adapter: ModelAdapter) -> None:
        """Dropping a layer and renumbering keeps cached generation equal to uncached."""
        kept = [layer for i, layer in enumerate(adapter.layers) if i != 1]
        for index, layer in enumerate(kept):
            adapter.layer_adapter(layer).set_layer_index(index)
        adapter.set_layers(kept)
        assert len(adapter.layers) == model.config.num_hidden_layers == LAYERS - 1
        types = getattr(model.config, "layer_types", None)
        assert types is None or len(types) == LAYERS - 1
        ids = _ids(1, 6)
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits[:, -1]
            out = model(input_ids=ids[:, :-1], use_cache=True)
            step = model(input_ids=ids[:, -1:], past_key_values=out.past_key_values).logits
        torch.testing.assert_close(step[:, -1], full, rtol=1e-4, atol=1e-4)


def test_the_contract_catches_a_wrong_adapter() -> None:
    """A reader left out or a wrong writer is reported (the checks are not vacuous)."""
    from lp_deploy.adapters.llama import LlamaLayerAdapter

    class NoValue(LlamaLayerAdapter):
        @property
        def attn_inputs(self) -> Any:
            return super().attn_inputs[:2]

    class WrongWriter(LlamaLayerAdapter):
        @property
        def mlp_output(self) -> nn.Linear:
            return self.layer.self_attn.o_proj

    model = make_tiny_model("llama", num_layers=2, hidden=HIDDEN)
    for layer_cls, check in ((NoValue, reader_problems), (WrongWriter, writer_problems)):
        adapter = get_adapter(model)
        adapter.layer_adapter = lambda layer, cls=layer_cls: cls(unwrap(layer))  # type: ignore[method-assign]
        assert len(check(model, adapter)) == 2, layer_cls.__name__
