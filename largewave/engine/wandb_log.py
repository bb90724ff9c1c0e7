"""Weights & Biases logging for rank 0, plus a reader for offline run files.

* ``run.wandb_mode: auto`` is online when an API key is available (``WANDB_API_KEY`` or a
  ``wandb login`` entry in ``~/.netrc``), offline otherwise; ``WANDB_MODE`` in the environment
  wins over the config, as wandb users expect.
* The run id is created once, stored in every checkpoint and reused on resume. Online, the run
  continues (``resume="allow"``); offline, wandb ignores ``resume`` and each resumed segment gets
  its own ``wandb/offline-run-*-<id>`` folder with the same id, which ``wandb sync`` merges.
* No step is logged twice: ``wandb/last_logged_step`` records the last step that reached wandb.
  After a resume from an earlier checkpoint, steps up to that value are recomputed (bitwise
  identically) but not logged again.
* Whatever the W&B mode (``disabled`` included), rank 0 appends every logged scalar to
  ``metrics.jsonl`` in the run folder, one ``{"step": …, key: value, …}`` line per call, with the
  same rule: steps up to the last one already in the file are not written again after a resume.
  Tools and tests read that file, never W&B's private formats.
"""
from __future__ import annotations

import json
import netrc
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np


def resolve_mode(mode: str) -> str:
    """``auto`` → ``online`` when logged in, else ``offline``. ``WANDB_MODE`` overrides."""
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if mode != "auto":
        return mode
    return "online" if _has_api_key() else "offline"


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai")
                                            .replace("https://", "").replace("http://", "").rstrip("/"))
        return bool(auth and auth[2])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def new_run_id() -> str:
    """An 8-character lowercase alphanumeric id, the shape wandb itself generates."""
    import secrets
    import string

    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def last_metrics_step(path: Path) -> int:
    """The last step written to a ``metrics.jsonl`` (-1 when there is none)."""
    last = -1
    try:
        with open(path) as f:
            for line in f:
                try:
                    last = max(last, int(json.loads(line)["step"]))
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill
    except FileNotFoundError:
        pass
    return last


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.jsonl`` (a line torn by a kill is skipped)."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return rows


HISTOGRAM_BINS = 512  # wandb.Histogram refuses more

class WandbLogger:
    """Rank-0 W&B run. On other ranks (or with mode ``disabled``) every method is a no-op."""

    def __init__(self, *, enabled: bool, run_dir: Path, mode: str, project: str, entity: Optional[str],
                 group: str, name: str, run_id: str, config: dict[str, Any], tags: list[str]):
        self.enabled = enabled and mode != "disabled"
        self.main = enabled
        self.mode = mode
        self.metrics_path = run_dir / "metrics.jsonl"
        self.metrics_floor = last_metrics_step(self.metrics_path) if enabled else -1
        self.run_id = run_id
        self.dir = run_dir / "wandb"
        self._last_file = self.dir / "last_logged_step"
        self.last_logged = -1
        self.floor = -1  # steps <= floor reached wandb in an earlier segment of this run
        self.run = None
        if not self.enabled:
            return
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        if self._last_file.exists():
            self.last_logged = int(self._last_file.read_text().strip() or -1)
            self.floor = self.last_logged
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, id=run_id,
                              resume="allow", dir=str(run_dir), mode=mode, config=config, tags=tags,
                              settings=wandb.Settings(console="off", save_code=False, x_disable_stats=True, quiet=True))

    @property
    def location(self) -> str:
        if not self.enabled or self.run is None:
            return "disabled"
        if self.mode == "online":
            return getattr(self.run, "url", None) or f"online run {self.run_id}"
        return f"{self.run.dir.rsplit('/files', 1)[0]} (offline; `wandb sync` it)"

    def should_log(self, step: int) -> bool:
        # Several calls may log the same step within a segment (training, evaluation, samples);
        # wandb merges them. Steps an earlier segment already logged are not logged again.
        return self.enabled and step > self.floor

    def log(self, step: int, data: dict[str, Any]) -> None:
        """Log one step's data, once. ``data`` values may be numbers or wandb media objects."""
        if self.main and step > self.metrics_floor and data:
            scalars = {k: float(v) for k, v in data.items()
                       if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)}
            if scalars:
                self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if not self.should_log(step) or not data:
            return
        self.run.log(data, step=step)
        if step == self.last_logged:
            return
        self.last_logged = step
        tmp = self._last_file.with_name(self._last_file.name + ".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, self._last_file)

    def audio(self, wave: np.ndarray, sample_rate: int, caption: str):
        import wandb

        return wandb.Audio(np.asarray(wave, dtype=np.float32), sample_rate=sample_rate, caption=caption)

    def image(self, png_path: Path, caption: str):
        """A wandb.Image from a PNG file, or None: wandb needs Pillow to read images."""
        try:
            import PIL  # noqa: F401
        except ImportError:
            return None
        import wandb

        return wandb.Image(str(png_path), caption=caption)

    def histogram(self, counts: np.ndarray):
        """Per-index counts (e.g. code usage) as a wandb.Histogram; more than 512 indices (K = 2048
        codes) are summed into 512 equal groups, the edges keeping the index scale."""
        import wandb

        counts = np.asarray(counts, dtype=np.float64)
        n = len(counts)
        if n > HISTOGRAM_BINS:
            group = -(-n // HISTOGRAM_BINS)
            padded = np.zeros(group * -(-n // group))
            padded[:n] = counts
            counts = padded.reshape(-1, group).sum(1)
            edges = np.minimum(np.arange(len(counts) + 1, dtype=np.float64) * group, n)
        else:
            edges = np.arange(n + 1, dtype=np.float64)
        return wandb.Histogram(np_histogram=(counts, edges))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


# ---- reading offline runs ------------------------------------------------------------------------


def _wandb_records(path: Path) -> Iterator[bytes]:
    """Raw records of a ``run-<id>.wandb`` file: a 7-byte ``:W&B`` header, then a LevelDB-style
    log of 32 KiB blocks whose records are split into FULL / FIRST / MIDDLE / LAST chunks."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a wandb transaction log")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk


def read_offline_run(folder: str | os.PathLike) -> dict[str, Any]:
    """Parse one offline run folder (``.../wandb/offline-run-*``) without network or wandb's
    service: ``{"run_id", "config", "history": [{key: value, ...} per logged step]}``.
    Nested keys (media) appear as ``"key/field"`` (e.g. ``samples/recon_0/_type``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    folder = Path(folder)
    files = sorted(folder.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{folder}: no run-*.wandb file")
    out: dict[str, Any] = {"run_id": None, "config": {}, "history": []}
    for raw in _wandb_records(files[0]):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            for item in rec.run.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    row[key] = json.loads(item.value_json)
                except ValueError:
                    row[key] = item.value_json
            out["history"].append(row)
    return out


def offline_runs(run_dir: str | os.PathLike) -> list[Path]:
    """Offline segment folders of a run, oldest first."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
