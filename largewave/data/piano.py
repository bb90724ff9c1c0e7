"""The demo piano corpus: MAESTRO performance MIDIs rendered with FluidSynth.

The ``miditok==3.1.0`` source distribution ships ten MAESTRO performances (human timing,
velocities and pedalling; about 170 minutes; CC BY-NC-SA 4.0, so the audio is generated on
the user's machine and never committed). :func:`render_corpus` renders ``minutes`` of them with
the ``fluidsynth`` command-line synthesiser and the MuseScore General soundfont (a sampled
Steinway D) to one FLAC per performance:

* every **performance is one piece** (the shard builder splits train/valid by piece, so no
  performance can be on both sides); to spread ``minutes`` over several performances, each
  is rendered only up to a common length cap (chosen so that the pieces add up to ``minutes``,
  but not shorter than ``min_piece_seconds``), the MIDI cut there with all notes and the pedal
  released and a short tail left to ring out;
* renders are **cached**: a FLAC whose embedded render parameters match the plan is kept;
  everything is written to a temporary name and renamed, so an interrupted run leaves no
  half-written piece.

The small MIDI reader/writer here handles what the renderer needs (tempo map, duration, cutting
a file at a time) for standard MIDI files of format 0 and 1.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from largewave.cache import cache_dir  # noqa: F401  (also piano.cache_dir for callers)

MIDITOK_SDIST = "miditok-3.1.0.tar.gz"
MIDITOK_SHA256 = "1f905b9be87a57dac28a86c1c7a7565674a5d2e57b2f650bc2fea97792f6bdef"
APT_PACKAGES = ("fluidsynth", "musescore-general-soundfont-lossless")
SOUNDFONT_CANDIDATES = (  # lossless first: the .sf3 (Ogg-compressed samples) renders ~3× slower
    "/usr/share/sounds/sf2/MuseScore_General_Full.sf2",
    "/usr/share/sounds/sf2/MuseScore_General.sf2",
    "/usr/share/sounds/sf3/MuseScore_General_Full.sf3",
    "/usr/share/sounds/sf3/MuseScore_General.sf3",
)
RENDER_RATE = 44100
GAIN = 1.2  # fluidsynth master gain: MAESTRO excerpts peak around −6 dBFS with this piano (0.2 default is −20)
TAIL_SECONDS = 2.0  # a cut piece releases its notes this long before its end and rings out
FADE_SECONDS = 0.05


class RenderError(Exception):
    """The demo corpus cannot be rendered (missing tools, no network for the MIDIs, …)."""


# --------------------------------------------------------------------------------------------
# Standard MIDI files: just enough to time and cut a performance
# --------------------------------------------------------------------------------------------


@dataclass
class MidiEvent:
    tick: int  # absolute time in ticks
    data: bytes  # the event without its delta time and without running status: status byte first

    @property
    def status(self) -> int:
        return self.data[0]


@dataclass
class MidiFile:
    format: int
    division: int  # ticks per quarter note
    tracks: list[list[MidiEvent]]

    def tempo_map(self) -> list[tuple[int, int]]:
        """``[(tick, microseconds per quarter)]`` sorted by tick, starting at tick 0."""
        changes = sorted((e.tick, int.from_bytes(e.data[3:6], "big"))
                         for t in self.tracks for e in t
                         if e.data[0] == 0xFF and e.data[1] == 0x51 and len(e.data) >= 6)
        tmap = [(0, 500000)]  # MIDI default: 120 bpm
        for tick, tempo in changes:
            if tick == tmap[-1][0]:
                tmap[-1] = (tick, tempo)
            else:
                tmap.append((tick, tempo))
        return tmap

    def tick_to_seconds(self, tick: int) -> float:
        sec, (last_tick, tempo) = 0.0, (0, 500000)
        for t, tp in self.tempo_map():
            if t >= tick:
                break
            sec += (t - last_tick) * tempo / 1e6 / self.division
            last_tick, tempo = t, tp
        return sec + (tick - last_tick) * tempo / 1e6 / self.division

    def seconds_to_tick(self, seconds: float) -> int:
        sec, (last_tick, tempo) = 0.0, (0, 500000)
        for t, tp in self.tempo_map():
            step = (t - last_tick) * tempo / 1e6 / self.division
            if sec + step > seconds:
                break
            sec += step
            last_tick, tempo = t, tp
        return last_tick + int((seconds - sec) * 1e6 * self.division / tempo)

    def duration(self) -> float:
        """Seconds until the last event of any track."""
        last = max((t[-1].tick for t in self.tracks if t), default=0)
        return self.tick_to_seconds(last)


def _read_varlen(buf: bytes, i: int) -> tuple[int, int]:
    value = 0
    while True:
        b = buf[i]
        i += 1
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, i


def _varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def parse_midi(data: bytes) -> MidiFile:
    """Parse a standard MIDI file (format 0 or 1, ticks-per-quarter timing)."""
    if data[:4] != b"MThd":
        raise ValueError("not a standard MIDI file (no MThd header)")
    hlen = struct.unpack(">I", data[4:8])[0]
    fmt, ntracks, division = struct.unpack(">HHH", data[8:14])
    if division & 0x8000:
        raise ValueError("SMPTE-timed MIDI files are not supported")
    pos = 8 + hlen
    tracks = []
    while len(tracks) < ntracks and pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], struct.unpack(">I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        pos += 8 + size
        if kind != b"MTrk":
            continue  # unknown chunks are skipped, as the standard asks
        events, i, tick, running = [], 0, 0, 0
        while i < len(body):
            delta, i = _read_varlen(body, i)
            tick += delta
            b = body[i]
            if b == 0xFF:  # meta
                length, j = _read_varlen(body, i + 2)
                events.append(MidiEvent(tick, body[i:j + length]))
                i = j + length
            elif b in (0xF0, 0xF7):  # sysex
                length, j = _read_varlen(body, i + 1)
                events.append(MidiEvent(tick, body[i:j + length]))
                i = j + length
            else:
                if b & 0x80:
                    running, i = b, i + 1
                n = 1 if running & 0xF0 in (0xC0, 0xD0) else 2
                events.append(MidiEvent(tick, bytes([running]) + body[i:i + n]))
                i += n
        tracks.append(events)
    return MidiFile(fmt, division, tracks)


def write_midi(midi: MidiFile) -> bytes:
    """Serialise (no running status; every track ends with one end-of-track event)."""
    out = [b"MThd", struct.pack(">IHHH", 6, midi.format, len(midi.tracks), midi.division)]
    for events in midi.tracks:
        body, last = bytearray(), 0
        for e in events:
            if e.data[:2] == b"\xff\x2f":
                continue
            body += _varlen(e.tick - last) + e.data
            last = e.tick
        end = max([last] + [e.tick for e in events if e.data[:2] == b"\xff\x2f"])
        body += _varlen(end - last) + b"\xff\x2f\x00"
        out += [b"MTrk", struct.pack(">I", len(body)), bytes(body)]
    return b"".join(out)


def cut_midi(midi: MidiFile, seconds: float, tail: float = TAIL_SECONDS) -> MidiFile:
    """The first ``seconds`` of a performance: events after ``seconds − tail`` are dropped, every
    sounding note and the sustain pedal are released there, and the tracks end at ``seconds`` so
    the release rings out instead of stopping dead."""
    tail = min(tail, seconds / 4)
    cut = midi.seconds_to_tick(seconds - tail)
    end = midi.seconds_to_tick(seconds)
    tracks = []
    for events in midi.tracks:
        kept, sounding, pedals = [], {}, set()
        for e in events:
            if e.tick >= cut or e.data[:2] == b"\xff\x2f":
                continue
            kept.append(e)
            kind, ch = e.status & 0xF0, e.status & 0x0F
            if kind == 0x90 and e.data[2] > 0:
                sounding[(ch, e.data[1])] = sounding.get((ch, e.data[1]), 0) + 1
            elif kind == 0x80 or (kind == 0x90 and e.data[2] == 0):
                if sounding.get((ch, e.data[1]), 0) > 0:
                    sounding[(ch, e.data[1])] -= 1
            elif kind == 0xB0 and e.data[1] in (64, 66, 67):  # sustain, sostenuto, soft
                pedals.add((ch, e.data[1]))
        for (ch, cc) in sorted(pedals):
            kept.append(MidiEvent(cut, bytes([0xB0 | ch, cc, 0])))
        for (ch, note), count in sorted(sounding.items()):
            kept.extend(MidiEvent(cut, bytes([0x80 | ch, note, 0])) for _ in range(count))
        kept.append(MidiEvent(end, b"\xff\x2f\x00"))
        tracks.append(kept)
    return MidiFile(midi.format, midi.division, tracks)


# --------------------------------------------------------------------------------------------
# Tools and inputs
# --------------------------------------------------------------------------------------------


def find_soundfont(explicit: Optional[str] = None) -> Optional[Path]:
    if explicit:
        return Path(explicit) if Path(explicit).is_file() else None
    return next((Path(p) for p in SOUNDFONT_CANDIDATES if Path(p).is_file()), None)


def ensure_tools(install: bool = True, soundfont: Optional[str] = None,
                 log: Callable[[str], None] = print) -> tuple[str, Path]:
    """``(fluidsynth executable, soundfont path)``; installs the Debian packages when missing and
    running as root, else raises :class:`RenderError` saying what to install."""
    exe, sf2 = shutil.which("fluidsynth"), find_soundfont(soundfont)
    if exe and sf2:
        return exe, sf2
    if soundfont and not Path(soundfont).is_file():
        raise RenderError(f"soundfont not found: {soundfont}")
    cmd = "apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
    if not install or not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RenderError("rendering the demo piano needs FluidSynth and the MuseScore General soundfont: "
                          f"install them with `sudo {cmd}` (Debian/Ubuntu), or pass --soundfont")
    log(f"installing {' '.join(APT_PACKAGES)} (about 470 MB) …")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if subprocess.run(cmd.split(), env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        if subprocess.run(cmd.split(), env=env).returncode != 0:
            raise RenderError(f"`{cmd}` failed; install the packages by hand and run again")
    exe, sf2 = shutil.which("fluidsynth"), find_soundfont(soundfont)
    if not (exe and sf2):
        raise RenderError(f"after `{cmd}`: fluidsynth={exe}, soundfont={sf2}; cannot render")
    return exe, sf2


def maestro_midis(cache: Optional[Path] = None, log: Callable[[str], None] = print) -> list[Path]:
    """The ten MAESTRO MIDIs from the ``miditok==3.1.0`` sdist, extracted into the cache (fetched
    once with ``pip download``; the archive's sha256 is checked). Sorted by their number."""
    cache = Path(cache or cache_dir())
    midi_dir = cache / "maestro-midi"
    found = sorted(midi_dir.glob("Maestro_*.mid"), key=_maestro_number)
    if len(found) == 10:
        return found
    sdist = cache / MIDITOK_SDIST
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"fetching the miditok==3.1.0 sdist for its MAESTRO MIDIs into {cache} (once; ~1 min) …")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                "--no-binary", ":all:", "miditok==3.1.0", "-d", tmp],
                               capture_output=True, text=True)
            got = Path(tmp) / MIDITOK_SDIST
            if r.returncode != 0 or not got.exists():
                raise RenderError("could not download miditok==3.1.0 (needed for its MAESTRO MIDIs): "
                                  f"{(r.stderr or r.stdout).strip()[-500:]}\nWith no network, put "
                                  f"{MIDITOK_SDIST} into {cache} by hand.")
            os.replace(got, sdist)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != MIDITOK_SHA256:
        raise RenderError(f"{sdist}: sha256 {digest} is not the published {MIDITOK_SHA256}; delete it and retry")
    midi_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name.startswith("Maestro_") and name.endswith(".mid"):
                data = tar.extractfile(member).read()
                tmp = midi_dir / f".{name}.tmp"
                tmp.write_bytes(data)
                os.replace(tmp, midi_dir / name)
    found = sorted(midi_dir.glob("Maestro_*.mid"), key=_maestro_number)
    if not found:
        raise RenderError(f"{sdist} holds no Maestro_*.mid files")
    return found


