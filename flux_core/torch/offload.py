"""Offload for torch models: whole components on and off the device (`model`), or transformer blocks streamed from
pinned host memory while the previous block computes (`blocks`). Wraps an already loaded module; the model files'
math is untouched (every weight is bit for bit the one that was loaded, only where it lives changes).

How it works. `Offloader(module, device, mode)` packs every parameter and buffer into flat host buffers (pinned on
a CUDA machine), one per *unit*: the base unit (everything outside the repeated blocks) and one unit per block
(klein `double_blocks` / `single_blocks`, Z-Image `noise_refiner` / `context_refiner` / `layers`, Qwen3 `layers`).
Parameters are then re-pointed (`param.data = view`) at views of whichever buffer currently holds their bytes:
  host      every unit points at its host buffer; nothing on the device.
  resident  every unit has its own device buffer (one copy in, no copy back: weights are never written).
  blocks    the base unit is resident; blocks take turns in two device slots, each the size of the largest block.
            Before block i runs, the main stream waits for its copy; the copy of the next block is then queued on a
            side CUDA stream into the other slot, after that slot's previous block finished (an event recorded
            after it). After block i, its parameters point back at the host buffer.
Both modes drop to `host` whenever another offloaded component on the same device becomes active (one component on
the device at a time) and come back on the next call of an entry point: the model's forward (its pre-hook also moves
the call's tensor arguments to the device, so callers that place inputs next to the first parameter keep working
while it sits on the host), or a VAE's `encode` / `decode` (activated before they read the VAE's device).

On a CPU device there is nothing to move: the same code path runs with null streams and events and the slots are
plain CPU buffers (`copy=True` forces the copies there, which is how the tests prove streamed == resident bit for
bit). `copy=False` on a CPU binds blocks to their host buffers directly: resident compute.

Pitfalls (docs/NOTES.md): parameters must be re-pointed, never replaced (optimizers are absent, but hooks,
`named_parameters()` and state_dict() must keep seeing the same objects); views must be created outside inference
mode (an inference tensor cannot become a Parameter's data); the slot views are aligned to 256 bytes so that
`uint8 -> dtype` views are legal and fp8 `_scaled_mm` gets aligned pointers; a never-recorded CUDA event is
already complete, so the first waits are free; torch.compile is not combined with block streaming (the hooks
re-point weights between graph calls).
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .common import blocks as find_blocks

log = logging.getLogger(__name__)

MODES = ("none", "model", "blocks")
ALIGN = 256
RESIDENT_SHARE = 0.7  # of the device memory left after the streaming minimum, what resident blocks may take
ENTRY_METHODS = ("encode", "decode")  # a VAE's work starts in these (they move inputs to the VAE's own device)
_ACTIVE: dict[str, list] = {}  # device -> weakrefs of the Offloaders placed there (one active at a time)


# ------------------------------------------------------------------------------------------------ packing

@dataclass
class _Entry:
    module: nn.Module
    name: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple


class _Unit:
    """The tensors of some modules packed into one flat host buffer, re-pointable at any buffer of the same layout."""

    def __init__(self, modules, pin: bool, label: str):
        self.label = label
        self.entries: list[_Entry] = []
        offset = 0
        for m in modules:
            for is_param, table in ((True, m._parameters), (False, m._buffers)):
                for name, t in table.items():
                    if t is None:
                        continue
                    nbytes = t.numel() * t.element_size()
                    self.entries.append(_Entry(m, name, is_param, offset, nbytes, t.dtype, tuple(t.shape)))
                    offset += -(-nbytes // ALIGN) * ALIGN
        self.nbytes = offset
        with torch.inference_mode(False), torch.no_grad():
            self.host = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
            for e in self.entries:
                src = getattr(e.module, e.name)
                self.host[e.offset:e.offset + e.nbytes].copy_(src.detach().reshape(-1).view(torch.uint8))
        self._views: dict[int, list] = {}
        self.bind(self.host)  # from here on the original device tensors are unreferenced (freed)

    def views(self, buf: torch.Tensor) -> list:
        key = buf.data_ptr()
        if key not in self._views:
            with torch.inference_mode(False):
                self._views[key] = [buf[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape)
                                    for e in self.entries]
        return self._views[key]

    def forget(self, buf: torch.Tensor) -> None:
        self._views.pop(buf.data_ptr(), None)

    def bind(self, buf: torch.Tensor) -> None:
        for e, v in zip(self.entries, self.views(buf)):
            if e.is_param:
                e.module._parameters[e.name].data = v
            else:
                e.module._buffers[e.name] = v


class _Sync:
    """CUDA side stream and events, or stand-ins that do nothing (CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None

    def event(self):
        return torch.cuda.Event() if self.cuda else _NullEvent()

    def main(self):
        return torch.cuda.current_stream(self.side.device) if self.cuda else None

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor, after, done) -> None:
        """dst <- src on the side stream, once `after` fired; `done` fires when the copy is complete."""
        if not self.cuda:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.side):
            self.side.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done.record(self.side)

    def wait(self, event) -> None:
        if self.cuda:
            self.main().wait_event(event)

    def record(self, event) -> None:
        if self.cuda:
            event.record(self.main())

    def synchronize(self) -> None:
        if self.cuda:
            self.side.synchronize()
            self.main().synchronize()


