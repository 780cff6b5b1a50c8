"""MALA: the MAE turned into a direct defect segmenter (synthetic anomalies, token balance, two-stage training)."""  # noqa: E501