def _maestro_number(p: Path) -> int:
    digits = "".join(ch for ch in p.stem if ch.isdigit())
    return int(digits) if digits else 0


# --------------------------------------------------------------------------------------------
# Planning and rendering
# --------------------------------------------------------------------------------------------


def plan_lengths(durations: Sequence[float], total_seconds: float, min_piece_seconds: float = 30.0,
                 max_piece_seconds: Optional[float] = None) -> list[float]:
    """Seconds to render of each performance (0 = unused) so that they add up to ``total_seconds``.

    Without ``max_piece_seconds`` the cap is the smallest common length that reaches the total
    when every performance is rendered up to it (so the corpus spreads over as many
    performances as possible), but at least ``min_piece_seconds`` (so a tiny corpus is a few
    real excerpts rather than ten snippets). Performances are then taken in order, each up to
    the cap, the last one cut to what is left. If the performances are shorter in total, all of
    them are used whole.
    """
    if total_seconds <= 0:
        raise ValueError("total_seconds must be > 0")
    cap = max_piece_seconds
    if cap is None:
        ds = sorted(durations)
        cap = ds[-1] if ds else 0.0
        used = 0.0
        for i, d in enumerate(ds):  # water-filling: pieces below the level are used whole
            level = (total_seconds - used) / (len(ds) - i)
            if level <= d:
                cap = level
                break
            used += d
        cap = max(cap, min_piece_seconds)
    out, left = [], total_seconds
    for d in durations:
        take = min(d, cap, left) if left > 1e-6 else 0.0
        out.append(take)
        left -= take
    return out


