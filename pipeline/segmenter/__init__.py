"""The downstream segmenter: training on label masks (train.py) and inference, scoring and the ``predict``
command (predict.py). The model itself is in ``pipeline.models.segmenter``."""
