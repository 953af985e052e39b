"""ComfyUI entry point of the FluxCore node pack (the library itself is `flux_core`, which never imports ComfyUI).

ComfyUI imports this folder as a package: the nodes come in through a relative import, and the folder is appended
to sys.path so that `import flux_core` resolves to the copy shipped beside this file (appended, not prepended, so
nothing here shadows ComfyUI's own top-level modules such as `nodes`).
"""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

WEB_DIRECTORY = "./js"

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError:
    if __package__:  # inside ComfyUI: let it log the real cause ("Cannot import ... module for custom nodes")
        raise
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}  # imported as a plain module (e.g. by a tool): no pack

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
