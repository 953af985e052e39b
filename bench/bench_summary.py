"""One GPU call -> `summary.json` (the schema of issue 12): every workload of ours beside its peer, in the same call.

    python bench/bench_summary.py --out DIR                    (GPU; the diffusers wheel on PYTHONPATH, run_summary.sh)
    python bench/bench_summary.py --tiny --out DIR             (CPU smoke test at toy sizes: no compile, no timing value)
    python bench/bench_summary.py --parts klein_image,zimage_image --merge OLD/parts.json --out DIR

The driver runs each part in a FRESH process (a timeout per part, a budget for all), collects what each part wrote
(even a part that timed out keeps what it measured before) into DIR/parts.json and writes DIR/summary.json:
  klein_step    klein-4B DiT step at 1024² (4096 + 512 tokens): diffusers eager, diffusers compiled
                (`transformer.compile_repeated_blocks(fullgraph=True)`), ours eager and compiled variants; + one 1024²
                reference (8192 + 512); fp8 and int8 weights compiled.
  zimage_step   Z-Image-Turbo DiT step at 1024² (4096 + 512-token caption), same peers.
  qwen3_vae     Qwen3-4B at 512 tokens (64 real) vs transformers; FLUX.2 VAE decode at 1024² vs diffusers.
  klein_image   whole klein-4B image (512-token encode, 4 steps, decode) in --image-procs fresh processes; the
                first also times diffusers' Flux2KleinPipeline with the compiled transformer.
  zimage_image  whole Z-Image-Turbo image (8 steps), ours and diffusers' ZImagePipeline compiled, one process.
  zimage        zimage_step then zimage_image in one process (the default: saves a model build and a compile).
"ours" everywhere is what `compile=True` ships (models.load_transformer / load_vae, the CLI's --compile): regional
torch.compile of the DiT blocks with attention outside the compiled regions, each sampler step replayed from a CUDA
graph; the Qwen3 encoder replayed from a CUDA graph; the VAE decoder compiled channels-last. Other variants are
recorded beside it (`*_variants`), never substituted for it.

Method: bf16 weights N(0, 0.02) (1-D norm scales N(1, 0.02)), drawn once in the peer's layout and converted by our
key maps, so both compute the same function; CUDA events, warm-up calls, median of --reps; static shapes for both
sides' compiles (`automatic_dynamic_shapes=False`). Every fast path is compared with our plain eager path (relative L2
of the outputs, NaN check) and printed, with the peer's own compiled-vs-eager difference as the yardstick.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from summary_report import merge_mlx, summarize  # noqa: E402

PARTS = ("klein_step", "qwen3_vae", "klein_image", "zimage", "zimage_image")
LIMITS = {"klein_step": 240, "zimage_step": 150, "qwen3_vae": 150, "klein_image": 150, "zimage_image": 200,
          "zimage": 260, "comfy_native": 420}
PROMPT = "a red fox sitting in fresh snow at golden hour, 35mm photograph, shallow depth of field"

P = argparse.ArgumentParser()
P.add_argument("--parts", default=",".join(PARTS))
P.add_argument("--part", help="(internal) run one part in this process")
P.add_argument("--proc", type=int, default=0, help="(internal) index of this image process")
P.add_argument("--image-procs", type=int, default=3)
P.add_argument("--reps", type=int, default=10)
P.add_argument("--image-reps", type=int, default=4)
P.add_argument("--budget", type=float, default=600.0, help="seconds for all parts together")
P.add_argument("--merge", nargs="*", default=[],
               help="earlier parts.json files, each optionally FILE:part,part (only those parts): workloads not run "
                    "now come from them, a later file's part replacing an earlier one's")
P.add_argument("--mlx", nargs="*", default=[],
               help="mlx_cuda.json files from bench/run_mlx_cuda.sh (the MLX-CUDA workload, its own calls): each "
                    "family's MLX and torch figures come from the last file that has both")
P.add_argument("--tiny", action="store_true")
P.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
A = P.parse_args()
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ============================================================================================== driver

def driver():
    os.makedirs(A.out, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fc_summary_"))
    results = {}
    for old in A.merge:
        path, _, pick = old.partition(":")
        parts = json.loads(Path(path).read_text()).get("parts", {})
        for k, runs in parts.items():
            if not pick or k in pick.split(","):
                results[k] = [dict(r, call=r.get("call") or Path(path).parent.name) for r in runs]
    if A.mlx:
        results["mlx_cuda"] = [merge_mlx([(Path(f).parent.name, json.loads(Path(f).read_text())) for f in A.mlx])]
    for part in [p for p in A.parts.split(",") if p]:
        procs = A.image_procs if part in ("klein_image", "zimage_image") else 1
        first = 1 if part == "zimage_image" and "zimage" in A.parts.split(",") else 0  # `zimage` ran process 0
        runs = []
        for i in range(first, procs):
            left = A.budget - (time.time() - T0)
            if left < 30:
                log(f"{part}[{i}]: skipped, {left:.0f} s of the budget left")
                break
            path = work / f"{part}_{i}.json"
            cmd = [sys.executable, __file__, "--part", part, "--proc", str(i), "--out", str(path),
                   "--reps", str(A.reps), "--image-reps", str(A.image_reps)] + (["--tiny"] if A.tiny else [])
            limit = min(LIMITS[part], left)
            log(f"{part}[{i}]: start (limit {limit:.0f} s)")
            try:
                subprocess.run(cmd, timeout=limit, check=False)
            except subprocess.TimeoutExpired:
                log(f"{part}[{i}]: TIMEOUT after {limit:.0f} s (kept what it wrote)")
            if path.exists():
                runs.append(json.loads(path.read_text()))
        if runs:
            results[part] = runs
    env = next((r["env"] for runs in results.values() for r in runs if r.get("env")), {})
    (Path(A.out) / "parts.json").write_text(json.dumps({"env": env, "parts": results}, indent=1))
    summary = summarize(results, env)
    (Path(A.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


def _env():
    cuda = DEV.type == "cuda"
    return {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M")}


# ============================================================================================== parts

if A.part:
    import torch

    DEV = torch.device("cuda" if torch.cuda.is_available() and not A.tiny else "cpu")
    DT = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    COMPILE = DEV.type == "cuda"  # on the CPU smoke test the compiled paths are skipped (minutes of C++ builds)
    if COMPILE:
        import torch._dynamo as dynamo

        dynamo.config.automatic_dynamic_shapes = False  # both sides: one static graph per shape (as docs/PERF.md)
        dynamo.config.cache_size_limit = 64
        if hasattr(dynamo.config, "recompile_limit"):
            dynamo.config.recompile_limit = 64
    REC = {"checks": [], "notes": [], "variants": {}}
    import summary_models
    from summary_models import build_klein, build_qwen3, build_vae, build_zimage, klein_cfg, size, zimage_cfg

    summary_models.configure(DEV, DT, A.tiny)


def save():
    REC["wall_s"] = round(time.time() - T0, 1)
    Path(A.out).write_text(json.dumps(REC, indent=1))


def put(key, value):
    REC[key] = value
    log(key, "=", value)
    save()


def variant(key, value):
    REC["variants"][key] = value
    log("variant", key, "=", value)
    save()


def check(what, a, b):
    """Relative L2 difference of two outputs, and whether `a` is finite (nothing to compare with: None)."""
    if b is None:
        return None
    d = float((a.float() - b.float()).norm() / b.float().norm())
    finite = bool(torch.isfinite(a.float()).all())
    REC["checks"].append({"what": what, "rel_l2": d, "finite": finite})
    log(f"CHECK {what}: rel {d:.3e} finite {finite}")
    save()
    return d


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, reps=None, warmup=3):
    from timing import median_ms

    return median_ms(fn, reps or A.reps, DEV.type == "cuda", warmup)


def timed_first(fn):
    sync()
    t = time.time()
    out = fn()
    sync()
    return out, round(time.time() - t, 1)


def fp32_reference(build, run):
    """The output of the same weights in float32 (tf32 off): the yardstick for 'fast vs plain' -- with random
    weights, bf16 round-off alone moves a deep stack's output by percents, so the question is whether the fast path
    is further from float32 than the plain bf16 path is. The float32 model is freed before returning."""
    if DT == torch.float32:
        return None
    model = build()
    with torch.inference_mode():
        out = run(model).float()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def graphed(fn, *static_args):
    """A CudaGraphCache of fn over the given tensors (what the sampler does with a compiled step)."""
    from flux_core.torch.graphs import CudaGraphCache

    cache = CudaGraphCache(fn, name="bench step", max_entries=1)
    return (lambda: cache(*static_args)), cache



# ---------------------------------------------------------------------------------------------- klein step

def fast_beside_peer(label, graphed_step, plain, exact, ref, f_ref, ref_eager):
    """Our shipped step (compiled + CUDA graph) timed, then the diffusers transformer compiled
    (`compile_repeated_blocks(fullgraph=True)`) and timed; both checked against our eager output and float32."""
    f_fast, cache = graphed_step
    put("ours_ms", timeit(f_fast))
    variant("graph_replays", cache.replays)
    variant("graph_failed", cache.failed)
    fast = f_fast()
    check(f"{label} ours fast (compiled + graph) vs ours eager", fast, plain)
    check(f"{label} ours fast (compiled + graph) vs float32", fast, exact)
    with torch.inference_mode():
        ref.compile_repeated_blocks(fullgraph=True)
        out, t = timed_first(f_ref)
        variant("diffusers_compile_s", t)
        check(f"{label} diffusers compiled vs diffusers eager (yardstick)", out, ref_eager)
        check(f"{label} diffusers compiled vs float32", out, exact)
        put("diffusers_compiled_ms", timeit(f_ref))


def klein_inputs(cfg, nref):
    from flux_core.torch.klein import position_ids, text_ids

    h = w = size() // 16
    ids = torch.cat([position_ids(h, w)] + [position_ids(h, w, t=10 * (i + 1)) for i in range(nref)]).to(DEV)
    g = torch.Generator(DEV).manual_seed(1)
    x = torch.randn(1, ids.shape[0], cfg["in_channels"], generator=g, device=DEV).to(DT)
    txt = torch.randn(1, 512, cfg["joint_attention_dim"], generator=g, device=DEV).to(DT)
    return x, ids, txt, text_ids(512).to(DEV), torch.tensor([0.9], device=DEV)


def without_kernels(fn):
    """fn() with the eager path's Triton kernel off (flux_core/torch/kernels.py): the torch ops it replaces."""
    from flux_core.torch import kernels

    with kernels.disabled():
        return fn()


