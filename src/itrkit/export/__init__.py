"""Export a trained run for use outside itrkit: sentence-transformers, Hugging Face, ONNX.

``itrkit export RUN --format sentence-transformers|hf|onnx --out DIR`` (:func:`export_run`):

- ``sentence-transformers``: the text side (tower + trunk + cross or USA head) as a folder that
  ``SentenceTransformer(DIR)`` loads (:mod:`itrkit.export.st`);
- ``hf``: runs on Hugging Face CLIP towers become a ``CLIPModel`` folder for ``transformers``;
  other runs a self-contained itrkit model folder (every weight in one safetensors file) that
  :func:`itrkit.models.io.load_model` reads (:mod:`itrkit.export.hf`);
- ``onnx``: ``image_encoder.onnx`` and ``text_encoder.onnx`` (tower + trunk + head, L2-normalised
  output) with the tokenizer and preprocessing beside them (:mod:`itrkit.export.onnx_export`).

Every export carries a model card (``README.md``: data, method, recipe, metrics, the command;
:mod:`itrkit.export.card`). A run whose towers cannot be expressed in the asked format stops with
one :class:`ExportError` line naming the tower and what would work instead.
"""

from __future__ import annotations

from itrkit.export.common import FORMATS, HEADS, ExportError, export_run

__all__ = ["FORMATS", "HEADS", "ExportError", "export_run"]
