"""Several LoRA adapters of one base served by one ONNX decoder, rows of different adapters in one batch.

    backend = LoraOrtBackend("exports/team/onnx", "auto", manifest_dir="exports/team")   # factory.load_backend
    logits, state = backend.prefill(ids, mask, capacity, adapters=["sentiment", None])    # None: the bare base
    backend.load_adapter("support", "exports/support.onnx_adapter"); backend.unload_adapter("sentiment")

The graph (lite_sft/adapters.py, export/lora_graph.py) takes, per site, a bank `lora.SITE.A` (in, R) and
`lora.SITE.B` (R, out), and a (batch, R) `lora_mask`. Here a bank holds every loaded adapter's columns side by side
(Bank); an adapter that does not train a site has zeros there. The banks live on the device and are bound once
per bank version to a state's IO binding; each step binds only the mask, built from each row's adapter (the state
carries them through keep and join). A base row's mask is all zeros; with no adapter loaded the banks keep one
zero column (R >= 1: a zero-width input is not something every provider takes).

Loading and unloading build a new Bank (a new version) from the current one's tensors, so an adapter's weights are
held once, in the banks; the engine calls them between two steps, never under a
running one, so the buffers a step reads stay alive until it ends. Columns move when an adapter before them
goes: a row's columns are looked up by its adapter's name at every step, not kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lite_sft.adapters import (ADAPTER_SUFFIX, MANIFEST_FILE, MASK_INPUT, Site, input_names, read_adapter_file,
                              read_manifest, site_targets)
from lite_sft.errors import AdapterConflict, ServeError, UnknownAdapter

from .devices import NP_TYPES, ORT_TYPES
from .ort import OrtBackend, OrtState

BASE = "base"
"""The name a request gives for the bare base model."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Adapter:
    """One loaded adapter: its weights per site (float32 on the host) and where it came from."""

    name: str
    rank: int
    sites: dict[str, dict]
    """{site: {"A": (in, r), "B": (r, out)}}: the sites it trains, until its columns are in the banks (then {})."""
    path: str
    targets: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {"rank": self.rank, "targets": self.targets}


def check_adapter(name: str, sites: dict[str, dict], graph: dict[str, Site], path: Path) -> Adapter:
    """An Adapter from a file's weights, when every one fits a site of the graph with one rank; else one
    ServeError naming the adapter and what differs."""
    if not NAME.match(name) or name == BASE:
        raise ServeError(f"adapter name {name!r}: use 1 to 64 letters, digits, '.', '_' or '-' (and not {BASE!r})")
    unknown = sorted(set(sites) - set(graph))
    if unknown:
        raise ServeError(f"adapter {name!r} ({path}) trains {', '.join(unknown[:3])}, which this base graph has no "
                         f"LoRA branch for (it has {len(graph)} sites, e.g. {next(iter(graph), 'none')}): "
                         "export it together with the base's other adapters")
    ranks = {pair["A"].shape[1] for pair in sites.values()}
    if len(ranks) != 1:
        raise ServeError(f"adapter {name!r} ({path}) has sites of ranks {sorted(ranks)}: one adapter has one rank")
    for site, pair in sites.items():
        want = (graph[site].fan_in, graph[site].fan_out)
        have = (pair["A"].shape[0], pair["B"].shape[1])
        if have != want:
            raise ServeError(f"adapter {name!r} ({path}): site {site} is {have[0]} -> {have[1]}, the base graph's is "
                             f"{want[0]} -> {want[1]}: it was trained on another base")
    targets = site_targets(sites)
    return Adapter(name, ranks.pop(), sites, str(path), targets)


def graph_sites(inputs: dict) -> dict[str, Site]:
    """{site: Site} of a graph with LoRA branches, from its session's inputs by name (lora.SITE.A, lora.SITE.B)."""
    sites = {}
    for name, value in inputs.items():
        match = re.fullmatch(r"lora\.(.+)\.A", name)
        if match:
            b = inputs[input_names(match.group(1))[1]]
            sites[match.group(1)] = Site(match.group(1), value.shape[0], b.shape[1])
    return sites


