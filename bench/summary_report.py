"""The summary of one or more bench_summary.py calls: `summary.json` in the schema of issue 12, with the ratios that
the goals are stated in. Pure functions of the parts' JSON (no torch): the driver calls `summarize` after its parts,
and `bench_summary.py --parts "" --merge A/parts.json B/parts.json --mlx C/mlx_cuda.json` rebuilds a summary from
earlier calls (a later file's part replaces an earlier one's)."""
from __future__ import annotations


def _get(results, part, key, i=0):
    runs = results.get(part) or []
    return runs[i].get(key) if len(runs) > i else None


def merge_mlx(runs):
    """[(label, bench_mlx_cuda.py result), ...] -> one result: for each family the MLX step and the torch step beside
    it (a pair measured in one call) from the last run that has both; a note names the run each pair came from."""
    out = dict(runs[-1][1]) if runs else {}
    out.pop("sources", None)
    figures, notes = {}, list(out.get("notes", []))
    for fam in ("klein", "zimage"):
        for label, r in reversed(runs):
            m = r.get("mlx_cuda_step_1024_ms") or {}
            if m.get(f"{fam}_mlx") is not None and m.get(f"{fam}_torch") is not None:
                figures[f"{fam}_mlx"], figures[f"{fam}_torch"] = m[f"{fam}_mlx"], m[f"{fam}_torch"]
                notes.append(f"mlx_cuda {fam}: from {label}")
                out.setdefault("sources", {})[fam] = label
                break
        else:
            figures[f"{fam}_mlx"] = figures[f"{fam}_torch"] = None
    out["mlx_cuda_step_1024_ms"], out["notes"] = figures, notes
    return out


def summarize(R, env):
    def g(part, key):
        if part.startswith("zimage") and "zimage" in R:
            part = "zimage"
        return _get(R, part, key)

    notes = [] if "comfy_native" in R else ["comfyui_native: not measured (needs a ComfyUI snapshot carried: "
                                             "bench/comfy_native.py --prepare)"]
    mlx = (R.get("mlx_cuda") or [{}])[0]
    if not mlx:
        notes.append("mlx_cuda_step_1024_ms: not measured (bench/run_mlx_cuda.sh, two calls; then --mlx FILE)")
    kimg = [r["ours_median_s"] for r in R.get("klein_image", []) if r.get("ours_median_s")]
    kall = [t for r in R.get("klein_image", []) for t in r.get("ours_s", [])]
    zruns = R.get("zimage", []) + R.get("zimage_image", [])   # process 0 (beside the peer) first
    zimg = [r["ours_median_s"] for r in zruns if r.get("ours_median_s")]
    zall = [t for r in zruns for t in r.get("ours_s", [])]
    s = {
        "device": env.get("device"), "date": env.get("date"), "torch": env.get("torch"),
        "modes": {"ours": "regional torch.compile of the DiT blocks (q/k norm + RoPE one fused expression), attention "
                          "outside the compiled regions, each step replayed from a CUDA graph; Qwen3 layers compiled "
                          "and replayed from a CUDA graph; VAE decoder compiled channels-last (compile=True / --compile)",
                  "comfyui_native": "ComfyUI's own model classes (comfy.ldm.flux / comfy.ldm.lumina, snapshot "
                                    "4f874c5), resident bf16 weights, its default attention, comfy_kitchen 0.2.24 "
                                    "with its CUDA kernels (RoPE, RMSNorm), eager; _compiled: "
                                    "torch.compile of the whole model as its TorchCompileModel node does",
                  "mlx_cuda": "our MLX path on mlx 0.32.4 + mlx-cuda-13 (its step mx.compile'd as the sampler runs "
                              "it) beside our torch compiled step, same weights, one call",
                  "diffusers_compiled": "transformer.compile_repeated_blocks(fullgraph=True), diffusers 0.42.1",
                  "ours_fp8": "ours with fp8 e4m3 block weights (row-wise scales, torch._scaled_mm)",
                  "ours_int8": "ours with int8 weight-only block weights (dequantized in the compiled graph)"},
        "klein_step_1024_ms": {"ours": g("klein_step", "ours_ms"), "ours_fp8": g("klein_step", "ours_fp8_ms"),
                               "ours_int8": g("klein_step", "ours_int8_ms"),
                               "diffusers_eager": g("klein_step", "diffusers_eager_ms"),
                               "diffusers_compiled": g("klein_step", "diffusers_compiled_ms"),
                               "comfyui_native": g("comfy_native", "comfyui_klein_eager_ms"),
                               "comfyui_native_compiled": g("comfy_native", "comfyui_klein_compiled_ms")},
        "klein_ref_step_1024_ms": {"ours": g("klein_step", "ref_ours_ms"),
                                   "diffusers_compiled": g("klein_step", "ref_diffusers_compiled_ms")},
        "zimage_step_1024_ms": {"ours": g("zimage_step", "ours_ms"),
                                "diffusers_compiled": g("zimage_step", "diffusers_compiled_ms"),
                                "comfyui_native": g("comfy_native", "comfyui_zimage_eager_ms"),
                                "comfyui_native_compiled": g("comfy_native", "comfyui_zimage_compiled_ms")},
        "qwen3_512_ms": {"ours": g("qwen3_vae", "qwen3_ours_ms"), "transformers": g("qwen3_vae", "qwen3_transformers_ms")},
        "vae_decode_1024_ms": {"ours": g("qwen3_vae", "vae_ours_ms"), "diffusers": g("qwen3_vae", "vae_diffusers_ms")},
        "klein_image_1024_s": {"ours": kimg, "ours_min_max": [min(kall), max(kall)] if kall else None,
                               "diffusers_compiled": g("klein_image", "diffusers_compiled_median_s")},
        "zimage_image_1024_s": {"ours": zimg, "ours_min_max": [min(zall), max(zall)] if zall else None,
                                "diffusers_compiled": g("zimage_image", "diffusers_compiled_median_s")},
        "mlx_cuda_step_1024_ms": mlx.get("mlx_cuda_step_1024_ms"),
        "variants": {p: R[p][0].get("variants") for p in ("klein_step", "zimage_step", "qwen3_vae", "zimage",
                                                           "comfy_native", "mlx_cuda") if p in R},
        "checks": {p: [c for r in R[p] for c in r.get("checks", [])] for p in R},
        "notes": notes + [n for p in R for r in R[p] for n in r.get("notes", [])],
    }
    def source(runs):  # the call a part came from (its results folder, when merged) and when its first run began
        when = " ".join(filter(None, (runs[0].get("env", {}).get(k) for k in ("date", "utc"))))
        return " ".join(filter(None, (runs[0].get("call"), f"({when})" if when else None))) or None

    s["sources"] = {p: source(runs) for p, runs in R.items()}
    if mlx.get("sources"):
        s["sources"]["mlx_cuda"] = mlx["sources"]
    calls = {R[p][0].get("call", "this call") for p in ("klein_step", "comfy_native") if p in R}  # merged: folders
    if "comfy_native" in R and len(calls) > 1:
        v = R["comfy_native"][0].get("variants", {})
        s["notes"].append("comfyui_native comes from another call than ours (see sources); same-process anchor there: "
                          f"ours eager klein {v.get('ours_klein_eager_ms (same process)')} ms, Z-Image "
                          f"{v.get('ours_zimage_eager_ms (same process)')} ms")
    s["ratios"] = _ratios(s)
    return s


