"""What the user asks for: a LoRA file and a strength, from Python, the CLI (`--lora PATH[:STRENGTH]`) or a node."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

# a trailing ":<number>" is a strength; "C:\\x.safetensors" or "/a:b/x.safetensors" is not
_STRENGTH = re.compile(r"^(?P<path>.+):(?P<s>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")


@dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float = 1.0

    def key(self) -> tuple:
        """Identity for caches: the resolved path, its modification time and the strength."""
        p = Path(self.path).expanduser()
        stamp = p.stat().st_mtime_ns if p.exists() else 0
        return (str(p.resolve()), stamp, float(self.strength))

    def describe(self) -> str:
        return f"{Path(self.path).name}:{self.strength:g}"


def parse_lora_arg(text: str) -> LoraSpec:
    """`PATH` or `PATH:STRENGTH` (strength defaults to 1.0). A Windows drive (`C:\\loras\\x.safetensors`) is a
    path, not a strength, because only a trailing number after the last ':' counts as one."""
    m = _STRENGTH.match(text)
    if m and not re.fullmatch(r"[A-Za-z]", m.group("path")):
        return LoraSpec(m.group("path"), float(m.group("s")))
    if not text:
        raise ConfigError("--lora needs a path (PATH or PATH:STRENGTH)")
    return LoraSpec(text, 1.0)


def as_specs(loras) -> tuple[LoraSpec, ...]:
    """[(path, strength) | path | LoraSpec, ...] -> LoraSpecs."""
    out = []
    for item in loras or ():
        if isinstance(item, LoraSpec):
            out.append(item)
        elif isinstance(item, (str, Path)):
            out.append(LoraSpec(str(item)))
        else:
            path, strength = item
            out.append(LoraSpec(str(path), float(strength)))
    return tuple(out)
