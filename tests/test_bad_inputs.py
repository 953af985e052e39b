"""Bad inputs, one table per surface (CLI, Python API, ComfyUI node classes), on the tiny demo checkpoints.

Each CLI row: argv edits, the exit code (2 = expected failure, 1 = internal bug), a fragment of the one-line message
that names the fix, and whether the failure must come before any weights are read (`early`). No row may print a
traceback. The API and node rows expect our own FluxCoreError subclass with the fragment.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from flux_core import models
from flux_core.errors import FluxCoreError


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The demo checkpoints plus every kind of broken input the rows refer to, by name."""
    from flux_core.demo import write_demo_checkpoints

    root = tmp_path_factory.mktemp("bad")
    d = {k: Path(v) for k, v in write_demo_checkpoints(root / "models").items()}
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "ok.png")
    d["ok.png"] = root / "ok.png"
    (root / "text.png").write_text("this is not an image\n")
    d["text.png"] = root / "text.png"
    (root / "trunc.png").write_bytes((root / "ok.png").read_bytes()[:200])
    d["trunc.png"] = root / "trunc.png"
    Image.new("RGB", (1, 1)).save(root / "1x1.png")
    d["1x1.png"] = root / "1x1.png"
    (root / "a_folder").mkdir()
    d["folder"] = root / "a_folder"
    (root / "a_file").write_text("x")
    d["file"] = root / "a_file"
    torch.save(load_file(str(d["klein"])), str(root / "klein.pt"))
    d["pickle"] = root / "klein.pt"
    _tokenizers(d, root)
    _configs(d, root)
    _short_text_encoder(d, root)
    return d