def torch_ops_eager(name, f_ours, plain, ref_eager):
    """Our eager step on the torch ops instead of the Triton kernel, in the same process: what the kernel buys, and
    that both compute the same function (the torch ops are what diffusers runs)."""
    from flux_core.torch import kernels

    if not (kernels.triton is not None and DEV.type == "cuda"):
        return
    ops = without_kernels(f_ours)
    check(f"{name} ours eager, Triton kernel vs torch ops", plain, ops)
    check(f"{name} ours eager on torch ops vs diffusers eager", ops, ref_eager)
    variant("ours_eager_torch_ops_ms", without_kernels(lambda: timeit(f_ours)))


def part_klein_step():
    from flux_core.torch import common, quant
    from flux_core.torch.klein import load_klein
    from flux_core.torch.loaders import compile_blocks
    from flux_core.weights.klein import to_native

    ref, ours, sd = build_klein()
    cfg = klein_cfg()
    x, ids, txt, tids, sig = klein_inputs(cfg, 0)
    pe = ours.make_pe(ids[None], tids[None])
    f_ref = lambda: ref(hidden_states=x, encoder_hidden_states=txt, timestep=sig.to(DT), img_ids=ids, txt_ids=tids,
                        guidance=None, return_dict=False)[0]
    step = lambda x_, s_: ours(x_, ids[None], txt, tids[None], s_, pe=pe)
    f_ours = lambda: step(x, sig)
    plain, ref_eager = f_ours(), f_ref()
    check("klein ours eager vs diffusers eager", plain, ref_eager)
    exact = fp32_reference(lambda: load_klein(to_native(sd), dtype=torch.float32, device=DEV).eval(),
                           lambda m: m(x, ids[None], txt, tids[None], sig, pe=pe))
    check("klein ours eager (bf16) vs the same weights in float32 (what bf16 itself costs)", plain, exact)
    put("diffusers_eager_ms", timeit(f_ref))
    variant("ours_eager_ms", timeit(f_ours))
    torch_ops_eager("klein", f_ours, plain, ref_eager)
    if not COMPILE:
        REC["notes"].append("tiny CPU run: compiled variants skipped")
        f_fast, cache = graphed(step, x, sig)
        check("klein graph wrapper (plain on CPU) vs eager", (f_fast(), f_fast())[1], plain)
        return
    compile_blocks(ours)
    common.EAGER_ATTENTION = False
    out, t = timed_first(f_ours)
    variant("compile_s", t)
    variant("ours_compiled_attention_inside_ms", timeit(f_ours))
    common.EAGER_ATTENTION = True
    out, t = timed_first(f_ours)
    variant("compile_attention_outside_s", t)
    variant("ours_compiled_attention_outside_ms", timeit(f_ours))
    fast_beside_peer("klein", graphed(step, x, sig), plain, exact, ref, f_ref, ref_eager)
    with torch.inference_mode():
        # + one 1024² reference image (8192 + 512 tokens)
        x1, ids1, _, _, _ = klein_inputs(cfg, 1)
        pe1 = ours.make_pe(ids1[None], tids[None])
        f_fast1, _ = graphed(lambda x_, s_: ours(x_, ids1[None], txt, tids[None], s_, pe=pe1), x1, sig)
        put("ref_ours_ms", timeit(f_fast1))
        put("ref_diffusers_compiled_ms", timeit(lambda: ref(hidden_states=x1, encoder_hidden_states=txt,
                                                            timestep=sig.to(DT), img_ids=ids1, txt_ids=tids,
                                                            guidance=None, return_dict=False)[0]))
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    for mode in ("fp8", "int8"):
        if mode == "int8":
            del ours
            gc.collect()
            ours = load_klein(to_native(sd), dtype=DT, device=DEV).eval()
            compile_blocks(ours)
        quant.quantize_model(ours, mode)
        f_q, cache = graphed(lambda x_, s_: ours(x_, ids[None], txt, tids[None], s_, pe=pe), x, sig)
        out, t = timed_first(f_q)
        variant(f"{mode}_compile_s", t)
        put(f"ours_{mode}_ms", timeit(f_q))
        check(f"klein {mode} compiled + graph vs bf16 eager", f_q(), plain)


