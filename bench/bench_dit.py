"""Full-size DiT step timing: flux_core's transformer beside diffusers', same random bf16 weights, same inputs, one run.

    python bench/bench_dit.py --model klein --sizes 1024,512 --out DIR      (on a GPU; see bench/run_gpu.sh)
    python bench/bench_dit.py --model klein --tiny                          (CPU smoke test at toy sizes)

Method (as docs/PERF.md): bf16 weights drawn N(0, 0.02) (1-D norm scales N(1, 0.02)); never zeros.
The weights are drawn once in the diffusers layout and converted to ours with our key map, so both models compute the
same function; the relative difference of the outputs is printed as a sanity check. torch.inference_mode, batch 1,
CUDA events, warm-up calls, then the median of --reps calls. "ours" passes the RoPE table it builds once per
generation (as our sampler does); "ours+pe" rebuilds it every call, as diffusers does, for a like-for-like number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import median_ms  # noqa: E402  (bench/ is sys.path[0] when a bench script runs)

P = argparse.ArgumentParser()
P.add_argument("--model", choices=["klein", "zimage", "qwen3", "vae"], default="klein")
P.add_argument("--sizes", default="1024,512")
P.add_argument("--ref", action="store_true", help="klein: also time 1024² with one 1024² reference image")
P.add_argument("--reps", type=int, default=15)
P.add_argument("--warmup", type=int, default=3)
P.add_argument("--compile", action="store_true", help="also time torch.compile(ours) (regional: each block)")
P.add_argument("--tiny", action="store_true")
P.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
P.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
A = P.parse_args()

DEV = torch.device("cuda" if torch.cuda.is_available() and not A.tiny else "cpu")
DT = getattr(torch, A.dtype) if DEV.type == "cuda" else torch.float32
T0 = time.time()
ROWS = []


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def random_like(model, seed=0):
    g = torch.Generator(DEV).manual_seed(seed)
    sd = {}
    for k, p in model.state_dict().items():
        if p.dim() == 1 and ("norm" in k or k.endswith("scale")):
            t = 1 + 0.02 * torch.randn(p.shape, generator=g, device=DEV)
        else:
            t = 0.02 * torch.randn(p.shape, generator=g, device=DEV)
        sd[k] = t.to(DT)
    return sd


def timeit(fn):
    return median_ms(fn, A.reps, DEV.type == "cuda", A.warmup, cpu_reps=max(3, A.reps // 5))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def klein_models():
    from diffusers import Flux2Transformer2DModel

    from flux_core.torch.klein import load_klein
    from flux_core.weights.klein import to_native

    cfg = (dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=4, joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4)) if A.tiny else
           dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=7680, axes_dims_rope=(32, 32, 32, 32)))
    with torch.device("meta"):
        ref = Flux2Transformer2DModel(timestep_guidance_channels=256, mlp_ratio=3.0, rope_theta=2000, eps=1e-6,
                                      guidance_embeds=False, **cfg)
    sd = random_like(ref)
    ref.load_state_dict(sd, assign=True)
    ref.eval()
    ours = load_klein(to_native(sd), dtype=DT, device=DEV).eval()
    return ref, ours, cfg


def bench_klein():
    from flux_core.torch.klein import position_ids, text_ids

    ref, ours, cfg = klein_models()
    log("params ours", sum(p.numel() for p in ours.parameters()) / 1e9, "B")
    sizes = [int(s) for s in A.sizes.split(",")]
    cases = [(s, 0) for s in sizes] + ([(sizes[0], 1)] if A.ref else [])
    for size, nref in cases:
        if A.tiny:
            size = size // 16
        h = w = size // 16
        ids = [position_ids(h, w)] + [position_ids(h, w, t=10 * (i + 1)) for i in range(nref)]
        img_ids = torch.cat(ids).to(DEV)
        n = img_ids.shape[0]
        g = torch.Generator(DEV).manual_seed(1)
        x = torch.randn(1, n, cfg["in_channels"], generator=g, device=DEV).to(DT)
        txt = torch.randn(1, 512, cfg["joint_attention_dim"], generator=g, device=DEV).to(DT)
        tids = text_ids(512).to(DEV)
        sigma = torch.tensor([0.9], device=DEV)
        with torch.inference_mode():
            pe = ours.make_pe(img_ids[None], tids[None])
            f_ref = lambda: ref(hidden_states=x, encoder_hidden_states=txt, timestep=sigma.to(DT), img_ids=img_ids,
                                txt_ids=tids, guidance=None, return_dict=False)[0]
            f_ours = lambda: ours(x, img_ids[None], txt, tids[None], sigma, pe=pe)
            f_ours_pe = lambda: ours(x, img_ids[None], txt, tids[None], sigma)
            diff = rel(f_ours(), f_ref())
            row = {"model": "klein-4b", "size": size, "refs": nref, "tokens": n + 512,
                   "diffusers_ms": timeit(f_ref), "ours_ms": timeit(f_ours), "ours_with_rope_ms": timeit(f_ours_pe),
                   "rel_diff_vs_diffusers": diff}
            if A.compile:
                comp = torch.compile(ours)
                f_c = lambda: comp(x, img_ids[None], txt, tids[None], sigma, pe=pe)
                t = time.time()
                f_c()
                row["compile_s"] = time.time() - t
                row["ours_compiled_ms"] = timeit(f_c)
                row["rel_diff_compiled"] = rel(f_c(), f_ref())
        if DEV.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        ROWS.append(row)
        log(json.dumps(row))


def zimage_models():
    from diffusers import ZImageTransformer2DModel

    from flux_core.torch.zimage import load_zimage
    from flux_core.weights.io import Checkpoint
    from flux_core.weights.zimage import to_native

    cfg = (dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12])
           if A.tiny else
           dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                axes_dims=[32, 48, 48]))
    with torch.device("meta"):
        ref = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, norm_eps=1e-5,
                                       qk_norm=True, rope_theta=256.0, t_scale=1000.0, axes_lens=[1536, 512, 512], **cfg)
    sd = random_like(ref)
    ref.load_state_dict(sd, assign=True)
    ref.eval()
    ours = load_zimage(Checkpoint(to_native(sd)), dtype=DT, device=DEV).eval()
    return ref, ours, cfg


def bench_zimage():
    ref, ours, cfg = zimage_models()
    log("params ours", sum(p.numel() for p in ours.parameters()) / 1e9, "B")
    for size in [int(s) for s in A.sizes.split(",")]:
        if A.tiny:
            size = size // 16
        g = torch.Generator(DEV).manual_seed(1)
        x = torch.randn(1, 16, size // 8, size // 8, generator=g, device=DEV).to(DT)
        cap = torch.randn(512, cfg["cap_feat_dim"], generator=g, device=DEV).to(DT)
        t = torch.tensor([0.1], device=DEV)
        with torch.inference_mode():
            rope = ours.make_rope([512], x.shape[-2], x.shape[-1], device=DEV)
            f_ref = lambda: ref([x[0][:, None]], t.to(DT), [cap], return_dict=False)[0][0]
            f_ours = lambda: ours(x, t, [cap], rope_cache=rope)
            f_ours_pe = lambda: ours(x, t, [cap])
            diff = rel(f_ours()[0], f_ref()[:, 0])
            row = {"model": "zimage-turbo", "size": size, "tokens": (size // 16) ** 2 + 512,
                   "diffusers_ms": timeit(f_ref), "ours_ms": timeit(f_ours), "ours_with_rope_ms": timeit(f_ours_pe),
                   "rel_diff_vs_diffusers": diff}
            if A.compile:
                comp = torch.compile(ours)
                f_c = lambda: comp(x, t, [cap], rope_cache=rope)
                t0 = time.time()
                f_c()
                row["compile_s"] = time.time() - t0
                row["ours_compiled_ms"] = timeit(f_c)
        if DEV.type == "cuda":
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        ROWS.append(row)
        log(json.dumps(row))


def bench_qwen3():
    """Qwen3-4B encoder, 512 tokens (64 real + 448 pad): transformers' full forward with output_hidden_states (as the
    klein pipeline calls it) beside ours, which stops after the deepest needed layer (27 klein, 35 both)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flux_core.torch.qwen3 import load_qwen3
    from flux_core.weights.io import Checkpoint

    cfg = (dict(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16) if A.tiny else
           dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128))
    with torch.device(DEV):  # not meta: the rotary inv_freq buffer is computed at construction
        ref = Qwen3ForCausalLM(Qwen3Config(rope_theta=1e6, tie_word_embeddings=True, **cfg)).to(DT)
    sd = {k: v for k, v in random_like(ref).items() if k != "lm_head.weight"}
    ref.load_state_dict(sd, strict=False)
    ref.tie_weights()
    ref.eval()
    n = cfg["num_hidden_layers"]
    g = torch.Generator(DEV).manual_seed(1)
    ids = torch.randint(0, 200, (1, 512), generator=g, device=DEV)
    mask = torch.zeros(1, 512, dtype=torch.long, device=DEV)
    mask[:, :64] = 1
    with torch.inference_mode():
        f_ref = lambda: ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        want = f_ref()
        for tag, layers in (("klein (27 layers)", (9, 18, 27)), ("klein+zimage (35 layers)", (9, 18, 27, n - 1))):
            ours = load_qwen3(Checkpoint(sd), dtype=DT, device=DEV, max_layers=max(layers)).eval()
            f_ours = lambda: ours(ids, mask, output_layers=layers)
            got = f_ours()
            diff = max(rel(a, want[k]) for a, k in zip(got, layers))
            row = {"model": "qwen3-4b", "case": tag, "tokens": 512, "transformers_ms": timeit(f_ref),
                   "ours_ms": timeit(f_ours), "rel_diff_vs_transformers": diff}
            ROWS.append(row)
            log(json.dumps(row))


