"""MLX Qwen3 text encoder (flux_core/mlx/qwen3.py) vs the torch one (flux_core/torch/qwen3.py, itself equal to HF
transformers to ~1e-6, tests/test_qwen3.py), on the same tiny checkpoints; and the MLX model inside
`flux_core.text.TextEncoder` (klein [B, 512, 3H] with padding, Z-Image real-token rows) vs the torch TextEncoder.

float32: <= 1e-4 relative (max|a-b| / max|b|; measured 3e-7 to 1.4e-6, TextEncoder klein/Z-Image 1.4e-6).
bf16: the two backends round at the same points, but one 1-ulp flip (exp / accumulation order inside torch's fused
attention kernel) starts independent rounding noise that, over 9-27 layers, reaches 2-4e-2 relative for EITHER
backend against float32 (measured hs[9] / hs[27]: MLX 1.9e-2 / 3.7e-2, torch 2.5e-2 / 3.8e-2; MLX vs torch bf16
1.8e-2 / 3.1e-2). So bf16 is checked as "bit-identical weights, and MLX bf16 within 2x of torch bf16's own distance
to the float32 truth"; a 2e-3 bound between the two bf16 runs would need bit-identical kernels.
"""

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
from mlx.utils import tree_flatten  # noqa: E402

from conftest import rel_err  # noqa: E402
from flux_core.errors import ConfigError, WeightError  # noqa: E402
from flux_core.mlx.qwen3 import Qwen3Encoder, load_qwen3  # noqa: E402
from flux_core.text import MAX_LENGTH, EmbeddingCache, QwenTokenizer, TextEncoder  # noqa: E402
from flux_core.torch.qwen3 import load_qwen3 as load_torch  # noqa: E402
from flux_core.weights.io import load_checkpoint  # noqa: E402
from refs import qwen3 as R  # noqa: E402

TOL = 1e-4
LAYERS = (0, 1, 9, 18, 27, -2, -1)  # embeddings, raw layer outputs (klein taps, Z-Image's -2), the normed last
PROMPTS = ["a red fox in the snow, 35mm photo", "", "Ünïcödé façade — 日本の猫 😀\nnew line"]
LONG = "a very long prompt about many things " * 20  # > 512 tokens with the byte-level tiny vocabulary



@pytest.fixture(scope="module")
def hf_model():
    return R.tiny_hf_model(seed=7)


@pytest.fixture(scope="module")
def files(hf_model, tmp_path_factory):
    return {layout: R.save_tiny_qwen3(tmp_path_factory.mktemp(layout), layout, hf_model)
            for layout in ("single", "diffusers", "qwen3model")}


@pytest.fixture(scope="module")
def ckpt(files):
    return load_checkpoint(files["single"])


@pytest.fixture(scope="module")
def torch_model(ckpt):
    return load_torch(ckpt)


@pytest.fixture(scope="module")
def mlx_model(ckpt):
    return load_qwen3(ckpt, "float32")