# ---------------------------------------------------------------------------------------------- Z-Image step

def part_zimage_step():
    from flux_core.torch.loaders import compile_blocks

    ref, ours = build_zimage()
    cfg = zimage_cfg()
    s = size()
    g = torch.Generator(DEV).manual_seed(1)
    x = torch.randn(1, 16, s // 8, s // 8, generator=g, device=DEV).to(DT)
    cap = torch.randn(512, cfg["cap_feat_dim"], generator=g, device=DEV).to(DT)
    t = torch.tensor([0.1], device=DEV)
    rope = ours.make_rope([512], x.shape[-2], x.shape[-1], device=DEV)
    f_ref = lambda: ref([x[0][:, None]], t.to(DT), [cap], return_dict=False)[0][0][:, 0]
    step = lambda x_, t_: ours(x_, t_, [cap], rope_cache=rope)[0]
    f_ours = lambda: step(x, t)
    with torch.inference_mode():
        plain, ref_eager = f_ours(), f_ref()
        check("zimage ours eager vs diffusers eager", plain, ref_eager)
        exact = fp32_reference(lambda: copy.deepcopy(ours).float(), lambda m: m(x, t, [cap], rope_cache=rope)[0])
        check("zimage ours eager (bf16) vs the same weights in float32", plain, exact)
        put("diffusers_eager_ms", timeit(f_ref))
        variant("ours_eager_ms", timeit(f_ours))
        torch_ops_eager("zimage", f_ours, plain, ref_eager)
    if not COMPILE:
        REC["notes"].append("tiny CPU run: compiled variants skipped")
        return
    compile_blocks(ours)
    out, tc = timed_first(f_ours)
    variant("compile_s", tc)
    variant("ours_compiled_ms", timeit(f_ours))
    fast_beside_peer("zimage", graphed(step, x, t), plain, exact, ref, f_ref, ref_eager)


# ---------------------------------------------------------------------------------------------- Qwen3 + VAE

def part_qwen3_vae():
    from flux_core.torch.loaders import compile_text_encoder, compile_vae
    from flux_core.torch.qwen3 import load_qwen3
    from flux_core.weights.io import Checkpoint

    ref, sd = build_qwen3()
    g = torch.Generator(DEV).manual_seed(1)
    ids = torch.randint(0, 200, (1, 512), generator=g, device=DEV)
    mask = torch.zeros(1, 512, dtype=torch.long, device=DEV)
    mask[:, :64] = 1
    layers = (9, 18, 27)
    with torch.inference_mode():
        f_ref = lambda: ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        want = f_ref()
        put("qwen3_transformers_ms", timeit(f_ref))
        ours = load_qwen3(Checkpoint(sd), dtype=DT, device=DEV, max_layers=27).eval()
        f_plain = lambda: ours(ids, mask, output_layers=layers)
        plain = f_plain()
        check("qwen3 ours plain vs transformers (layer 27)", plain[-1], want[27])
        variant("qwen3_ours_plain_ms", timeit(f_plain))
        exact = fp32_reference(lambda: load_qwen3(Checkpoint(sd), dtype=torch.float32, device=DEV, max_layers=27),
                               lambda m: m(ids, mask, output_layers=layers)[-1])
        check("qwen3 ours plain (bf16) vs float32 (layer 27)", plain[-1], exact)
        check("qwen3 transformers (bf16) vs float32 (layer 27)", want[27], exact)
        ours.use_cuda_graphs()
        variant("qwen3_ours_graphed_ms", timeit(f_plain))
        for a, b, k in zip(f_plain(), plain, layers):
            check(f"qwen3 ours graphed vs plain (layer {k})", a, b)
        if COMPILE:  # as shipped with compile=True: each layer compiled, captured into the same graph replay
            variant("qwen3_compile", compile_text_encoder(ours))
            out, t = timed_first(f_plain)
            variant("qwen3_compile_s", t)
        put("qwen3_ours_ms", timeit(f_plain))
        variant("qwen3_graph_replays", ours.graphed.replays)
        variant("qwen3_graph_failed", ours.graphed.failed)
        fast = f_plain()
        for a, b, k in zip(fast, plain, layers):
            check(f"qwen3 ours fast vs plain (layer {k})", a, b)
        check("qwen3 ours fast vs float32 (layer 27)", fast[-1], exact)
    del ref, ours, sd
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    ref, vae = build_vae("flux2")
    s = size()
    z = torch.randn(1, ref.config.latent_channels, s // 8, s // 8, generator=g, device=DEV).to(DT)
    with torch.inference_mode():
        f_ref = lambda: ref.decode(z, return_dict=False)[0]
        f_ours = lambda: vae.decoder(z)
        ref_out, plain = f_ref(), f_ours()
        check("vae ours eager vs diffusers", plain, ref_out)
        put("vae_diffusers_ms", timeit(f_ref))
        variant("vae_ours_eager_ms", timeit(f_ours))
        if not COMPILE:
            return
        compile_vae(vae)
        out, t = timed_first(f_ours)
        variant("vae_compile_s", t)
        torch.cuda.reset_peak_memory_stats()
        put("vae_ours_ms", timeit(f_ours))
        variant("vae_ours_peak_gb", round(torch.cuda.max_memory_allocated() / 1e9, 2))
        check("vae ours compiled (channels-last) vs ours eager", f_ours(), plain)


# ---------------------------------------------------------------------------------------------- whole images

class GcTimer:
    """Wall time spent in Python's garbage collector (a host pause that can starve the GPU)."""

    def __init__(self):
        self.total, self.count, self._t = 0.0, 0, None
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.total += time.perf_counter() - self._t
            self.count += 1


def image_loop(run, reps, label):
    gct = GcTimer()
    times, splits, gcs = [], [], []
    for _ in range(reps):
        g0 = gct.total
        t, st = run()
        times.append(round(t, 4))
        splits.append(st)
        gcs.append(round((gct.total - g0) * 1e3, 1))
    put(f"{label}_s", times)
    put(f"{label}_median_s", round(statistics.median(times), 4))
    if splits and splits[0]:
        put(f"{label}_split_median_s", {k: round(statistics.median(s[k] for s in splits), 4) for k in splits[0]})
        put(f"{label}_split_per_image_s", [{k: round(v, 4) for k, v in s.items()} for s in splits])
    put(f"{label}_gc_ms_per_image", gcs)


STEPS = []


def _event():
    if DEV.type != "cuda":
        return None
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def ours_image_runner(tr, te, vae, mode, steps, noise):
    from flux_core import pipeline
    from flux_core.text import clear_embedding_cache

    def run():
        clear_embedding_cache()  # time the encoder every time, as diffusers does
        st = {}
        sync()
        t0 = time.perf_counter()
        cond = pipeline.encode_prompt(te, [PROMPT], mode)
        sync()
        st["encode"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        marks = [(_event(), t1)]
        res = pipeline.sample(tr, cond, width=size(), height=size(), steps=steps, noise=noise,
                              callback=lambda n, total, x: marks.append((_event(), time.perf_counter())))
        sync()
        st["denoise"] = time.perf_counter() - t1
        if DEV.type == "cuda":  # per step: GPU time between the callbacks' events, and host time between callbacks
            STEPS.append({"gpu_ms": [round(a[0].elapsed_time(b[0]), 1) for a, b in zip(marks, marks[1:])],
                          "host_ms": [round((b[1] - a[1]) * 1e3, 1) for a, b in zip(marks, marks[1:])]})
        t2 = time.perf_counter()
        pipeline.decode(vae, res.latent)
        st["decode"] = time.perf_counter() - t2
        return time.perf_counter() - t0, st

    return run


def diffusers_image_runner(pipe, steps, noise, guidance):
    def run():
        sync()
        t = time.perf_counter()
        pipe(prompt=PROMPT, height=size(), width=size(), num_inference_steps=steps, guidance_scale=guidance,
             latents=noise, output_type="pt")
        sync()
        return time.perf_counter() - t, {}

    return run


def part_image(family_name):
    """One process: ours (compile=True paths) and, in process 0, diffusers' pipeline with its compiled transformer.
    Process 1.. hold only our models, so their peak memory is ours alone."""
    from flux_core import pipeline
    from flux_core.demo import write_byte_tokenizer
    from flux_core.families import FAMILIES
    from flux_core.models import LoadedModel
    from flux_core.text import QwenTokenizer, TextEncoder
    from flux_core.torch.loaders import compile_blocks, compile_text_encoder, compile_vae
    from flux_core.torch.qwen3 import load_qwen3
    from flux_core.weights.io import Checkpoint

    klein = family_name == "klein"
    family = FAMILIES[family_name]
    steps = 4 if klein else 8
    with_peer = A.proc == 0
    dt = "bfloat16" if DT == torch.bfloat16 else "float32"
    tr_ref, tr = build_klein()[:2] if klein else build_zimage()
    te_ref, te_sd = build_qwen3()
    vae_ref, vae = build_vae("flux2" if klein else "flux1")
    te = TextEncoder(load_qwen3(Checkpoint(te_sd), dtype=DT, device=DEV, max_layers=27 if klein else 35).eval(),
                     QwenTokenizer(write_byte_tokenizer(Path(tempfile.mkdtemp()) / "tok")), source_id="bench")
    del te_sd
    if DEV.type == "cuda":
        te.model.use_cuda_graphs()
    if not with_peer:
        del tr_ref, te_ref, vae_ref
    gc.collect()
    if COMPILE:
        compile_blocks(tr)
        compile_text_encoder(te.model)
        compile_vae(vae)
    dev = str(DEV)
    trm = LoadedModel("transformer", tr, "bench", "torch", dev, dt, variant=family.variant(True, tr.config))
    tem, vaem = LoadedModel("text_encoder", te, "bench", "torch", dev, dt), LoadedModel("vae", vae, "bench", "torch", dev, dt)
    c, h, w = pipeline.latent_size(trm, size(), size())
    noise = pipeline.make_noise(0, 1, c, h, w)
    run = ours_image_runner(trm, tem, vaem, "klein" if klein else "zimage", steps, noise)
    with torch.inference_mode():
        if DEV.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        run()
        put("ours_first_image_s (compiles)", round(time.time() - t, 1))
        run()  # the second generation captures the step graphs (first steps of each shape run plainly)
        STEPS.clear()
        image_loop(run, A.image_reps, "ours")
        put("ours_steps_per_image", list(STEPS))  # where a slow image's time went (GPU vs host, per step)
        if with_peer and DEV.type == "cuda":  # the same models with the CUDA-graph replay switched off
            os.environ["FLUXCORE_CUDA_GRAPHS"] = "0"
            run()
            STEPS.clear()
            image_loop(run, A.image_reps, "ours_no_graphs")
            put("ours_no_graphs_steps_last_image", STEPS[-1] if STEPS else None)
            os.environ["FLUXCORE_CUDA_GRAPHS"] = "1"
        if DEV.type == "cuda":
            put("ours_peak_gb" + ("" if not with_peer else " (diffusers models resident too)"),
                round(torch.cuda.max_memory_allocated() / 1e9, 2))
        if with_peer:
            peer_image(klein, tr_ref, te_ref, vae_ref, steps, noise)


def peer_image(klein, tr_ref, te_ref, vae_ref, steps, noise):
    from refs import qwen3 as rq
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, ZImagePipeline

    if klein:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="exponential")
        pipe = Flux2KleinPipeline(scheduler=sched, vae=vae_ref, text_encoder=te_ref, tokenizer=rq.tiny_hf_tokenizer(),
                                  transformer=tr_ref, is_distilled=True)
        latents, guidance = noise.to(DEV, DT), 1.0
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
        pipe = ZImagePipeline(scheduler=sched, vae=vae_ref, text_encoder=te_ref.model, tokenizer=rq.tiny_hf_tokenizer(),
                              transformer=tr_ref)
        latents, guidance = noise.to(DEV, torch.float32), 0.0
    pipe.set_progress_bar_config(disable=True)
    run = diffusers_image_runner(pipe, steps, latents, guidance)
    if COMPILE:
        tr_ref.compile_repeated_blocks(fullgraph=True)
    t = time.time()
    run()
    put("diffusers_compiled_first_image_s (compiles)", round(time.time() - t, 1))
    run()
    image_loop(run, A.image_reps, "diffusers_compiled" if COMPILE else "diffusers_eager")


def part_klein_image():
    part_image("klein")


def part_zimage_image():
    part_image("zimage")


def part_comfy_native():
    """ComfyUI's own klein and Z-Image model classes (a snapshot carried as .dev/comfyui: bench/comfy_native.py)."""
    from comfy_native import part_comfy_native as run

    run(A, DEV, DT, timeit, check, put, variant, klein_cfg, zimage_cfg)


def part_zimage():
    part_zimage_step()
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()
    part_image("zimage")


if __name__ == "__main__":
    if A.part:
        REC["part"], REC["proc"], REC["env"] = A.part, A.proc, _env()
        save()
        try:
            with torch.inference_mode():
                globals()[f"part_{A.part}"]()
        except Exception as err:  # keep what was measured, say what broke
            import traceback

            traceback.print_exc()
            REC["notes"].append(f"{A.part}[{A.proc}] stopped: {type(err).__name__}: {str(err)[:300]}")
        save()
    else:
        driver()
