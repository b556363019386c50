"""The tensors a rounding ships, kept on disk as a walk produces them, so that a walk of several candidates holds
only the current decoder layer's tensors of each in memory (the rest are read back when the exporter asks)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from prismq.errors import PrismqError
from prismq.export.shards import write_safetensors
from prismq.formats import Tensors
from prismq.model.checkpoint import TensorFile

INDEX = "index.json"


def variant_key(name: str, fmt: str, method: str | None = None) -> str:
    """The store key of a target's tensors in a format other than its assignment's (a variant's), with the rounding
    method too where variants of one walk differ in it."""
    return f"{name}|{fmt}" if method is None else f"{name}|{fmt}|{method}"


class EncodedStore(Mapping[str, Tensors]):
    """Linear name -> its shipped tensors (suffix -> tensor). `update` adds tensors, `flush` moves what was added
    since the last flush into one safetensors file of `directory` (created empty: an earlier walk's files there
    are removed). Reading gives the tensors exactly as added."""

    def __init__(self, directory: Path, fresh: bool = True) -> None:
        """`fresh`: start empty (removing what the directory holds); else go on from what its index lists."""
        self.directory = Path(directory)
        self.pending: dict[str, Tensors] = {}
        self.location: dict[str, tuple[Path, tuple[str, ...]]] = {}
        if fresh:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
        elif (self.directory / INDEX).exists():
            self._read_index()
        else:
            self.directory.mkdir(parents=True, exist_ok=True)

    @classmethod
    def reopen(cls, directory: Path) -> EncodedStore:
        """A store written earlier (what its index lists), for reading; a missing or corrupt one is an error."""
        if not (Path(directory) / INDEX).exists():
            raise PrismqError(f"{directory}: the rounded tensors are missing; delete the work directory's "
                              "rounding.json to redo the rounding")
        return cls(directory, fresh=False)

    @classmethod
    def overlay(cls, directory: Path, base: EncodedStore, tensors: Mapping[str, Tensors]) -> EncodedStore:
        """A new store at `directory` holding `tensors` and, for every other Linear of `base`, the base's tensors
        where they lie (its index points into the base's files; nothing is copied, nor are `tensors` when they are
        a flushed store's)."""
        store = cls(directory)
        store.location = {name: place for name, place in base.location.items() if name not in tensors}
        if isinstance(tensors, EncodedStore):
            store.location.update(tensors.location)
            store.pending = dict(tensors.pending)
        else:
            store.pending = dict(tensors)
        if store.pending:
            store.flush()  # writes the index too
        else:
            store._write_index()
        return store

    def _read_index(self) -> None:
        try:
            index = json.loads((self.directory / INDEX).read_text())
            self.location = {name: (self.directory / file, tuple(suffixes)) for name, (file, suffixes) in index.items()}
        except (OSError, ValueError, TypeError) as exc:
            raise PrismqError(f"{self.directory}: the rounded tensors are corrupt ({exc}); delete the work "
                              "directory's rounding.json to redo the rounding") from None
        missing = [path for path, _ in self.location.values() if not path.exists()]
        if missing:
            raise PrismqError(f"{missing[0]} is missing; delete the work directory's rounding.json to redo the "
                              "rounding")

    def update(self, tensors: Mapping[str, Tensors]) -> None:  # type: ignore[override]
        """Add Linears' tensors (kept in memory until the next flush)."""
        self.pending.update(tensors)

    def flush(self) -> None:
        """Write the pending tensors to the next file of the directory and drop them from memory."""
        if not self.pending:
            return
        path = self.directory / f"part-{len(list(self.directory.glob('part-*.safetensors'))):05d}.safetensors"
        flat = {f"{name}::{suffix}": tensor.detach().to("cpu").contiguous()
                for name, tensors in self.pending.items() for suffix, tensor in tensors.items()}
        write_safetensors(path, flat)
        for name, tensors in self.pending.items():
            self.location[name] = (path, tuple(tensors))
        self.pending = {}
        self._write_index()

    def _write_index(self) -> None:
        index = {name: [os.path.relpath(file, self.directory), list(suffixes)]
                 for name, (file, suffixes) in self.location.items()}
        partial = self.directory / f".{INDEX}.partial"
        partial.write_text(json.dumps(index) + "\n")
        os.replace(partial, self.directory / INDEX)  # a kill leaves the old index or the new one, never half

    def __getitem__(self, name: str) -> Tensors:
        if name in self.pending:
            return self.pending[name]
        path, suffixes = self.location[name]
        stored = TensorFile(path)
        return {suffix: stored[f"{name}::{suffix}"] for suffix in suffixes}

    def __contains__(self, name: object) -> bool:
        return name in self.pending or name in self.location

    def __iter__(self) -> Iterator[str]:
        yield from self.location
        yield from (name for name in self.pending if name not in self.location)

    def __len__(self) -> int:
        return len(set(self.location) | set(self.pending))



class PassingStore(Mapping[str, Tensors]):
    """What a rank other than the writer keeps of a divided walk's tensors (`round_lanes`, `measure_variants` on
    several processes): the current layer's until `flush`, then only their names; the writer's store holds them
    all. `known`: tensors there before the walk (the writer's store as it was), read from where they lie."""

    def __init__(self, known: Mapping[str, Tensors] | None = None) -> None:
        self.known: Mapping[str, Tensors] = known if known is not None else {}
        self.pending: dict[str, Tensors] = {}
        self.passed: dict[str, None] = {}  # ordered, as a store's names are

    def update(self, tensors: Mapping[str, Tensors]) -> None:  # type: ignore[override]
        """Add Linears' tensors (kept until the next flush)."""
        self.pending.update(tensors)

    def flush(self) -> None:
        """Forget the pending tensors, remembering their names."""
        self.passed.update(dict.fromkeys(self.pending))
        self.pending = {}

    def __getitem__(self, name: str) -> Tensors:
        if name in self.pending:
            return self.pending[name]
        if name in self.passed:
            raise PrismqError(f"{name}: its tensors were passed on to the writing rank and are not kept here")
        return self.known[name]

    def __contains__(self, name: object) -> bool:
        return name in self.pending or name in self.passed or name in self.known

    def __iter__(self) -> Iterator[str]:
        names = {**dict.fromkeys(self.known), **self.passed, **dict.fromkeys(self.pending)}
        yield from names

    def __len__(self) -> int:
        return len({*self.known, *self.passed, *self.pending})