def _render_params(midi: Path, seconds: float, soundfont: Path, gain: float, rate: int) -> dict:
    return {"midi": midi.name, "midi_sha256": hashlib.sha256(midi.read_bytes()).hexdigest(),
            "seconds": round(seconds, 3), "soundfont": soundfont.name, "gain": gain, "rate": rate}


def render_piece(midi_path: Path, out_path: Path, seconds: Optional[float], *, fluidsynth: str,
                 soundfont: Path, gain: float = GAIN, rate: int = RENDER_RATE) -> dict:
    """Render the first ``seconds`` (``None`` = all) of a MIDI file to a stereo 16-bit FLAC.

    The render parameters are stored as JSON in the FLAC's comment field, which is how the cache
    recognises a finished piece. Returns ``{"seconds": audio seconds, "peak": max |sample|}``.
    """
    midi = parse_midi(midi_path.read_bytes())
    full = midi.duration()
    cut = seconds is not None and seconds < full
    params = _render_params(midi_path, seconds if cut else full, soundfont, gain, rate)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".render-") as tmp:
        mid = Path(tmp) / "in.mid"
        mid.write_bytes(write_midi(cut_midi(midi, seconds)) if cut else midi_path.read_bytes())
        wav = Path(tmp) / "out.wav"
        # Float output so that nothing clips inside fluidsynth; we scale and quantise below.
        r = subprocess.run([fluidsynth, "-n", "-i", "-q", "-g", str(gain), "-r", str(rate),
                            "-O", "float", "-T", "wav", "-F", str(wav), str(soundfont), str(mid)],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode != 0 or not wav.exists():
            raise RenderError(f"fluidsynth failed on {midi_path.name}: {(r.stderr or r.stdout).strip()[-500:]}")
        audio, got_rate = sf.read(wav, dtype="float32", always_2d=True)
        if cut:
            audio = audio[: int(round(seconds * got_rate))]
            n = min(len(audio), int(FADE_SECONDS * got_rate))
            if n:
                audio[-n:] *= np.linspace(1.0, 0.0, n, dtype=np.float32)[:, None]
        peak = float(np.abs(audio).max()) if audio.size else 0.0
        if peak > 0.999:  # rare loud passages: scale the piece rather than clip it
            audio *= 0.999 / peak
        flac = Path(tmp) / "out.flac"
        with sf.SoundFile(flac, "w", got_rate, audio.shape[1], "PCM_16", format="FLAC") as f:
            f.comment = json.dumps(params, sort_keys=True)
            f.write(np.clip(np.rint(audio * 32767.0), -32768, 32767).astype(np.int16))
        os.replace(flac, out_path)
    return {"seconds": len(audio) / got_rate, "peak": peak}


def _cached(path: Path, params: dict) -> bool:
    try:
        with sf.SoundFile(path) as f:
            return json.loads(f.comment or "{}") == params
    except Exception:
        return False


def piece_name(midi: Path) -> str:
    """``Maestro_3.mid`` → ``maestro-03.flac``; other MIDI files keep a slug of their name."""
    if midi.stem.lower().startswith("maestro_"):
        return f"maestro-{_maestro_number(midi):02d}.flac"
    return "".join(ch if ch.isalnum() else "-" for ch in midi.stem.lower()).strip("-") + ".flac"


def render_corpus(out_dir: str | os.PathLike, minutes: float, *, max_piece_minutes: Optional[float] = None,
                  min_piece_seconds: float = 30.0, soundfont: Optional[str] = None, workers: int = 2,
                  install: bool = True, midi_files: Optional[Sequence[Path]] = None,
                  gain: float = GAIN, progress: bool = True,
                  log: Callable[[str], None] = print) -> list[Path]:
    """Render ``minutes`` of solo piano into ``out_dir`` (one FLAC per performance; cached).

    Pieces of an earlier plan that this plan does not use are removed from ``out_dir`` (only
    files named ``maestro-NN.flac``), so the folder holds exactly this corpus. Returns the
    FLAC paths in order.
    """
    fluidsynth, sf2 = ensure_tools(install=install, soundfont=soundfont, log=log)
    midis = list(midi_files) if midi_files is not None else maestro_midis(log=log)
    durations = [parse_midi(m.read_bytes()).duration() for m in midis]
    lengths = plan_lengths(durations, minutes * 60.0, min_piece_seconds,
                           None if max_piece_minutes is None else max_piece_minutes * 60.0)
    if sum(lengths) < minutes * 60.0 - 1:
        log(f"note: the MAESTRO MIDIs hold {sum(durations) / 60:.1f} min; rendering all of it "
            f"instead of {minutes:g} min")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(m, d, s) for m, d, s in zip(midis, durations, lengths) if s > 0]
    wanted = {piece_name(m) for m, _, _ in plan}
    for old in out.glob("maestro-*.flac"):
        if old.name not in wanted:
            old.unlink()
    for tmp in out.glob(".render-*"):  # left by a killed run
        shutil.rmtree(tmp, ignore_errors=True)
    todo = []
    for m, full, secs in plan:
        cut = secs < full
        params = _render_params(m, secs if cut else full, sf2, gain, RENDER_RATE)
        if not _cached(out / piece_name(m), params):
            todo.append((m, secs if cut else None, secs))
    log(f"demo piano: {len(plan)} pieces, {sum(lengths) / 60:.1f} min → {out} "
        f"({len(plan) - len(todo)} cached, {len(todo)} to render with {sf2.name})")
    if todo:
        t0 = time.time()
        with tqdm(total=round(sum(s for _, _, s in todo)), unit="s", desc="rendering",
                  disable=not progress, dynamic_ncols=True) as bar, \
                ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [(pool.submit(render_piece, m, out / piece_name(m), cut_at, fluidsynth=fluidsynth,
                                    soundfont=sf2, gain=gain), secs) for m, cut_at, secs in todo]
            for fut, secs in futures:
                fut.result()
                bar.update(round(secs))
        wall = time.time() - t0
        total = sum(s for _, _, s in todo)
        log(f"rendered {total / 60:.1f} min of audio in {wall:.1f} s ({total / max(wall, 1e-9):.0f}× real time)")
    return [out / piece_name(m) for m, _, _ in plan]