def _batch(seed=0, B=3, S=48):
    """Random ids; row 0 right-padded (klein's case), row 1 unpadded, row 2 LEFT-padded (rows that see no key)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 261, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 30:] = 0
    mask[2, :5] = 0
    return ids, mask


def _run_torch(model, ids, mask, layers):
    with torch.no_grad():
        return model(ids, mask, output_layers=layers)


def _np(a):
    return np.array(a.astype(mx.float32))


# ---------------------------------------------------------------------------------------------------- model parity
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padded"])
def test_hidden_states_match_torch(torch_model, mlx_model, masked):
    ids, mask = _batch()
    mask = mask if masked else None
    ref = _run_torch(torch_model, ids, mask, LAYERS)
    ours = mlx_model(ids, mask, output_layers=LAYERS)  # torch ids accepted; mx arrays out
    assert all(isinstance(o, mx.array) for o in ours)
    for k, o, r in zip(LAYERS, ours, ref):
        assert o.shape == tuple(r.shape)
        assert rel_err(_np(o), r) <= TOL, k
    if masked:  # the left-padded row's first positions saw no key: attention output zeroed, no NaN
        assert np.isfinite(_np(ours[-1])).all()


def test_gqa_grouping_matches_torch(tmp_path):
    """4 query heads on 2 KV heads: query head h must read KV head h // 2 (the tiny default has one KV head,
    where any grouping is right)."""
    hf = R.tiny_hf_model(seed=3, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    path = R.save_tiny_qwen3(tmp_path, "single", hf)
    ids, mask = _batch(seed=1)
    ref = _run_torch(load_torch(path), ids, mask, (3,))[0]
    ours = load_qwen3(load_checkpoint(path), "float32")(ids.numpy(), mask.numpy(), output_layers=(3,))[0]
    assert rel_err(_np(ours), ref) <= TOL


def test_every_layout_loads_the_same_model(files, mlx_model):
    ids, mask = _batch(seed=2)
    want = _np(mlx_model(ids, mask, output_layers=(-1,))[0])
    for layout in ("diffusers", "qwen3model"):
        got = load_qwen3(files[layout], "float32")(ids, mask, output_layers=(-1,))[0]
        assert np.array_equal(_np(got), want), layout


def test_truncated_model_stops_at_the_last_needed_layer(ckpt, mlx_model):
    model = load_qwen3(ckpt, "float32", max_layers=27)
    assert model.n_built == 27 and len(model.layers) == 27 and model.norm is None
    assert model.config.num_layers == 28  # the checkpoint's count: "-2" still means hidden_states[27]
    ids, mask = _batch(seed=3)
    a = model(ids, mask, output_layers=(9, 18, 27, -2))
    b = mlx_model(ids, mask, output_layers=(9, 18, 27, 27))
    assert all(np.array_equal(_np(x), _np(y)) for x, y in zip(a, b))
    with pytest.raises(ConfigError, match="max_layers >= 28"):
        model(ids, mask, output_layers=(-1,))


def test_strict_loading_names_the_offender(ckpt):
    sd = {k: v for k, v in ckpt.sd.items() if k != "model.layers.3.mlp.up_proj.weight"}
    with pytest.raises(WeightError, match=r"layers\.3\.mlp\.up_proj\.weight"):
        load_qwen3(sd, "float32")


# ------------------------------------------------------------------------------------------------------------ bf16
def test_bfloat16_weights_bit_identical_and_as_accurate_as_torch(ckpt, torch_model):
    tb, mb = load_torch(ckpt, dtype=torch.bfloat16), load_qwen3(ckpt, "bfloat16")
    assert isinstance(mb, Qwen3Encoder) and mb.dtype == mx.bfloat16
    params = dict(tree_flatten(mb.parameters()))
    for key in ("embed_tokens.weight", "layers.5.self_attn.k_norm.weight", "layers.27.mlp.down_proj.weight"):
        theirs = torch_model.state_dict()[key].bfloat16().view(torch.int16).numpy()
        assert np.array_equal(np.array(params[key].view(mx.int16)), theirs), key  # same round-to-nearest-even
    ids, mask = _batch(seed=4)
    layers = (9, 27)
    truth = _run_torch(torch_model, ids, mask, layers)
    theirs = _run_torch(tb, ids, mask, layers)
    ours = mb.hidden_states(ids, mask, output_layers=layers)
    for o, t, f in zip(ours, theirs, truth):
        assert o.dtype == torch.bfloat16
        err_mlx, err_torch = rel_err(o.float(), f), rel_err(t.float(), f)
        assert err_mlx <= 2 * err_torch + 1e-3, (err_mlx, err_torch)


def _bf16_close(ours, theirs, same: float):
    """Every element within one bf16 rounding step of itself (2^-7 relative) plus half a step of the tensor's largest
    value (sums that cancel), and at least `same` of them bit-identical."""
    a, b = np.array(ours.astype(mx.float32)), theirs.float().numpy()
    assert (np.abs(a - b) <= 2.0 ** -7 * np.maximum(np.abs(a), np.abs(b)) + 2.0 ** -8 * np.abs(b).max()).all()
    assert (a == b).mean() >= same, (a == b).mean()


def test_bfloat16_blocks_round_where_torch_rounds(ckpt):
    """Given the same bf16 inputs, each block rounds at torch's points: RMSNorm (float32 statistics, cast, then the
    weight), RoPE (float32 rotation), the MLP (float32 SiLU) agree bit for bit up to accumulation order; attention
    (float32 scores, P rounded to bf16 for P @ V, like torch's flash kernel) differs by isolated 1-ulp flips
    (measured ~96% identical; a float32 SDPA rounded once is only 70% identical)."""
    import torch.nn.functional as F

    from flux_core.mlx.qwen3 import AttnMask, apply_rope, attention, rope_tables
    from flux_core.torch import qwen3 as TQ

    tb, mb = load_torch(ckpt, dtype=torch.bfloat16), load_qwen3(ckpt, "bfloat16")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 48, 32, generator=g).bfloat16()
    with torch.no_grad():
        _bf16_close(mb.layers[0].input_layernorm(mx.array(x.float().numpy()).astype(mx.bfloat16)),
                    tb.layers[0].input_layernorm(x), same=0.999)
        _bf16_close(mb.layers[3].mlp(mx.array(x.float().numpy()).astype(mx.bfloat16)), tb.layers[3].mlp(x), same=0.99)
        q, k, v = (torch.randn(2, h, 48, 16, generator=g).bfloat16() for h in (2, 1, 1))
        _bf16_close(apply_rope(mx.array(q.float().numpy()).astype(mx.bfloat16), rope_tables(48, 16, 1e6)),
                    TQ.apply_rope(q, TQ.rope_tables(48, 16, 1e6, "cpu")), same=0.999)
        ours = attention(*(mx.array(t.float().numpy()).astype(mx.bfloat16) for t in (q, k, v)), 0.25, AttnMask())
        theirs = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                is_causal=True, scale=0.25)
        _bf16_close(ours, theirs, same=0.9)


# ------------------------------------------------------------------------------------------- through TextEncoder
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return QwenTokenizer(R.write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def encoders(torch_model, mlx_model, tokenizer):
    return (TextEncoder(torch_model, tokenizer, "tiny|torch", cache=EmbeddingCache(64)),
            TextEncoder(mlx_model, tokenizer, "tiny|mlx", cache=EmbeddingCache(64)))



@pytest.mark.slow
def test_text_encoder_klein_embeddings(encoders):
    ref_enc, enc = encoders
    ours, ref = enc.encode_klein(PROMPTS + [LONG]), ref_enc.encode_klein(PROMPTS + [LONG])
    assert ours.shape == ref.shape == (4, MAX_LENGTH, 3 * 32)  # pad rows included
    assert rel_err(ours, ref) <= TOL



def test_text_encoder_zimage_embeddings(encoders):
    ref_enc, enc = encoders
    ours, ref = enc.encode_zimage(PROMPTS + [LONG]), ref_enc.encode_zimage(PROMPTS + [LONG])
    assert [tuple(o.shape) for o in ours] == [tuple(r.shape) for r in ref]
    assert ours[-1].shape[0] == MAX_LENGTH  # truncated like the pipeline
    assert max(rel_err(o, r) for o, r in zip(ours, ref)) <= TOL
