"""largewave: stacked autoregressive discrete autoencoders on raw audio, at cluster scale."""

__version__ = "0.1.0"
