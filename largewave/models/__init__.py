"""Models of largewave: WaveNet, encoders, quantisers, ADA levels and the prior."""
from .ada import ADALevel, LossOutput, Prior, WaveNetLevel
from .builders import build_level, count_parameters, describe, format_description
from .encoder import Encoder
from .quantizers import ArgmaxQuantiser, ContinuousQuantiser, QuantiserOutput, VectorQuantiser
from .wavenet import IncrementalState, WaveNet

__all__ = [
    "ADALevel", "ArgmaxQuantiser", "ContinuousQuantiser", "Encoder", "IncrementalState", "LossOutput",
    "Prior", "QuantiserOutput", "VectorQuantiser", "WaveNet", "WaveNetLevel", "build_level",
    "count_parameters", "describe", "format_description",
]
