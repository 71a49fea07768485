"""Answering with the champion, without a web framework: the model holder and its hot swap, request
images, adaptive batching, the prediction log and local batch predictions."""
