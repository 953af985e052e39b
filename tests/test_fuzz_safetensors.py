"""Seeded mutations of a small valid .safetensors file: every one must load or raise our own FluxCoreError subclass
(never a foreign exception, a hang or a huge allocation). The mutations cover the raw header bytes, the 8-byte header
length, the JSON structure (dtypes, shapes, offsets, keys, metadata) and the `config` metadata our builders read.
"""
from __future__ import annotations

import json
import random
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from flux_core.errors import FluxCoreError
from flux_core.configs import KleinConfig, ZImageConfig, _theta_and_eps
from flux_core.weights.io import load_checkpoint

N_MUTATIONS = 3000
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U64", "F4",
          "C64", "X", "", "f32", "F32 "]
CONFIG = {"_class_name": "Flux2Transformer2DModel", "num_attention_heads": 2, "attention_head_dim": 16,
          "in_channels": 8, "num_layers": 1, "num_single_layers": 1, "joint_attention_dim": 24, "mlp_ratio": 3.0,
          "axes_dims_rope": [4, 4, 4, 4], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False}
WEIRD = [None, True, -1, 0, 2**63, 1e308, "1", "NaN", [], {}, [1, "a"], {"a": {"b": []}}, "x" * 300]


def _valid_file(tmp_path) -> bytes:
    g = torch.Generator().manual_seed(0)
    sd = {"img_in.weight": torch.randn(32, 8, generator=g), "a.bias": torch.randn(5, generator=g).half(),
          "b.weight": torch.randn(3, 2, generator=g).to(torch.bfloat16), "c.ids": torch.arange(6, dtype=torch.int64),
          "d.scale_weight": torch.tensor([0.5]), "d.weight": torch.ones(2, 2).to(torch.float8_e4m3fn)}
    path = tmp_path / "valid.safetensors"
    save_file(sd, str(path), metadata={"config": json.dumps(CONFIG), "is_distilled": "true"})
    return path.read_bytes()


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, pad=True) -> bytes:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _mutate_json(rng: random.Random, header: dict, body: bytes) -> bytes:
    keys = [k for k in header if k != "__metadata__"]
    k = rng.choice(keys)
    entry = header[k]
    op = rng.randrange(12)
    if op == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif op == 1:
        entry["shape"] = rng.choice([[], [0], [-1], [2**40, 2**40], [3, 2, 1], [1] * 40, ["a"], None, 7])
    elif op == 2:
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[b, a], [a, b + 1], [a, 2**63], [-1, b], [0, len(body) + 64], [a], [a, a],
                                            [0, 0], "x", [a + 1, b + 1]])
    elif op == 3:
        del header[k][rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 4:
        header[rng.choice(["", "\u0000", "x" * 1000, k + "2"])] = dict(entry)
    elif op == 5:
        header[k] = rng.choice(WEIRD)
    elif op == 6:
        header["__metadata__"] = rng.choice([{"a": 1}, {"a": None}, [], "x", {"config": 5}, None])
    elif op in (7, 8, 9):
        header["__metadata__"]["config"] = _mutate_config(rng)
    elif op == 10:
        header = {"__metadata__": header.pop("__metadata__")} if rng.random() < 0.5 else {}
    else:
        entry[rng.choice(["extra", "dtype"])] = rng.choice(WEIRD)
    return _join(header, body, pad=rng.random() < 0.8)


def _mutate_config(rng: random.Random) -> str:
    roll = rng.randrange(8)
    if roll == 0:
        depth = rng.choice([50, 5000, 100_000])
        return "[" * depth + "]" * depth
    if roll == 1:
        return json.dumps(rng.choice(WEIRD))
    if roll == 2:
        text = json.dumps(CONFIG)
        cut = rng.randrange(len(text))
        return text[:cut] + rng.choice(["", "}", "NaN", "\ud800", "{"]) + text[cut + 1:]
    cfg = dict(CONFIG)
    for _ in range(rng.randrange(1, 4)):
        cfg[rng.choice(list(CONFIG) + ["norm_num_groups", "scaling_factor", "rope_parameters"])] = rng.choice(
            WEIRD + [float("nan"), float("inf"), -3.5, 0.0, "16", [0, 0], [2**40]])
    return json.dumps(cfg)  # may contain NaN / Infinity, which Python writes and strict parsers reject


def _mutate(rng: random.Random, data: bytes) -> bytes:
    roll = rng.random()
    if roll < 0.25:  # flip bytes anywhere in the header (and the length field)
        n = struct.unpack("<Q", data[:8])[0]
        b = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            b[rng.randrange(8 + n)] = rng.randrange(256)
        return bytes(b)
    if roll < 0.35:  # the header length alone
        n = struct.unpack("<Q", data[:8])[0]
        new = rng.choice([0, 1, n - 1, n + 1, n + 8, len(data), len(data) + 1, 2**63, 2**64 - 1, 100 * 2**20])
        return struct.pack("<Q", new) + data[8:]
    if roll < 0.45:  # truncation at any point, or junk appended
        return data[:rng.randrange(len(data))] if rng.random() < 0.7 else data + bytes(rng.randrange(1, 64))
    if roll < 0.5:  # the tensor bytes (these must load: they are only values)
        b = bytearray(data)
        n = struct.unpack("<Q", data[:8])[0]
        b[rng.randrange(8 + n, len(b))] ^= 0xFF
        return bytes(b)
    header, body = _split(data)
    return _mutate_json(rng, header, body)


def test_mutated_safetensors_load_or_raise_our_error(tmp_path):
    valid = _valid_file(tmp_path)
    assert load_checkpoint(tmp_path / "valid.safetensors").config == CONFIG
    rng = random.Random(20261202)
    path = tmp_path / "m.safetensors"
    outcomes = {"loaded": 0, "refused": 0}
    t0 = time.perf_counter()
    for i in range(N_MUTATIONS):
        data = _mutate(rng, valid)
        path.write_bytes(data)
        try:
            ckpt = load_checkpoint(path)
            if ckpt.config:  # what the model builders do with it next
                KleinConfig.from_state_dict(ckpt.sd, ckpt.config)
                ZImageConfig.from_diffusers(ckpt.config)
                _theta_and_eps(ckpt.config)
            outcomes["loaded"] += 1
        except FluxCoreError:
            outcomes["refused"] += 1
        except BaseException as e:  # noqa: BLE001 - the point: name the mutation that let a foreign error out
            (tmp_path / "failing.safetensors").write_bytes(data)
            pytest.fail(f"mutation {i} raised {type(e).__name__}: {e} (file kept at {tmp_path}/failing.safetensors)")
    elapsed = time.perf_counter() - t0
    print(outcomes, f"{elapsed:.1f} s")
    # both outcomes must occur, or the mutations are not exercising anything
    assert outcomes["loaded"] > N_MUTATIONS // 20 and outcomes["refused"] > N_MUTATIONS // 4, outcomes
    assert elapsed < 60, f"{N_MUTATIONS} loads took {elapsed:.1f} s"
