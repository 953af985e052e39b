"""Whole klein generation on a GPU: flux_core's pipeline beside diffusers' Flux2KleinPipeline, same random bf16 weights.

    python bench/bench_pipeline.py --size 1024 --out DIR        (GPU; the diffusers wheel on PYTHONPATH)
    python bench/bench_pipeline.py --tiny                       (CPU smoke test)

Both run text encoding (512 tokens), 4 denoising steps and the VAE decode at the given size from the same weights
(drawn once in the diffusers/transformers layout, converted to ours by our key maps) and the same tokenizer (the
byte-level one of the demo, so the token count is real: the template plus the prompt, padded to 512). Times are
wall-clock with CUDA syncs, median of --reps generations after one warm-up; our per-stage split comes from the
sampler's callback. The output latents of the two are compared as a sanity check.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

P = argparse.ArgumentParser()
P.add_argument("--size", type=int, default=1024)
P.add_argument("--steps", type=int, default=4)
P.add_argument("--reps", type=int, default=5)
P.add_argument("--tiny", action="store_true")
P.add_argument("--quantization", default="none", help="ours: none | int8 | int4 | fp8 (transformer and text encoder)")
P.add_argument("--compile", action="store_true", help="ours with regional torch.compile (models.load_transformer(compile=True))")
P.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
A = P.parse_args()
DEV = torch.device("cuda" if torch.cuda.is_available() and not A.tiny else "cpu")
DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32
PROMPT = "a red fox sitting in fresh snow at golden hour, 35mm photograph, shallow depth of field"


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def random_like(model, seed):
    from summary_models import random_like as draw

    return draw(model, seed, DEV, DT)


def build():
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from refs import qwen3 as rq
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if A.tiny:
        tcfg = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                    num_attention_heads=4, joint_attention_dim=96, axes_dims_rope=(4, 4, 4, 4))
        qcfg = dict(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=28,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16)
        vcfg = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    else:
        tcfg = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=7680, axes_dims_rope=(32, 32, 32, 32))
        qcfg = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128)
        vcfg = {}
    with torch.device("meta"):
        tr = Flux2Transformer2DModel(timestep_guidance_channels=256, mlp_ratio=3.0, rope_theta=2000, eps=1e-6,
                                     guidance_embeds=False, **tcfg)
        vae = AutoencoderKLFlux2(**vcfg)
    tr_sd, vae_sd = random_like(tr, 1), random_like(vae, 2)
    tr.load_state_dict(tr_sd, assign=True)
    vae.load_state_dict(vae_sd, assign=True)
    with torch.device(DEV):
        te = Qwen3ForCausalLM(Qwen3Config(rope_theta=1e6, tie_word_embeddings=True, **qcfg)).to(DT)
    te_sd = {k: v for k, v in random_like(te, 3).items() if k != "lm_head.weight"}
    te.load_state_dict(te_sd, strict=False)
    te.tie_weights()
    return (tr.eval(), vae.eval(), te.eval(), rq.tiny_hf_tokenizer()), (tr_sd, vae_sd, te_sd, qcfg, vcfg)


def ours_models(sds, tok_dir):
    from flux_core.models import LoadedModel
    from flux_core.text import QwenTokenizer, TextEncoder
    from flux_core.torch.klein import load_klein
    from flux_core.torch.qwen3 import load_qwen3
    from flux_core.torch.vae import load_vae
    from flux_core.families import FAMILIES
    from flux_core.weights.io import Checkpoint
    from flux_core.weights.klein import to_native as klein_native
    from flux_core.weights.vae import to_native as vae_native

    tr_sd, vae_sd, te_sd, qcfg, vcfg = sds
    dt = "bfloat16" if DT == torch.bfloat16 else "float32"
    dev = str(DEV)
    tr = load_klein(klein_native(tr_sd), dtype=DT, device=DEV)
    te = TextEncoder(load_qwen3(Checkpoint(te_sd), dtype=DT, device=DEV, max_layers=27).eval(),
                     QwenTokenizer(tok_dir), source_id="bench")
    vae = load_vae(Checkpoint(vae_native(vae_sd), config=dict(vcfg) or None), dtype=DT, device=DEV)
    return (LoadedModel("transformer", tr, "bench", "torch", dev, dt, variant=FAMILIES["klein"].variant(True, tr.config)),
            LoadedModel("text_encoder", te, "bench", "torch", dev, dt),
            LoadedModel("vae", vae, "bench", "torch", dev, dt))


def main():
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    from flux_core import pipeline
    from flux_core.demo import write_byte_tokenizer
    from flux_core.text import clear_embedding_cache

    os.makedirs(A.out, exist_ok=True)
    refs, sds = build()
    tok_dir = write_byte_tokenizer(Path(tempfile.mkdtemp()) / "tok")
    tr, te, vae = ours_models(sds, tok_dir)
    if A.quantization != "none":
        from flux_core.backend import Choice, quantize

        for m in (tr.module, te.module.model):
            quantize(Choice("torch", str(DEV), "bench"), m, A.quantization)
    if A.compile:
        from flux_core.backend import Choice, compile_blocks

        tr.notes.append(compile_blocks(tr.module, Choice("torch", str(DEV), "bench")))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096,
                                            time_shift_type="exponential")
    pipe = Flux2KleinPipeline(scheduler=sched, vae=refs[1], text_encoder=refs[2], tokenizer=refs[3],
                              transformer=refs[0], is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    size = 64 if A.tiny else A.size
    h = w = size // 16
    noise = pipeline.make_noise(0, 1, tr.module.config.in_channels, h, w)

    def run_diffusers():
        sync()
        t = time.perf_counter()
        img = pipe(prompt=PROMPT, height=size, width=size, num_inference_steps=A.steps, guidance_scale=1.0, latents=noise.to(DEV, DT),
                   output_type="pt").images
        sync()
        return time.perf_counter() - t, img

    def run_ours():
        clear_embedding_cache()  # time the encoder every time, as diffusers does
        stamps = {}
        sync()
        t0 = time.perf_counter()
        cond = pipeline.encode_prompt(te, [PROMPT], "klein")
        sync()
        stamps["encode"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = pipeline.sample(tr, cond, width=size, height=size, steps=A.steps, noise=noise)
        sync()
        stamps["denoise"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        img = pipeline.decode(vae, res.latent)
        sync()
        stamps["decode"] = time.perf_counter() - t2
        return time.perf_counter() - t0, stamps, img

    with torch.inference_mode():
        t = time.perf_counter()
        run_diffusers(), run_ours()  # warm-up (and, with --compile, the compilation)
        warm = time.perf_counter() - t
        d_times, o_times, splits = [], [], []
        for _ in range(A.reps):
            d_times.append(run_diffusers()[0])
            t, st, img_ours = run_ours()
            o_times.append(t)
            splits.append(st)
        _, img_ref = run_diffusers()
    ref_np = img_ref[0].float().permute(1, 2, 0).cpu().numpy()
    diff = float(abs(ref_np - img_ours[0]).max())
    row = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "size": size, "steps": A.steps,
           "dtype": str(DT), "diffusers_s": statistics.median(d_times), "ours_s": statistics.median(o_times),
           "ours_split_s": {k: statistics.median(s[k] for s in splits) for k in splits[0]},
           "max_pixel_diff_vs_diffusers": diff,
           "compiled": A.compile, "quantization": A.quantization, "warmup_s": warm,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if DEV.type == "cuda" else None}
    print(json.dumps(row), flush=True)
    with open(os.path.join(A.out, f"pipeline_klein_{size}{'_compiled' if A.compile else ''}_{A.quantization}.json"), "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
