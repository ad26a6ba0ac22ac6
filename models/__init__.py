"""Model definitions, audio features, export to ONNX and the shipped default weights.

Importing this package is cheap: it imports neither torch nor onnxruntime.  The
modules that need torch (``parametric``, ``wav2lip``, ``export``,
``audio_features_torch``) import it themselves, so the session process can use
``models.contract`` and ``models.audio_features`` without pulling in torch.
"""
