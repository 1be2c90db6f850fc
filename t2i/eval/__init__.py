"""Evaluation protocols and the loop they share with the training callbacks (``t2i-eval`` is the command).

* :mod:`t2i.eval.generation`: captions -> candidates -> rerank -> one image per caption -> metric updates
  (the :class:`~t2i.callbacks.generation_metrics.GenerationMetrics` callback runs the same loop).
"""
