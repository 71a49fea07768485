"""Answering with the champion, without a web framework, one job per module: request images
(``images``), the model call and its adaptive batching (``batcher``), following the registry alias
(``swap``), predicting, explaining and logging (``predictor``), the prediction log
(``prediction_log``) and predictions on local files (``batch_predict``)."""