class Bank:
    """Every loaded adapter's columns, per site, as device tensors: one version of the banks. Immutable: adding or
    dropping an adapter makes a new Bank from this one's tensors, so the adapters' weights are held once (in the
    banks), not also per adapter on the host."""

    def __init__(self, graph: dict[str, Site], dtype: torch.dtype, device: torch.device, version: int = 0,
                 columns: dict[str, tuple[int, int]] | None = None, tensors: dict[str, torch.Tensor] | None = None):
        self.graph, self.dtype, self.device, self.version = graph, dtype, device, version
        self.columns = dict(columns or {})
        self.used = max((hi for _, hi in self.columns.values()), default=0)
        self.width = max(1, self.used)  # R >= 1: one zero column when nothing is loaded
        if tensors is None:
            tensors = {}
            for site in graph.values():
                a_name, b_name = input_names(site.name)
                tensors[a_name] = torch.zeros(site.fan_in, self.width, dtype=dtype, device=device)
                tensors[b_name] = torch.zeros(self.width, site.fan_out, dtype=dtype, device=device)
        self.tensors = tensors

    def with_adapters(self, adapters: list[Adapter]) -> Bank:
        """A new version with the adapters' columns after the others (zeros at the sites one does not train).
        Each tensor is written once into its new size: the server's start adds all the manifest's adapters in one
        go, as one bank grown adapter by adapter left the freed smaller banks scattered over the heap (measured:
        RSS 2.2x the adapters' bytes for 16 loaded one by one)."""
        columns, width = dict(self.columns), self.used
        for adapter in adapters:
            columns[adapter.name] = (width, width + adapter.rank)
            width += adapter.rank
        tensors = {}
        for site in self.graph.values():
            a_name, b_name = input_names(site.name)
            a = torch.zeros(site.fan_in, max(1, width), dtype=self.dtype, device=self.device)
            b = torch.zeros(max(1, width), site.fan_out, dtype=self.dtype, device=self.device)
            a[:, :self.used], b[:self.used] = self.tensors[a_name][:, :self.used], self.tensors[b_name][:self.used]
            for adapter in adapters:
                pair = adapter.sites.get(site.name)
                if pair is not None:
                    lo, hi = columns[adapter.name]
                    a[:, lo:hi], b[lo:hi] = self._device(pair["A"]), self._device(pair["B"])
            tensors[a_name], tensors[b_name] = a, b
        return Bank(self.graph, self.dtype, self.device, self.version + 1, columns, tensors)

    def without(self, name: str) -> Bank:
        """A new version without `name`'s columns; the columns after them move down."""
        lo, hi = self.columns[name]
        columns = {other: (a - (hi - lo) if a >= hi else a, b - (hi - lo) if a >= hi else b)
                   for other, (a, b) in self.columns.items() if other != name}
        if not columns:
            return Bank(self.graph, self.dtype, self.device, self.version + 1)
        keep = torch.cat([torch.arange(0, lo), torch.arange(hi, self.used)]).to(self.device)
        tensors = {}
        for site in self.graph.values():
            a_name, b_name = input_names(site.name)
            tensors[a_name] = self.tensors[a_name].index_select(1, keep).contiguous()
            tensors[b_name] = self.tensors[b_name].index_select(0, keep).contiguous()
        return Bank(self.graph, self.dtype, self.device, self.version + 1, columns, tensors)

    def _device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device=self.device, dtype=self.dtype)

    def mask(self, rows: list[str | None], dtype) -> np.ndarray:
        """(batch, R): ones on the columns of each row's adapter."""
        out = np.zeros((len(rows), self.width), dtype)
        for i, name in enumerate(rows):
            if name is not None:
                if name not in self.columns:
                    raise UnknownAdapter(f"adapter {name!r} is not loaded")
                lo, hi = self.columns[name]
                out[i, lo:hi] = 1
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class BankedAdapters:
    """Serving adapters from banks (Bank), what LoraOrtBackend and lora_encoder.py's LoraEncoderBackend share: the
    adapters by name, and adding or dropping one's columns. A class using it sets `adapters` ({}) and `bank`, and
    reads a file in its own read_adapter."""

    adapters: dict[str, Adapter]
    bank: Bank

    def _open_banks(self, session, manifest_dir: Path) -> dict:
        """Check the graph takes LoRA banks, read the manifest, start with empty banks (on self.device); the
        graph's inputs by name."""
        inputs = {i.name: i for i in session.get_inputs()}
        if MASK_INPUT not in inputs:
            raise ServeError(f"{self.folder} has {manifest_dir / MANIFEST_FILE} but its graph has no {MASK_INPUT} "
                             "input: export the runs again (`lite-sft export RUN_A RUN_B --out OUT`)")
        self.lora_dtype = ORT_TYPES[inputs[MASK_INPUT].type]
        self.graph_sites = graph_sites(inputs)
        self.manifest = read_manifest(manifest_dir)
        self.adapters, self.bank = {}, Bank(self.graph_sites, self.lora_dtype, self.device)
        return inputs

    def _manifest_files(self, manifest_dir: Path) -> list[tuple]:
        """(entry, its checked file) for every adapter the manifest names: the file's rank and targets must be the
        manifest's, and a name may appear once."""
        read: list[tuple] = []
        for entry in self.manifest.adapters:
            if entry.name in {e.name for e, _ in read}:
                raise ServeError(f"{MANIFEST_FILE} names adapter {entry.name!r} twice: rename one at export (--name)")
            adapter = self._check_file(entry.name, manifest_dir / entry.file)
            if adapter.rank != entry.rank or set(adapter.targets) != set(entry.targets):
                raise ServeError(f"adapter {entry.name!r}: {entry.file} holds rank {adapter.rank} on "
                                 f"{', '.join(adapter.targets)}, {MANIFEST_FILE} says rank {entry.rank} on "
                                 f"{', '.join(entry.targets)}: export the runs again")
            read.append((entry, adapter))
        return read

    def served_adapters(self) -> dict[str, dict]:
        """{name: its description (rank, targets, ...)} of the adapters loaded, in bank order."""
        return {name: adapter.describe() for name, adapter in self.adapters.items()}

    def read_adapter(self, name: str, path: str | Path) -> Adapter:
        """Read and check an adapter file, changing nothing (any thread may call it): the class's own."""
        raise NotImplementedError

    def add_adapter(self, adapter: Adapter) -> dict:
        """Put a read adapter's columns in the banks; call between steps (the engine does). Its description."""
        self._free(adapter.name)
        self._add([adapter])
        return adapter.describe()

    def load_adapter(self, name: str, path: str | Path) -> dict:
        """read_adapter, then add_adapter."""
        return self.add_adapter(self.read_adapter(name, path))

    def _free(self, name: str) -> None:
        if name in self.adapters:
            raise AdapterConflict(f"adapter {name!r} is already served: unload it first (DELETE /v1/adapters/{name})"
                                  " or pick another name")

    def unload_adapter(self, name: str) -> None:
        """Drop an adapter's columns; call between steps, once no row uses it (the engine sees to both)."""
        if name not in self.adapters:
            raise UnknownAdapter(f"adapter {name!r} is not served; served: {', '.join(self.adapters) or 'none'}")
        self.bank = self.bank.without(name)
        # A new dict, never one changed in place: the HTTP threads read it while the engine's worker changes it.
        self.adapters = {key: value for key, value in self.adapters.items() if key != name}
        _trim()

    def adapter_bytes(self) -> int:
        """The banks' bytes on the device (what the adapters add to the base)."""
        return self.bank.nbytes()

    def _add(self, adapters: list[Adapter]) -> None:
        self.bank = self.bank.with_adapters(adapters)
        for adapter in adapters:
            adapter.sites = {}  # its weights live in the banks now; a host copy would double the adapters' memory
        self.adapters = {**self.adapters, **{a.name: a for a in adapters}}  # a new dict: see unload_adapter
        _trim()

    def _check_file(self, name: str, path: Path) -> Adapter:
        """An Adapter from the file at `path`, checked against this graph's sites (check_adapter)."""
        if path.suffix != ADAPTER_SUFFIX and path.is_file():
            raise ServeError(f"adapter {name!r}: {path} is not an {ADAPTER_SUFFIX} file (onnxruntime's adapter format, "
                             "as `lite-sft export RUN_A RUN_B --out OUT` writes under OUT/adapters/)")
        try:
            sites = read_adapter_file(path)
        except ServeError as err:
            raise ServeError(f"adapter {name!r}: {err}") from err
        return check_adapter(name, sites, self.graph_sites, path)


