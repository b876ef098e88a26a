"""Frozen modules parked on disk while a CPU run trains.

Once every latent and prompt embedding is cached, the steps never read the VAE or a frozen text encoder. On a
GPU they move to the CPU (loop.py); on a CPU there is nowhere cheaper to keep them, so their weights (about
0.8 GB for SD1.5 in fp32) are written once to a safetensors file in the run folder and dropped from memory,
and read back for the sample grids and at the end of the run. The modules keep their parameter objects, so
nothing that holds a reference to them notices.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import cpu_malloc


class ParkedModules:
    """Named modules whose parameters live in `path` while parked."""

    def __init__(self, path: Path, modules: dict[str, torch.nn.Module]):
        self.path = Path(path)
        self.modules = modules
        self.parked = False
        self.written = False

    def _params(self):
        for name, module in self.modules.items():
            for key, param in module.named_parameters():
                yield f"{name}.{key}", param

    def park(self) -> None:
        if self.parked or not self.modules:
            return
        if not self.written:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            save_file({key: p.data.contiguous() for key, p in self._params()}, str(tmp))
            tmp.replace(self.path)
            self.written = True
        for _, param in self._params():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.parked = True
        cpu_malloc.release_free_memory()

    def restore(self) -> None:
        if not self.parked:
            return
        saved = load_file(str(self.path))
        for key, param in self._params():
            param.data = saved[key]
        self.parked = False

    def close(self) -> None:
        """Weights back in memory and the file gone: the modules are as they were before `park`."""
        self.restore()
        self.path.unlink(missing_ok=True)
        self.written = False
