"""Run folders: every result a method produces, saved as it is made, so a killed run resumes.

A step is saved atomically (write to a uniquely named temporary file, then rename) under a key;
calling a step whose key is already saved with the same settings loads it instead of recomputing
it. :func:`open_run_folder` checks a folder is writable and locks it for one run at a time: a
second run on the same folder waits, then resumes from what the first saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from .distributed import concat_shares, decide, is_main, ranks, split_map

T = TypeVar("T")


def environment() -> dict[str, Any]:
    """Where a run ran: Python, the versions of the packages that set its floats, the CPU.

    Recorded in every summary a run writes (study, organism recipe): training trajectories and
    timings differ between machines and library versions, and a reader needs to know which.
    """
    versions = {}
    for pkg in ("circuitdiff", "torch", "transformers", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "?"
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"python": platform.python_version(), "versions": versions,
            "machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count()}


def settings_digest(settings, length: int = 16) -> str:
    """Hex sha256 of ``settings`` as sorted JSON (the one digest every cache key uses)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def safe_name(name: str) -> str:
    """``name`` with every character unsafe in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_") or "unnamed"


def model_tag(name: str) -> str:
    """A file-name-safe, collision-free tag for a model name: its last path component + hash."""
    short = re.sub(r"[^A-Za-z0-9_.+-]+", "_", name.rstrip("/").rsplit("/", 1)[-1]).strip("_")
    return f"{short[-60:] or 'model'}-{hashlib.sha1(name.encode()).hexdigest()[:6]}"


class RunFolderError(ValueError):
    """A run folder that cannot be used (a file, not writable); the message names the fix."""


def temp_path(path: str | Path) -> Path:
    """A temporary name beside ``path``, unique to this process and call (no two writers race)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a killed run never leaves half a file. Under
    ``torchrun`` only rank 0 writes (the other ranks hold the same result and skip the write)."""
    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_out_folder(path: str | Path) -> None:
    """Error (before any work) unless ``path`` is, or can become, a writable folder."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise RunFolderError(f"--out {path} is a file, not a folder; pass a folder path")
    probe = p if p.exists() else next((q for q in p.parents if q.exists()), Path("."))
    if not probe.is_dir():
        raise RunFolderError(f"--out {path}: {probe} is a file, not a folder; pass a folder path")
    try:  # os.access is not enough (root, read-only mounts): really write a probe file
        fd, name = _probe_file(probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise RunFolderError(f"--out {path} is not writable ({e.strerror}); pass a folder you "
                             f"can write to") from None


def _probe_file(folder: Path) -> tuple[int, str]:
    import tempfile

    return tempfile.mkstemp(prefix=".circuitdiff-probe-", dir=folder)


@contextlib.contextmanager
def open_run_folder(path: str | Path, wait: bool = True) -> Iterator[Path]:
    """Check ``path``, create it, and hold an exclusive lock on it for the block.

    A second run on the same folder waits for the first (``wait``) or fails with a message; it
    then resumes from the first run's saved results. A folder this call created is removed again
    if the block fails and left it empty (bad input leaves nothing behind).
    """
    import fcntl

    if not is_main():  # under torchrun rank 0 alone creates, locks and writes the folder
        yield Path(path).expanduser()
        return
    check_out_folder(path)
    p = Path(path).expanduser()
    created = not p.exists()
    p.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise RunFolderError(f"another circuitdiff run is using {path}; wait for it or "
                                     f"pass another --out") from None
            print(f"another circuitdiff run is using {path}; waiting for it to finish...",
                  file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield p
        except BaseException:
            if created and not any(f.is_file() for f in p.rglob("*")):
                import shutil

                shutil.rmtree(p)  # only empty folders: nothing half-written is left
            raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class RunFolder:
    """A folder of JSON and safetensors results, each tagged with the settings that made it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if is_main():  # under torchrun the other ranks never touch the folder
            self.path.mkdir(parents=True, exist_ok=True)

    def file(self, name: str) -> Path:
        return self.path / name

    # -- JSON -------------------------------------------------------------------------------
    def save_json(self, name: str, obj: Any) -> Path:
        return atomic_write_text(self.file(name), json.dumps(obj, indent=2, default=str))

    def load_json(self, name: str) -> Any:
        return json.loads(self.file(name).read_text())

    # -- tensors ----------------------------------------------------------------------------
    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor],
                     settings: dict | None = None) -> Path:
        from safetensors.torch import save_file

        p = self.file(name)
        if not is_main():
            return p
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(p)
        meta = {"settings": _tensor_settings(settings)}
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata=meta)
            tmp.replace(p)
        finally:
            tmp.unlink(missing_ok=True)
        return p

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.file(name)))

    # -- resumable steps ---------------------------------------------------------------------
    def saved_result(self, name: str, settings: dict) -> tuple[bool, Any]:
        """``(True, result)`` when ``name`` holds a result saved with equal ``settings`` (read on
        rank 0 only: the other ranks never touch the folder), else ``(False, None)``."""
        p = self.file(name)
        if is_main() and p.exists():
            saved = self.load_json(name)
            if isinstance(saved, dict) and saved.get("_settings_digest") == settings_digest(
                    settings):
                return True, saved["result"]
        return False, None

    def saved_tensors(self, name: str, settings: dict) -> dict[str, torch.Tensor] | None:
        """The tensors of ``name`` when saved with equal ``settings`` (rank 0 only), else None."""
        from safetensors import safe_open

        p = self.file(name)
        if is_main() and p.exists():
            with safe_open(str(p), "pt") as f:
                if (f.metadata() or {}).get("settings") == _tensor_settings(settings):
                    return {k: f.get_tensor(k) for k in f.keys()}
        return None

    def cached(self, name: str, settings: dict, compute: Callable[[], Any]) -> Any:
        """JSON result of ``compute()``, loaded from ``name`` if saved with equal ``settings``
        (under ``torchrun``: rank 0 decides and hands the saved result to every rank)."""
        hit, result = decide(self.saved_result(name, settings))
        if hit:
            return result
        result = compute()
        self.save_json(name, {"_settings_digest": settings_digest(settings), "settings": settings,
                              "result": result})
        return result

    def cached_tensors(self, name: str, settings: dict,
                       compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Tensors from ``compute()``, loaded from ``name`` if saved with equal ``settings``."""
        saved = decide(self.saved_tensors(name, settings))
        if saved is not None:
            return saved
        out = compute()
        self.save_tensors(name, out, settings)
        return out


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Silence tqdm bars (ours and transformers' weight-loading bars) for the block, then
    restore the setting: what ``--quiet``/``--json`` and ``progress=False`` promise."""
    from transformers.utils import logging as hf_logging

    old = os.environ.get("TQDM_DISABLE")
    was_enabled = hf_logging.is_progress_bar_enabled()
    os.environ["TQDM_DISABLE"] = "1"
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old
        if was_enabled:
            hf_logging.enable_progress_bar()


def _tensor_settings(settings: dict | None) -> str:
    """How a safetensors file's metadata holds the settings it was saved with."""
    return json.dumps(settings or {}, sort_keys=True, default=str)


class RankView(RunFolder):
    """A rank's run folder while it computes its share of a :func:`split_pieces` alone.

    Rank 0 reads and writes the folder itself. Another rank reads from ``snapshot`` (rank 0's
    saved files under the split's prefixes, handed out before the split) and keeps what it
    would save in ``writes``, which rank 0 saves once the pieces are gathered — so a piece
    cached by a killed run is reused whichever rank it falls to, and the folder ends up as one
    process leaves it. What another rank saves travels to rank 0 through the gather (for CMAP
    that includes its recorded activations); a rank killed mid-split loses its unsaved share,
    rank 0's pieces are saved as they are made.
    """

    def __init__(self, folder: RunFolder, snapshot: dict[str, Any]):
        self.path = folder.path
        self.snapshot = snapshot
        self.writes: list[tuple[str, Any, dict | None]] = []

    def saved_result(self, name: str, settings: dict) -> tuple[bool, Any]:
        if is_main():
            return super().saved_result(name, settings)
        saved = self.snapshot.get(name)
        if isinstance(saved, dict) and saved.get("_settings_digest") == settings_digest(settings):
            return True, saved["result"]
        return False, None

    def saved_tensors(self, name: str, settings: dict) -> dict[str, torch.Tensor] | None:
        if is_main():
            return super().saved_tensors(name, settings)
        saved = self.snapshot.get(name)
        if isinstance(saved, tuple) and saved[0] == _tensor_settings(settings):
            return saved[1]
        return None

    def save_json(self, name: str, obj: Any) -> Path:
        if is_main():
            return super().save_json(name, obj)
        self.writes.append((name, obj, None))
        return self.file(name)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor],
                     settings: dict | None = None) -> Path:
        if is_main():
            return super().save_tensors(name, tensors, settings)
        self.writes.append((name, {k: v.detach().cpu() for k, v in tensors.items()},
                            settings or {}))
        return self.file(name)


def _snapshot(folder: RunFolder, prefixes: Sequence[str]) -> dict[str, Any]:
    """Rank 0's saved JSON (as saved) and safetensors ((settings, tensors)) files whose path
    in ``folder`` starts with one of ``prefixes``."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    if not is_main() or not folder.path.exists():
        return out
    for p in sorted(folder.path.rglob("*")):
        rel = p.relative_to(folder.path).as_posix()
        if not p.is_file() or not any(rel.startswith(x) for x in prefixes):
            continue
        if p.suffix == ".json":
            try:
                out[rel] = json.loads(p.read_text())
            except ValueError:
                continue
        elif p.suffix == ".safetensors":
            with safe_open(str(p), "pt") as f:
                out[rel] = ((f.metadata() or {}).get("settings"),
                            {k: f.get_tensor(k) for k in f.keys()})
    return out


def split_pieces(folder: RunFolder | None, n: int,
                 compute: Callable[[int, "RunFolder | None"], T],
                 cached_under: Sequence[str] = (),
                 then: Callable[[int, T], None] | None = None) -> list[T]:
    """``[compute(i, folder) for i in range(n)]``, the pieces split over the ranks; ``then(i,
    piece)`` (a log line, a figure) follows each piece in index order.

    One process: exactly that, ``then`` right after each piece. Under ``torchrun`` each rank
    computes its contiguous share :func:`~circuitdiff.core.distributed.alone` (see
    :func:`~circuitdiff.core.distributed.split_map`) with a :class:`RankView` of ``folder`` in
    its place: the cached results under the prefixes ``cached_under`` (where ``compute`` caches)
    are reused on any rank, and rank 0 saves the other ranks' new results after the gather. The
    values come back in index order on every rank, and ``then`` runs on them after the gather.
    """
    then = then or (lambda i, piece: None)
    if ranks().world == 1:
        out = []
        for i in range(n):
            out.append(compute(i, folder))
            then(i, out[-1])
        return out
    view = None
    if folder is not None:
        view = RankView(folder, decide(_snapshot(folder, cached_under) if is_main() else None))
    results = split_map(n, lambda i: compute(i, view))
    if view is not None:
        for name, obj, settings in concat_shares(view.writes):
            if settings is None:
                folder.save_json(name, obj)
            else:
                folder.save_tensors(name, obj, settings)
    for i, piece in enumerate(results):
        then(i, piece)
    return results