class _NullEvent:
    def record(self, stream=None):
        pass


# ------------------------------------------------------------------------------------------------ the wrapper

class Offloader:
    """Keeps `module`'s weights on the host and brings them to `device` when the module runs (see the header)."""

    def __init__(self, module: nn.Module, device, mode: str, copy: bool | None = None, resident_blocks: int = 0,
                 exclusive: bool = True):
        if mode not in ("model", "blocks"):
            raise ConfigError(f"offload mode {mode!r}: Offloader takes 'model' or 'blocks' ('none' needs no wrapper)")
        self.module, self.mode = module, mode
        self.device = torch.device(device)
        self.copy = self.device.type != "cpu" if copy is None else bool(copy)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        blocks = find_blocks(module)  # in forward order: the streaming schedule
        if mode == "blocks" and not blocks:
            raise ConfigError(f"offload 'blocks' needs a model with transformer blocks; {type(module).__name__} has "
                              "none: use offload 'model' for it")
        inside = {id(m) for b in blocks for m in b.modules()}
        base = [m for m in module.modules() if id(m) not in inside]
        self.base = _Unit(base, pin, "base")
        self.blocks = [_Unit(list(b.modules()), pin, f"block {i}") for i, b in enumerate(blocks)]
        self.block_modules = blocks
        self.stream_ids = self._choose_streamed(resident_blocks)  # used in the blocks state (either mode can enter it)
        self.exclusive = exclusive  # activating moves the device's other Offloaders out (off when a host manages it)
        self.sync = _Sync(self.device)
        self.state = "host"
        self.resident: dict[int, torch.Tensor] = {}  # unit index (-1 = base) -> its own device buffer
        self._slots: list[torch.Tensor] = []
        self._slot_holder: list[int | None] = [None, None]
        self._ready = [self.sync.event(), self.sync.event()]
        self._free = [self.sync.event(), self.sync.event()]
        self._last_slot = 1
        self.stalls = 0  # blocks that were not prefetched (loaded when already needed): 1 per first forward
        self._hooks = self._install_hooks()
        _ACTIVE.setdefault(str(self.device), []).append(weakref.ref(self))
        log.info("fluxcore: offload %s for %s on %s: %.2f GB on the host, %d of %d blocks streamed",
                 mode, type(module).__name__, self.device, self.host_bytes / 1e9,
                 len(self.stream_ids) if mode == "blocks" else 0, len(blocks))

    # -------------------------------------------------------------------------------------------- sizes
    @property
    def host_bytes(self) -> int:
        return self.base.nbytes + sum(u.nbytes for u in self.blocks)

    def device_bytes(self, state: str | None = None) -> int:
        """Weight bytes on the device in `state` (default: the current one)."""
        state = state or self.state
        if state == "host":
            return 0
        if state == "resident":
            return self.host_bytes
        streamed = set(self.stream_ids)
        kept = sum(u.nbytes for i, u in enumerate(self.blocks) if i not in streamed)
        slot = max((self.blocks[i].nbytes for i in streamed), default=0)
        return self.base.nbytes + kept + 2 * slot

    def _choose_streamed(self, resident_blocks: int) -> list[int]:
        """Which blocks stream: all but `resident_blocks`, the kept ones spread evenly so that every streamed copy
        overlaps the compute of the blocks before it."""
        n = len(self.blocks)
        keep = max(0, min(int(resident_blocks), n))
        kept = {round((k + 0.5) * n / keep - 0.5) for k in range(keep)} if keep else set()
        return [i for i in range(n) if i not in kept]

    # -------------------------------------------------------------------------------------------- state changes
    def to_state(self, state: str) -> None:
        """host | resident | blocks. Entering a device state moves every other Offloader on the device to host."""
        if state == self.state:
            return
        if state != "host" and self.exclusive:
            for ref in list(_ACTIVE.get(str(self.device), [])):
                other = ref()
                if other is not None and other is not self and other.state != "host":
                    other.to_state("host")
        self.sync.synchronize()  # nothing may still read a buffer that is about to be dropped
        with torch.inference_mode(False), torch.no_grad():
            if state == "host":
                self._drop_device()
            elif state == "resident":
                self._drop_slots()
                for i in [-1] + list(range(len(self.blocks))):
                    self._make_resident(i)
            else:
                keep = set(range(len(self.blocks))) - set(self.stream_ids)
                for i in list(self.resident):
                    if i != -1 and i not in keep:
                        self._unresident(i)
                for i in [-1] + sorted(keep):
                    self._make_resident(i)
                self._make_slots()
        self.state = state

    def activate(self) -> None:
        self.to_state("resident" if self.mode == "model" else "blocks")

    def _unit(self, i: int) -> _Unit:
        return self.base if i == -1 else self.blocks[i]

    def _make_resident(self, i: int) -> None:
        unit = self._unit(i)
        if i in self.resident:
            return
        if not self.copy:
            return  # CPU without copies: the host buffer is the device buffer
        buf = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
        buf.copy_(unit.host, non_blocking=True)
        self.resident[i] = buf
        unit.bind(buf)

    def _unresident(self, i: int) -> None:
        unit = self._unit(i)
        buf = self.resident.pop(i, None)
        unit.bind(unit.host)
        if buf is not None:
            unit.forget(buf)

    def _drop_device(self) -> None:
        for i in list(self.resident):
            self._unresident(i)
        self._drop_slots()

    def _make_slots(self) -> None:
        if self._slots or not self.stream_ids:
            return
        size = max(self.blocks[i].nbytes for i in self.stream_ids)
        if self.copy:
            self._slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._slot_holder = [None, None]

    def _drop_slots(self) -> None:
        for s in self._slots:
            for u in self.blocks:
                u.forget(s)
        self._slots = []
        self._slot_holder = [None, None]

    # -------------------------------------------------------------------------------------------- streaming
    def _load(self, i: int, slot: int) -> None:
        """Queue block i's copy into `slot` (after the slot's last reader finished)."""
        unit = self.blocks[i]
        dst = self._slots[slot][:unit.nbytes]
        self.sync.copy_async(dst, unit.host, self._free[slot], self._ready[slot])
        self._slot_holder[slot] = i

    def _next_streamed(self, i: int) -> int:
        ids = self.stream_ids
        after = [j for j in ids if j > i]
        return after[0] if after else ids[0]

    def _before_block(self, i: int) -> None:
        if self.state != "blocks" or i not in self.stream_ids or not self.copy:
            return
        if i in self._slot_holder:
            slot = self._slot_holder.index(i)
        else:  # not prefetched (first call, or the caller skipped blocks): load it now, in the slot not just used
            slot = 1 - self._last_slot
            self._load(i, slot)
            self.stalls += 1
        self.sync.wait(self._ready[slot])
        unit = self.blocks[i]
        unit.bind(self._slots[slot][:unit.nbytes])
        self._last_slot = slot
        nxt = self._next_streamed(i)
        if nxt != i and nxt not in self._slot_holder:
            self._load(nxt, 1 - slot)

    def _after_block(self, i: int) -> None:
        if self.state != "blocks" or i not in self.stream_ids or not self.copy:
            return
        slot = self._slot_holder.index(i)
        self.sync.record(self._free[slot])
        self.blocks[i].bind(self.blocks[i].host)

    # -------------------------------------------------------------------------------------------- hooks
    def _install_hooks(self) -> list:
        """Entry points activate the component: a VAE's encode / decode methods (tiled passes call the encoder's
        and decoder's parts, not their forward), else the module's forward; blocks get the streaming hooks."""
        undo = []
        if all(callable(getattr(self.module, n, None)) for n in ENTRY_METHODS) and hasattr(self.module, "decoder"):
            for name in ENTRY_METHODS:
                undo.append(self._wrap_method(name))
        else:
            undo.append(self.module.register_forward_pre_hook(self._on_entry, with_kwargs=True).remove)
        if self.block_modules:
            for i, b in enumerate(self.block_modules):
                undo.append(b.register_forward_pre_hook(lambda _m, _a, i=i: self._before_block(i)).remove)
                undo.append(b.register_forward_hook(lambda _m, _a, _o, i=i: self._after_block(i)).remove)
        return undo

    def _wrap_method(self, name: str):
        orig = getattr(self.module, name)

        def entry(*args, **kwargs):
            self.activate()
            return orig(*args, **kwargs)

        self.module.__dict__[name] = entry  # an instance attribute shadows the class method
        return lambda: self.module.__dict__.pop(name, None)

    def _on_entry(self, _module, args, kwargs):
        self.activate()
        return _to_device(args, self.device), _to_device(kwargs, self.device)

    def remove(self, state: str = "resident") -> nn.Module:
        """Undo the wrapper: leave the module plainly on the device (`resident`) or on the host (`host`)."""
        self.to_state("host")
        for undo in self._hooks:
            undo()
        self._hooks = []
        lst = _ACTIVE.get(str(self.device), [])
        lst[:] = [r for r in lst if r() is not None and r() is not self]
        if getattr(self.module, "_fluxcore_offload", None) is self:
            del self.module._fluxcore_offload
        with torch.inference_mode(False), torch.no_grad():
            for u in [self.base] + self.blocks:  # private copies, so the host buffers can go
                for e in u.entries:
                    t = getattr(e.module, e.name)
                    v = t.to(self.device) if state == "resident" else t.clone()
                    if e.is_param:
                        e.module._parameters[e.name].data = v
                    else:
                        e.module._buffers[e.name] = v
        return self.module


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, (list, tuple)):
        out = [_to_device(o, device) for o in obj]
        return type(obj)(out) if not hasattr(obj, "_fields") else type(obj)(*out)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. Z-Image's RoPE cache
        return dataclasses.replace(obj, **{f.name: _to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


# ------------------------------------------------------------------------------------------------ entry point

def offload(module: nn.Module, device, mode: str, copy: bool | None = None, resident_blocks: int = 0,
            exclusive: bool = True):
    """Wrap `module` for `mode` (none | model | blocks); returns the Offloader (None for 'none').

    The module may come in on any device; afterwards its weights live on the host and come to `device` on use."""
    if mode not in MODES:
        raise ConfigError(f"unknown offload mode {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return None
    existing = getattr(module, "_fluxcore_offload", None)
    if existing is not None:
        raise ConfigError(f"{type(module).__name__} is already offloaded ({existing.mode}); remove() it first")
    off = Offloader(module, device, mode, copy=copy, resident_blocks=resident_blocks, exclusive=exclusive)
    module._fluxcore_offload = off
    return off


def offloader_of(module) -> Offloader | None:
    return getattr(module, "_fluxcore_offload", None)
