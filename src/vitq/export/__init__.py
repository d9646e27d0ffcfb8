"""Exports of a quantized model: the packed integer artifact (``packed.py``)."""