def _ratios(s):
    def r(a, b):
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    k, z = s["klein_step_1024_ms"], s["zimage_step_1024_ms"]
    ki, zi = s["klein_image_1024_s"], s["zimage_image_1024_s"]
    return {"klein_step_vs_diffusers_compiled (goal <= 0.89)": r(k["ours"], k["diffusers_compiled"]),
            "klein_fp8_vs_diffusers_compiled (goal <= 0.62)": r(k["ours_fp8"], k["diffusers_compiled"]),
            "klein_int8_vs_ours_bf16 (goal <= 1)": r(k["ours_int8"], k["ours"]),
            "klein_ref_vs_diffusers_compiled (goal <= 0.89)": r(s["klein_ref_step_1024_ms"]["ours"],
                                                                s["klein_ref_step_1024_ms"]["diffusers_compiled"]),
            "zimage_step_vs_diffusers_compiled (goal <= 0.89)": r(z["ours"], z["diffusers_compiled"]),
            "qwen3_vs_transformers (goal <= 0.26)": r(s["qwen3_512_ms"]["ours"], s["qwen3_512_ms"]["transformers"]),
            "vae_vs_diffusers (goal <= 0.42)": r(s["vae_decode_1024_ms"]["ours"], s["vae_decode_1024_ms"]["diffusers"]),
            "klein_image_worst_process_vs_diffusers_compiled (goal <= 0.81)":
                r(max(ki["ours"]), ki["diffusers_compiled"]) if ki["ours"] else None,
            "klein_image_max_over_min_process (goal <= 1.10)": r(max(ki["ours"]), min(ki["ours"])) if ki["ours"] else None,
            "zimage_image_vs_diffusers_compiled (goal <= 0.92)":
                r(max(zi["ours"]), zi["diffusers_compiled"]) if zi["ours"] else None,
            "klein_step_vs_comfyui_native": r(k["ours"], k["comfyui_native"]),
            "klein_step_vs_comfyui_native_compiled": r(k["ours"], k["comfyui_native_compiled"]),
            "zimage_step_vs_comfyui_native": r(z["ours"], z["comfyui_native"]),
            "zimage_step_vs_comfyui_native_compiled": r(z["ours"], z["comfyui_native_compiled"]),
            **_mlx_ratios(s["mlx_cuda_step_1024_ms"] or {}, r)}


def _mlx_ratios(m, r):
    return {"mlx_cuda_klein_vs_torch (goal <= 1)": r(m.get("klein_mlx"), m.get("klein_torch")),
            "mlx_cuda_zimage_vs_torch (goal <= 1)": r(m.get("zimage_mlx"), m.get("zimage_torch"))}