def _tokenizers(d, root):
    from tokenizers import Tokenizer

    from flux_core.text import QwenTokenizer

    good = d["tokenizer"]
    corrupt = {"vocab.json": b'{"a": 1,,', "merges.txt": b"#version: 0.2\nabc\n",
               "tokenizer_config.json": b'{"pad_token": ', "added_tokens.json": b"{"}
    for name, data in corrupt.items():
        shutil.copytree(good, root / f"tok_{name}")
        (root / f"tok_{name}" / name).write_bytes(data)
        d[f"tok_{name}"] = root / f"tok_{name}"
    (root / "tok_tokenizer.json").mkdir()
    tok: Tokenizer = QwenTokenizer(good)._tok
    tok.save(str(root / "tok_tokenizer.json" / "tokenizer.json"))
    full = (root / "tok_tokenizer.json" / "tokenizer.json").read_bytes()
    (root / "tok_tokenizer.json" / "tokenizer.json").write_bytes(full[: len(full) // 2])
    d["tok_tokenizer.json"] = root / "tok_tokenizer.json"


def _configs(d, root):
    """klein with a damaged `config` metadata or beside a damaged config.json / index."""
    sd = load_file(str(d["klein"]))
    variants = {"list": "[1, 2]", "deep": "[" * 100_000 + "]" * 100_000,
                "string_number": json.dumps({"_class_name": "Flux2Transformer2DModel", "num_layers": "2"})}
    for name, text in variants.items():
        save_file(sd, str(root / f"klein_meta_{name}.safetensors"),
                  metadata={"config": text, "fluxcore.distilled": "true"})
        d[f"meta_{name}"] = root / f"klein_meta_{name}.safetensors"
    for name, extra in {"bad_config": ("config.json", '{"num_layers": 2,'),
                        "no_weight_map": ("diffusion_pytorch_model.safetensors.index.json", '{"metadata": {}}')}.items():
        folder = root / name / "transformer"
        folder.mkdir(parents=True)
        shutil.copy(d["klein"], folder / "diffusion_pytorch_model.safetensors")
        (folder / extra[0]).write_text(extra[1])
        d[name] = folder


def _short_text_encoder(d, root):
    """The Qwen3 file with its last decoder layers missing (a 20-layer model where klein reads layer 27)."""
    sd = load_file(str(d["text_encoder"]))
    keep = {k: v for k, v in sd.items() if not (".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= 20)}
    (root / "short").mkdir()
    save_file(keep, str(root / "short" / "qwen_3_4b.safetensors"))
    d["short_te"] = root / "short" / "qwen_3_4b.safetensors"


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fail any row that opens a checkpoint: validation must come first. The model cache is emptied so a cached
    model cannot hide a late check."""
    from collections import OrderedDict

    import safetensors

    monkeypatch.setattr(models, "_CACHE", OrderedDict())  # an empty cache for this row (no gc pass, the others' stay)

    def refuse(*a, **k):
        raise AssertionError("a checkpoint was read before the inputs were validated")

    monkeypatch.setattr(safetensors, "safe_open", refuse)


# ------------------------------------------------------------------------------------------------------------ CLI
@dataclass
class Cli:
    id: str
    args: dict                      # option -> value (None removes it); values "@name" are paths from `files`
    code: int
    fragment: str
    early: bool = True              # must fail before any checkpoint is read
    model: str = "klein"
    extra: list = field(default_factory=list)


CLI_ROWS = [
    # batch, size, steps, guidance, strength
    Cli("batch-0", {"--batch-size": "0"}, 2, "--batch-size must be at least 1"),
    Cli("batch-negative", {"--batch-size": "-3"}, 2, "--batch-size must be at least 1"),
    Cli("width-0", {"--width": "0"}, 2, "--width"),
    Cli("height-negative", {"--height": "-64"}, 2, "--height"),
    Cli("width-huge", {"--width": "100000", "--height": "64"}, 2, "at most"),
    Cli("size-huge", {"--width": "100000", "--height": "100000"}, 2, "at most"),
    Cli("steps-0", {"--steps": "0"}, 2, "--steps"),
    Cli("steps-huge", {"--steps": "1000000"}, 2, "--steps"),
    Cli("guidance-nan", {"--guidance": "nan"}, 2, "--guidance"),
    Cli("guidance-inf", {"--guidance": "inf"}, 2, "--guidance"),
    Cli("guidance-negative", {"--guidance": "-1"}, 2, "--guidance"),
    Cli("strength-above-1", {"--init-image": "@ok.png", "--strength": "1.5"}, 2, "--strength", model="zimage"),
    Cli("strength-0", {"--init-image": "@ok.png", "--strength": "0"}, 2, "--strength", model="zimage"),
    Cli("strength-without-init", {"--strength": "0.5"}, 2, "--init-image", model="zimage"),
    Cli("prompt-not-utf8", {"--prompt": "a cat \udcff\udcfe"}, 2, "UTF-8"),
    # images: opened and checked before any model loads, naming the file
    Cli("reference-text-file", {"--reference": "@text.png"}, 2, "text.png"),
    Cli("reference-truncated", {"--reference": "@trunc.png"}, 2, "trunc.png"),
    Cli("reference-folder", {"--reference": "@folder"}, 2, "a_folder"),
    Cli("reference-missing", {"--reference": "@folder/nope.png"}, 2, "nope.png"),
    Cli("reference-1x1", {"--reference": "@1x1.png"}, 2, "1x1.png"),
    Cli("init-text-file", {"--init-image": "@text.png"}, 2, "text.png", model="zimage"),
    Cli("init-truncated", {"--init-image": "@trunc.png"}, 2, "trunc.png", model="zimage"),
    Cli("init-folder", {"--init-image": "@folder"}, 2, "a_folder", model="zimage"),
    # device and output paths: before the weights are read
    Cli("device-unknown", {"--device": "tpu"}, 2, "--device"),
    Cli("output-is-folder", {"--output": "@folder"}, 2, "is a folder"),
    Cli("output-parent-is-file", {"--output": "@file/out.png"}, 2, "is a file"),
    Cli("output-unwritable", {"--output": "/sys/fluxcore_out.png"}, 2, "cannot write"),
    Cli("output-bad-extension", {"--output": "@folder/out.gif"}, 2, "unknown image type"),
    Cli("output-latent-folder", {"--output-latent": "@folder"}, 2, "is a folder"),
    # damaged files: our message, naming the file and the fix
    Cli("tokenizer-vocab", {"--tokenizer": "@tok_vocab.json"}, 2, "vocab.json", early=False),
    Cli("tokenizer-merges", {"--tokenizer": "@tok_merges.txt"}, 2, "merges.txt", early=False),
    Cli("tokenizer-config", {"--tokenizer": "@tok_tokenizer_config.json"}, 2, "tokenizer_config.json", early=False),
    Cli("tokenizer-added", {"--tokenizer": "@tok_added_tokens.json"}, 2, "added_tokens.json", early=False),
    Cli("tokenizer-json", {"--tokenizer": "@tok_tokenizer.json"}, 2, "tokenizer.json", early=False),
    Cli("folder-bad-config", {"--model": "@bad_config"}, 2, "config.json is not valid JSON", early=False),
    Cli("folder-no-weight-map", {"--model": "@no_weight_map"}, 2, "weight_map", early=False),
    Cli("meta-config-string-number", {"--model": "@meta_string_number"}, 2, "'num_layers'", early=False),
    Cli("pickle-checkpoint", {"--model": "@pickle"}, 2, "use the .safetensors file", early=False),
    Cli("text-encoder-short", {"--text-encoder": "@short_te", "--tokenizer": "@tokenizer"}, 2,
        "qwen_3_4b.safetensors has 20 decoder layers", early=False),
    # another tool's `config` metadata: loads, with one warning line (a number and NaN: tests/test_weights_io.py)
    Cli("meta-config-list", {"--model": "@meta_list"}, 0, "ignoring", early=False),
    Cli("meta-config-deep", {"--model": "@meta_deep"}, 0, "ignoring", early=False),
]


def _argv(row: Cli, files, out: Path) -> list[str]:
    model = {"klein": files["klein"], "zimage": files["zimage"]}[row.model]
    vae = files["flux2_vae"] if row.model == "klein" else files["flux1_vae"]
    opts = {"--model": model, "--text-encoder": files["text_encoder"], "--vae": vae, "--prompt": "a cat",
            "--width": "64", "--height": "64", "--steps": "2", "--seed": "1", "--backend": "torch",
            "--device": "cpu", "--output": out / "out.png"}
    opts.update(row.args)
    argv = ["generate"]
    for k, v in opts.items():
        if v is None:
            continue
        if isinstance(v, str) and v.startswith("@"):
            name, _, rest = v[1:].partition("/")
            v = files[name] / rest if rest else files[name]
        argv += [k, str(v)]
    return argv + row.extra


@pytest.mark.parametrize("row", CLI_ROWS, ids=lambda r: r.id)
def test_cli_bad_input(row, files, tmp_path, capsys, caplog, request):
    from flux_core.__main__ import main

    if row.early:
        request.getfixturevalue("no_weights_read")
    rc = main(_argv(row, files, tmp_path))
    out = capsys.readouterr()
    text = out.err + out.out + caplog.text  # in-process, log lines go to pytest's handler
    assert "Traceback" not in text, text
    assert rc == row.code, text
    assert row.fragment in text, text
    if row.code == 2:
        assert len([line for line in out.err.splitlines() if line.startswith("error:")]) == 1, out.err
        assert not (tmp_path / "out.png").exists()


def test_cli_ctrl_c_is_one_line_and_exit_130(files, tmp_path, capsys, monkeypatch):
    from flux_core import __main__ as cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_transformer", interrupted)
    rc = cli.main(_argv(Cli("x", {}, 130, ""), files, tmp_path))
    err = capsys.readouterr().err
    assert rc == 130 and "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted" in err


def test_cli_internal_bug_is_exit_1_with_traceback_only_under_verbose(files, tmp_path, capsys, monkeypatch):
    from flux_core import __main__ as cli

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(models, "load_transformer", bug)
    argv = _argv(Cli("x", {}, 1, ""), files, tmp_path)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" in err and "--verbose" in err and "ZeroDivisionError" in err
    assert cli.main(argv + ["--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_cli_help_explains_every_option_with_its_default(capsys):
    from flux_core.__main__ import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    lines = out.split("options:", 1)[1].splitlines()
    helps, current = {}, None
    for line in lines:  # "  --opt META  help ..." then continuation lines indented deeper
        if line.startswith("  -"):
            head, _, rest = line.strip().partition("  ")
            current = re.findall(r"--[\w-]+", head)[0]
            helps[current] = rest.strip()
        elif current:
            helps[current] += " " + line.strip()
    for opt in ("--prompt", "--width", "--height", "--batch-size", "--backend", "--dtype", "--verbose", "--steps",
                "--guidance", "--seed", "--output", "--device", "--strength", "--negative-prompt", "--model"):
        assert len(helps.get(opt, "")) > 20, f"{opt} has no help text: {helps.get(opt)!r}"
    for opt, default in (("--batch-size", "default: 1"), ("--backend", "default: auto"), ("--dtype", "default: auto"),
                         ("--output", "default: out.png"), ("--strength", "default: 0.6")):
        assert default in " ".join(helps[opt].split()), (opt, helps[opt])


def test_cli_failing_latent_write_leaves_no_image(files, tmp_path, capsys, monkeypatch):
    from flux_core import outputs
    from flux_core.__main__ import main

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "l.safetensors"))

    monkeypatch.setattr(outputs, "save_latent", disk_full)
    argv = _argv(Cli("x", {"--output-latent": str(tmp_path / "l.safetensors")}, 2, ""), files, tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()  # no image that looks like a finished run


def test_cli_records_the_size_actually_generated(files, tmp_path, capsys):
    from flux_core.__main__ import main
    from flux_core.outputs import read_params

    argv = _argv(Cli("x", {"--width": "70", "--height": "50", "--output": str(tmp_path / "a.jpg")}, 0, ""),
                 files, tmp_path)
    assert main(argv) == 0
    params = read_params(tmp_path / "a.jpg")
    assert Image.open(tmp_path / "a.jpg").size == (64, 48) and (params["width"], params["height"]) == (64, 48)


# ------------------------------------------------------------------------------------------------------ Python API
def _api(files):
    tr = models.load_transformer(files["klein"], backend="torch", device="cpu")
    te = models.load_text_encoder(files["text_encoder"], str(files["tokenizer"]), backend="torch", device="cpu")
    return tr, te, models.load_vae(files["flux2_vae"], backend="torch", device="cpu")


API_ROWS = [
    ("prompt-none", dict(prompt=None), "prompt"),
    ("prompt-number", dict(prompt=5), "prompt"),
    ("batch-0", dict(batch_size=0), "batch_size"),
    ("guidance-nan", dict(guidance=float("nan")), "guidance"),
    ("guidance-negative", dict(guidance=-2.0), "guidance"),
    ("steps-huge", dict(steps=1_000_000), "steps"),
    ("size-huge", dict(width=100_000, height=64), "at most"),
    ("width-0", dict(width=0, height=64), "width"),
    ("strength-without-init", dict(strength=0.5), "init_image"),
    ("reference-1x1", dict(references=["@1x1.png"]), "1x1.png"),
    ("reference-text-file", dict(references=["@text.png"]), "text.png"),
]


@pytest.mark.parametrize("row", API_ROWS, ids=lambda r: r[0])
def test_api_bad_input(row, files):
    from flux_core import pipeline

    _, kwargs, fragment = row
    kwargs = {k: ([files[x[1:]] for x in v] if k == "references" else v) for k, v in kwargs.items()}
    tr, te, vae = _api(files)
    kwargs = {"prompt": "a cat", "width": 64, "height": 64, **kwargs}
    with pytest.raises(FluxCoreError, match=None) as e:
        pipeline.generate(tr, te, vae, kwargs.pop("prompt"), **kwargs)
    assert fragment in str(e.value)


def test_api_unknown_device_is_refused_before_the_weights_are_read(files, no_weights_read):
    with pytest.raises(FluxCoreError, match="device"):
        models.load_transformer(files["klein"], backend="torch", device="tpu")


def test_api_recorded_size_is_the_floored_one(files):
    from flux_core import pipeline

    tr, te, vae = _api(files)
    gen = pipeline.generate(tr, te, vae, "a cat", width=70, height=50, steps=1, seed=0)
    assert gen.images.shape[1:3] == (48, 64) and (gen.params["width"], gen.params["height"]) == (64, 48)


# ----------------------------------------------------------------------------------------------------------- nodes
@pytest.fixture(scope="module")
def node_models(files):
    from nodes import host

    host.set_model_roots([files["klein"].parents[1]])
    import nodes

    def run(name, **kwargs):
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        return getattr(cls(), cls.FUNCTION)(**kwargs)["result"]

    (te,) = run("FluxCoreTextEncoderLoader", text_encoder="qwen_3_4b.safetensors", backend="torch",
                dtype="float32", quantization="none", tokenizer=str(files["tokenizer"]))
    (m,) = run("FluxCoreKleinModelLoader", model_name="flux-2-klein-4b.safetensors", backend="torch",
               dtype="float32", quantization="none", variant="auto")
    (v,) = run("FluxCoreVAELoader", vae_name="flux2-vae.safetensors", backend="torch", dtype="float32")
    pos, _ = run("FluxCoreQwen3Encode", text_encoder=te, prompt="a cat", mode="auto", model=m)
    yield {"run": run, "te": te, "model": m, "vae": v, "positive": pos,
           "channels": m.load().module.config.in_channels}
    host.set_model_roots([])


def _sampler_args(n, **over):
    args = dict(model=n["model"], positive=n["positive"], seed=0, steps=1, guidance=-1.0, width=64, height=64,
                batch_size=1)
    return {**args, **over}


NODE_ROWS = [
    ("sampler-batch-0", "FluxCoreSampler", lambda n: _sampler_args(n, batch_size=0), "batch"),
    ("sampler-denoise-0", "FluxCoreSampler",
     lambda n: _sampler_args(n, latent={"samples": torch.zeros(1, n["channels"], 4, 4)}, denoise=0.0), "denoise"),
    ("sampler-sd-latent", "FluxCoreSampler", lambda n: _sampler_args(n, latent={"samples": torch.zeros(1, 4, 8, 8)}),
     "EmptyFlux2LatentImage"),
    ("sampler-guidance-nan", "FluxCoreSampler", lambda n: _sampler_args(n, guidance=float("nan")), "guidance"),
    ("vae-encode-2-channels", "FluxCoreVAEEncode", lambda n: dict(vae=n["vae"], pixels=torch.rand(1, 64, 64, 2)),
     "channels"),
    ("qwen3-encode-prompt-none", "FluxCoreQwen3Encode",
     lambda n: dict(text_encoder=n["te"], prompt=None, mode="auto", model=n["model"]), "prompt"),
    ("reference-1x1", "FluxCoreReferenceImageEncode",
     lambda n: dict(conditioning=n["positive"], vae=n["vae"], image=torch.rand(1, 1, 1, 3), keep_size=False),
     "1x1"),
]


@pytest.mark.parametrize("row", NODE_ROWS, ids=lambda r: r[0])
def test_node_bad_input(row, node_models):
    _, name, make, fragment = row
    with pytest.raises(FluxCoreError) as e:
        node_models["run"](name, **make(node_models))
    assert fragment in str(e.value), str(e.value)


def test_node_widgets_refuse_what_the_library_refuses():
    import nodes

    req = nodes.NODE_CLASS_MAPPINGS["FluxCoreSampler"].INPUT_TYPES()
    spec = {**req["required"], **req.get("optional", {})}
    assert spec["denoise"][1]["min"] > 0 and spec["batch_size"][1]["min"] == 1


def test_sampler_badge_shows_the_size_actually_generated(node_models):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["FluxCoreSampler"]
    out = getattr(cls(), cls.FUNCTION)(**_sampler_args(node_models, width=1000, height=72))
    (latent,) = out["result"]
    assert tuple(latent["samples"].shape[-2:]) == (4, 62)
    assert "992x64" in out["ui"]["fluxcore"][0]["badge"]


def test_size_limits_come_from_the_models_position_range():
    from flux_core.configs import KleinConfig, ZImageConfig
    from flux_core.families import FAMILIES
    from flux_core.validate import MAX_SIDE, size_limit

    assert size_limit(ZImageConfig(), FAMILIES["zimage"]) == 512 * 2 * 8  # axes_lens rows x patch x VAE factor
    assert size_limit(ZImageConfig(axes_lens=(1536, 256, 512)), FAMILIES["zimage"]) == 4096
    assert size_limit(KleinConfig(), FAMILIES["klein"]) == MAX_SIDE  # FLUX.2 RoPE has no trained table