class LoraOrtBackend(BankedAdapters, OrtBackend):
    """An OrtBackend over a graph with LoRA branches: each row runs the base plus its own adapter (or none)."""

    def __init__(self, folder: str | Path, device: str = "auto", threads: int | None = None, *,
                 manifest_dir: str | Path):
        super().__init__(folder, device, threads)
        self._open_banks(self.session, Path(manifest_dir))
        self._add([adapter for _, adapter in self._manifest_files(Path(manifest_dir))])

    # -- the adapters served ----------------------------------------------------------------------------------

    def read_adapter(self, name: str, path: str | Path) -> Adapter:
        """Read and check an adapter file, changing nothing: any thread may call it (the server reads on one of
        its own, so a large file never holds up the decode steps)."""
        self._free(name)
        return self._check_file(name, Path(path))

    def describe(self) -> str:
        return (super().describe() + f", {len(self.adapters)} LoRA adapter" + ("s" if len(self.adapters) != 1 else "")
                + (f" ({', '.join(self.adapters)})" if self.adapters else ""))

    # -- the calls --------------------------------------------------------------------------------------------

    def prefill(self, ids: np.ndarray, mask: np.ndarray, capacity: int,
                adapters: list[str | None] | None = None) -> tuple[np.ndarray, OrtState]:
        """As OrtBackend's, each row with its adapter (None, or no list: the base)."""
        rows = list(adapters) if adapters is not None else [None] * ids.shape[0]
        if len(rows) != ids.shape[0]:
            raise ServeError(f"{len(rows)} adapters for {ids.shape[0]} rows")
        self.bank.mask(rows, np.float32)  # an unknown name fails here, before any buffer is taken
        return self._prefill(ids, mask, capacity, rows)

    def _bind_more(self, state: OrtState, binding) -> None:
        bank = self.bank
        if state.bank != bank.version:  # the banks are bound once per version, not every step
            for name, tensor in bank.tensors.items():
                self._bind(binding, name, tensor)
            state.bank = bank.version
        binding.bind_cpu_input(MASK_INPUT, bank.mask(state.adapters, NP_TYPES[self.lora_dtype]))


def _trim() -> None:
    """Give the freed banks' memory back to the system (glibc's malloc_trim; a no-op elsewhere). Called by hand
    because neither torch nor Python returns freed heap pages: a server that loads and unloads adapters would
    otherwise keep every older bank's size in its RSS (measured, benchmarks/multi_adapter_serving.py: 16 hot
    loads left 18.9 MB of RSS for 8.5 MB of banks, 8.8 MB with the trim)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim this way
            pass
