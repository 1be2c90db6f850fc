"""Evaluation protocols and the loop they share with the training callbacks (``t2i-eval`` is the command).

* :mod:`t2i.eval.checks`: protocol settings refused before any model loads.
* :mod:`t2i.eval.items`: what a protocol evaluates (captions and their real images), and the metric scores.
* :mod:`t2i.eval.generation`: captions -> candidates -> rerank -> one image per caption -> metric updates
  (the :class:`~t2i.callbacks.generation_metrics.GenerationMetrics` callback runs the same loop).
* :mod:`t2i.eval.benchmarks`: the text-to-image protocols (Shapes, Shapes-KG, MUGE, COCO-CN, COCO-30k).
* :mod:`t2i.eval.reconstruction`, :mod:`t2i.eval.captioning`, :mod:`t2i.eval.spade`: the other protocols.
* :mod:`t2i.eval.processes`: ranks, gathering, autocast, hashes and versions for several processes.
"""
