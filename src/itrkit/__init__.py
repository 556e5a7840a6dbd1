"""itrkit: image-text retrieval with dual encoders, CUSA and IConE."""

__version__ = "0.1.0"