def bench_vae():
    """VAE decode at 1024² (and FLUX.2 encode): diffusers AutoencoderKLFlux2 beside ours, same weights."""
    from diffusers import AutoencoderKLFlux2

    from flux_core.torch.vae import load_vae
    from flux_core.weights.io import Checkpoint
    from flux_core.weights.vae import to_native

    kw = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4) if A.tiny else {}
    with torch.device("meta"):
        ref = AutoencoderKLFlux2(**kw)
    sd = random_like(ref)
    sd = {k: (v.abs() + 0.5 if k.endswith("running_var") else v) for k, v in sd.items()}
    sd = {k: (v.float() if k.startswith("bn.") else v) for k, v in sd.items()}
    ref.load_state_dict(sd, assign=True)
    ref.eval()
    ours = load_vae(Checkpoint(to_native(sd), config={"norm_num_groups": 4} if A.tiny else None), dtype=DT, device=DEV)
    size = 64 if A.tiny else 1024
    g = torch.Generator(DEV).manual_seed(1)
    z = torch.randn(1, ref.config.latent_channels, size // 8, size // 8, generator=g, device=DEV).to(DT)
    img = torch.rand(1, 3, size, size, generator=g, device=DEV).to(DT)
    with torch.inference_mode():
        f_ref = lambda: ref.decode(z, return_dict=False)[0]
        f_ours = lambda: ours.decoder(z)
        row = {"model": "flux2-vae", "case": f"decode {size}²", "diffusers_ms": timeit(f_ref), "ours_ms": timeit(f_ours),
               "rel_diff_vs_diffusers": rel(f_ours(), f_ref())}
        ROWS.append(row)
        log(json.dumps(row))
        f_ref_e = lambda: ref.encode(img * 2 - 1).latent_dist.mode()
        f_ours_e = lambda: ours.encode(img)
        row = {"model": "flux2-vae", "case": f"encode {size}²", "diffusers_ms": timeit(f_ref_e),
               "ours_ms": timeit(f_ours_e)}
        ROWS.append(row)
        log(json.dumps(row))


def main():
    os.makedirs(A.out, exist_ok=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu",
           "dtype": str(DT)}
    log(json.dumps(env))
    try:
        {"klein": bench_klein, "zimage": bench_zimage, "qwen3": bench_qwen3, "vae": bench_vae}[A.model]()
    finally:
        with open(os.path.join(A.out, f"dit_{A.model}.json"), "w") as f:
            json.dump({"env": env, "rows": ROWS}, f, indent=1)


if __name__ == "__main__":
    main()
