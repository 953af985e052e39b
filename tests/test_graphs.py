"""The CUDA-graph plumbing of the compiled path, on the CPU: graphs.CudaGraphCache runs the plain call there (and on
any capture failure), so these check that the graphed route computes exactly what the plain route does -- the same
denoiser with `fluxcore_cuda_graphs` set (all inputs, Z-Image's RoPE tables included, passed as tensors) gives the
same velocity bit for bit, and the Qwen3 encoder with `use_cuda_graphs()` the same hidden states. The capture itself
is exercised on the GPU by bench/bench_summary.py (which prints graphed-vs-plain differences)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_core.families import FAMILIES
from flux_core.models import LoadedModel
from flux_core.pipeline import Conditioning
from flux_core.torch import graphs, runtime


def test_cache_is_plain_on_cpu_and_keys_by_signature():
    calls = []

    def fn(a, k):
        calls.append(k)
        return a * k

    cache = graphs.CudaGraphCache(fn, "t")
    x = torch.arange(4.0)
    assert torch.equal(cache(x, 2), x * 2) and torch.equal(cache(x, 3), x * 3)
    assert calls == [2, 3] and cache.replays == 0 and not cache.entries  # CPU: never captured


def _loaded(family, module):
    return LoadedModel("transformer", module, "t", "torch", "cpu", "float32",
                       variant=FAMILIES[family].variant(True, module.config))


def _velocity(model, cond, h, w, graphed):
    model.module.fluxcore_cuda_graphs = graphed
    den = runtime.make_denoiser(model, cond, None, 1.0, 1, h, w)
    x = torch.randn(1, model.module.config.in_channels if model.family.name == "klein" else 16, h, w,
                    generator=torch.Generator().manual_seed(3))
    return [den(x, t) for t in (0.9, 0.5)]


def test_klein_graphed_route_equals_plain():
    from refs import klein as rk

    from flux_core.torch.klein import load_klein
    from flux_core.weights.klein import to_native

    ref = rk.build_reference(seed=0)
    net = load_klein(to_native(ref.state_dict()))
    model = _loaded("klein", net)
    emb = torch.randn(1, 512, net.config.context_in_dim, generator=torch.Generator().manual_seed(1))
    ref_lat = torch.randn(1, net.config.in_channels, 2, 2, generator=torch.Generator().manual_seed(2))
    cond = Conditioning("klein", emb, ["p"], [ref_lat])
    plain, fast = _velocity(model, cond, 4, 4, False), _velocity(model, cond, 4, 4, True)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))


def test_zimage_graphed_route_equals_plain():
    from refs import zimage as rz

    from flux_core.torch.zimage import load_zimage
    from flux_core.weights.io import Checkpoint
    from flux_core.weights.zimage import to_native

    ref = rz.build_reference(seed=1)
    net = load_zimage(Checkpoint(to_native(ref.state_dict())))
    model = _loaded("zimage", net)
    caps = [torch.randn(7, net.config.cap_feat_dim, generator=torch.Generator().manual_seed(1))]
    cond = Conditioning("zimage", caps, ["p"])
    plain, fast = _velocity(model, cond, 8, 8, False), _velocity(model, cond, 8, 8, True)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    assert np.isfinite(fast[0].numpy()).all()


def test_qwen3_graphed_route_equals_plain():
    from refs import qwen3 as rq

    from flux_core.torch.qwen3 import load_qwen3
    from flux_core.weights.io import Checkpoint

    hf = rq.tiny_hf_model(seed=0)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    enc = load_qwen3(Checkpoint(sd))
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    plain = enc(ids, mask, output_layers=(3, 6))
    fast = enc.use_cuda_graphs()(ids, mask, output_layers=(3, 6))
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))


def test_klein_rope_table_built_once_per_layout():
    """The RoPE table (float64 on the host, tens of ms at 1024²) is built once per token layout, not per generation."""
    from refs import klein as rk

    from flux_core.torch.klein import load_klein
    from flux_core.weights.klein import to_native

    net = load_klein(to_native(rk.build_reference(seed=0).state_dict()))
    model = _loaded("klein", net)
    built = []
    real = net.make_pe
    net.make_pe = lambda *a: (built.append(1), real(*a))[1]
    emb = torch.randn(1, 512, net.config.context_in_dim, generator=torch.Generator().manual_seed(1))
    first = _velocity(model, Conditioning("klein", emb, ["p"]), 4, 4, False)
    again = _velocity(model, Conditioning("klein", emb * 2, ["q"]), 4, 4, False)
    assert len(built) == 1 and not torch.equal(first[0], again[0])
    _velocity(model, Conditioning("klein", emb, ["p"]), 6, 4, False)  # a new size: a new table
    assert len(built) == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", ["klein", "zimage"])
def test_compiled_blocks_compute_the_eager_function(family):
    """compile_blocks takes the compiled branch of norm_rope (the q / k RMSNorm + RoPE written as one row-wise
    expression for inductor): on the CPU in float32 it must give the eager velocity to round-off, with a reference
    image for klein (its rows get their own RoPE rows) and a padded caption for Z-Image."""
    from flux_core.torch.loaders import compile_blocks

    if family == "klein":
        from refs import klein as rk

        from flux_core.torch.klein import load_klein
        from flux_core.weights.klein import to_native

        net = load_klein(to_native(rk.build_reference(seed=0).state_dict()))
        emb = torch.randn(1, 512, net.config.context_in_dim, generator=torch.Generator().manual_seed(1))
        ref_lat = torch.randn(1, net.config.in_channels, 2, 2, generator=torch.Generator().manual_seed(2))
        cond, h, w = Conditioning("klein", emb, ["p"], [ref_lat]), 4, 4
    else:
        from refs import zimage as rz

        from flux_core.torch.zimage import load_zimage
        from flux_core.weights.io import Checkpoint
        from flux_core.weights.zimage import to_native

        net = load_zimage(Checkpoint(to_native(rz.build_reference(seed=1).state_dict())))
        caps = [torch.randn(7, net.config.cap_feat_dim, generator=torch.Generator().manual_seed(1))]
        cond, h, w = Conditioning("zimage", caps, ["p"]), 8, 8
    model = _loaded(family, net)
    plain = _velocity(model, cond, h, w, False)
    compile_blocks(net)
    fast = _velocity(model, cond, h, w, False)
    for a, b in zip(fast, plain):
        assert float((a - b).norm() / b.norm()) <= 1e-5
