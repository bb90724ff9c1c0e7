"""The one place that turns a stack config into modules (models never see a config)."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..config import StackConfig
from .ada import ADALevel, Prior, WaveNetLevel
from .encoder import Encoder
from .quantizers import ArgmaxQuantiser, ContinuousQuantiser, VectorQuantiser
from .wavenet import WaveNet


def build_wavenet(cfg: StackConfig, level_name: str, conditioned: bool) -> WaveNet:
    lv = cfg.level(level_name)
    d = lv.decoder
    return WaveNet(
        vocab=cfg.vocab(level_name),
        dilations=d.dilation_schedule(),
        residual_channels=d.residual_channels,
        gate_channels=d.gate_channels,
        skip_channels=d.skip_channels,
        kernel_size=d.kernel_size,
        input_kernel_size=d.input_kernel_size,
        cond_channels=d.cond_channels if conditioned else 0,
        cond_hop=lv.hop if conditioned else 1,
        upsample=d.upsample,
    )


def build_quantiser(cfg: StackConfig, level_name: str) -> nn.Module:
    q = cfg.level(level_name).quantiser
    if q.kind == "amae":
        return ArgmaxQuantiser(q.codes, q.dim, normalise=q.normalise, diversity_weight=q.diversity_weight,
                               usage_window=q.usage_window)
    if q.kind == "vqvae":
        return VectorQuantiser(q.codes, q.dim, ema=q.ema, decay=q.decay, commitment_weight=q.commitment_weight,
                               codebook_weight=q.codebook_weight, restart_threshold=q.restart_threshold,
                               usage_window=q.usage_window)
    return ContinuousQuantiser(q.dim)


def build_encoder(cfg: StackConfig, level_name: str, out_channels: int) -> Encoder:
    lv = cfg.level(level_name)
    e = lv.encoder
    return Encoder(
        vocab=cfg.vocab(level_name),
        out_channels=out_channels,
        hop=lv.hop,
        channels=e.channels,
        dilations=[2 ** i for _ in range(e.stacks) for i in range(e.layers_per_stack)],
        kernel_size=e.kernel_size,
        downsample=e.downsample,
        waveform_input=cfg.below(level_name) is None,
        input_embedding=e.input_embedding,
    )


def build_level(cfg: StackConfig, level_name: str) -> nn.Module:
    """The module of one level: :class:`ADALevel` (kinds ``ada`` and ``nsynth``), :class:`Prior`
    (``prior``) or :class:`WaveNetLevel` (``wavenet``)."""
    lv = cfg.level(level_name)
    if lv.kind in ("prior", "wavenet"):
        net = build_wavenet(cfg, level_name, conditioned=False)
        return Prior(net) if lv.kind == "prior" else WaveNetLevel(net)
    quantiser = build_quantiser(cfg, level_name)
    encoder = build_encoder(cfg, level_name, quantiser.input_dim)
    decoder = build_wavenet(cfg, level_name, conditioned=True)
    return ADALevel(encoder, quantiser, decoder)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(cfg: StackConfig) -> list[dict[str, Any]]:
    """Per level: parameters, the decoder's receptive field (tokens, seconds of audio), the
    encoder's window, vocabulary and rates — for printing at start-up."""
    rows = []
    for name in cfg.level_names():
        lv = cfg.level(name)
        module = build_level(cfg, name)
        rate = cfg.input_rate(name)
        rf = module.receptive_field
        row: dict[str, Any] = {
            "level": name,
            "kind": lv.kind,
            "vocab": cfg.vocab(name),
            "params": count_parameters(module),
            "input_rate_hz": rate,
            "receptive_field_tokens": rf,
            "receptive_field_seconds": rf / rate,
            "receptive_field_audio_samples": rf * cfg.samples_per_token(name),
        }
        if isinstance(module, ADALevel):
            row.update({
                "hop": module.hop,
                "code_rate_hz": rate / module.hop,
                "codes": lv.quantiser.codes if module.discrete else None,
                "encoder_params": count_parameters(module.encoder),
                "decoder_params": count_parameters(module.decoder),
                "encoder_window_tokens": module.encoder.receptive_field,
                "encoder_window_seconds": module.encoder.receptive_field / rate,
            })
        rows.append(row)
    return rows


def format_description(cfg: StackConfig) -> str:
    """``describe(cfg)`` as aligned text lines."""
    lines = []
    for r in describe(cfg):
        s = (f"{r['level']:>7} {r['kind']:<8} V={r['vocab']:<5} params={r['params'] / 1e6:7.3f}M  "
             f"rf={r['receptive_field_tokens']} tokens = {r['receptive_field_seconds'] * 1000:.1f} ms")
        if "hop" in r:
            s += (f"  hop={r['hop']} codes={r['codes']} ({r['code_rate_hz']:g} Hz)"
                  f"  encoder window={r['encoder_window_tokens']} tokens")
        lines.append(s)
    return "\n".join(lines)
