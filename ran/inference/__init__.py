"""Inference on a user's own images: ``ran-cli predict``, the registered MLflow model that
takes image bytes, and ``ran-cli serve``.

- :mod:`ran.inference.images`: read any image PIL reads and cut it to the network's input
  the way evaluation's FFCV decoder does;
- :mod:`ran.inference.predictor`: a trained network with its record (classes,
  normalisation, input size), loaded from ``model.pt``, a training folder or an MLflow URI;
- :mod:`ran.inference.vitprior`: a vitmask network's ViT prior map per image, computed as
  the ``prior`` stage computes a record's;
- :mod:`ran.inference.masks`: attention masks blended over the image;
- :mod:`ran.inference.mlflow_model`: the MLflow model (from code, pickle-free) training
  logs and registers, and :func:`ran.inference.predictor.log_image_model` that logs it.
"""
