"""Weights & Biases logging for rank 0, and the run's own ``metrics.jsonl``.

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
* The W&B summary keeps the best value of each validation figure (``define_metric``, see
  :data:`BEST`) next to the last one; at the end of a run ``export.pt`` is logged as a model
  Artifact. ``wandb/summary.json`` and ``wandb/export_artifact.json`` in the run folder copy both
  (read through wandb's public run API), so they can be seen without a W&B server.
* System metrics (CPU/GPU utilisation, memory) are on; ``WANDB_X_DISABLE_STATS=true`` turns them off.
"""
from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any, Optional

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

# The validation figures whose best value the W&B summary keeps (with the last): "min" where lower
# is better. Tools that read metrics.jsonl (``largewave runs``) use the same directions.
BEST = {
    "valid/bits_per_token": "min", "valid/bits_per_second": "min", "valid/loss": "min", "valid/loss/nll": "min",
    "valid/uses_codes_gap_bits": "max", "valid/codes_used": "max", "valid/code_perplexity": "max",
    "valid/recon_lsd_db": "min", "valid/recon_flatness_excess_db": "min", "valid/recon_pitch_class_agreement": "max",
}

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
        self._logged_here = False  # this segment logged a step (that the summary must include)
        if not self.enabled:
            return
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        if self._last_file.exists():
            self.last_logged = int(self._last_file.read_text().strip() or -1)
            self.floor = self.last_logged
        self.run = wandb.init(project=project, entity=entity, group=group, name=name, id=run_id,
                              resume="allow", dir=str(run_dir), mode=mode, config=config, tags=tags,
                              settings=wandb.Settings(console="off", save_code=False, quiet=True))
        # System panels (CPU/GPU utilisation, memory) stay on; the tests turn them off through
        # WANDB_X_DISABLE_STATS, which wandb reads from the environment.
        for key, summary in BEST.items():
            self.run.define_metric(key, summary=f"{summary},last")

    @property
    def location(self) -> str:
        if not self.enabled or self.run is None:
            return "disabled"
        if self.mode == "online":
            return getattr(self.run, "url", None) or f"online run {self.run_id}"
        return f"{self.run.dir.rsplit('/files', 1)[0]} (offline; `wandb sync` it)"

    @property
    def path(self) -> Optional[str]:
        """``entity/project/run_id`` online, ``offline:<folder>`` offline, None when disabled."""
        if not self.enabled or self.run is None:
            return None
        if self.mode == "online":
            return "/".join(str(x) for x in (self.run.entity, self.run.project, self.run.id))
        return f"offline:{self.run.dir.rsplit('/files', 1)[0]}"

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
        self._logged_here = True
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

    def log_export(self, path: Path, metadata: dict[str, Any]) -> Optional[dict[str, Any]]:
        """``export.pt`` as a W&B model Artifact (``<stack>-<level>``, aliases ``latest``, ``step-N``
        and the signature), recorded in ``wandb/export_artifact.json``. Offline, ``wandb sync``
        uploads it with the run."""
        if not self.enabled or self.run is None:
            return None
        import re

        import wandb

        name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{metadata['stack']}-{metadata['level']}")
        art = wandb.Artifact(name, type="model", metadata=metadata,
                             description=f"largewave export of {metadata['stack']}/{metadata['level']} "
                                         f"(run {metadata['signature']}, step {metadata['step']})")
        art.add_file(str(path), name="export.pt")
        aliases = ["latest", f"step-{metadata['step']}", str(metadata["signature"])]
        self.run.log_artifact(art, aliases=aliases)
        record = {"name": name, "type": "model", "aliases": aliases, "digest": art.digest,
                  "file": "export.pt", "md5": art.manifest.entries["export.pt"].digest, "metadata": metadata}
        (self.dir / "export_artifact.json").write_text(json.dumps(record, indent=1))
        return record

    def summary(self) -> dict[str, Any]:
        """The run's W&B summary as plain data (best values as ``{"min": …, "last": …}``), read
        through wandb's public ``run.summary``; the pending step is committed first."""
        if self.run is None:
            return {}
        if self._logged_here:
            self.run.log({}, step=self.last_logged, commit=True)

        def plain(value):
            try:
                return {k: plain(value[k]) for k in value.keys()}
            except (AttributeError, TypeError, KeyError):
                return value

        return {k: plain(self.run.summary[k]) for k in self.run.summary.keys()}

    def finish(self) -> None:
        """Finish the W&B run; its summary is also written to ``wandb/summary.json`` (offline runs
        have no summary file of their own)."""
        if self.run is not None:
            try:
                data = self.summary()
                (self.dir / "summary.json").write_text(json.dumps(data, indent=1, default=str))
            except Exception as e:  # the summary copy must never lose the run itself
                print(f"[largewave] W&B summary not written: {e}", flush=True)
            self.run.finish()
            self.run = None
