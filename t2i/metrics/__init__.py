"""Evaluation metrics: feature extractors (:mod:`.features`), the FID / IS / CLIPScore / FD-CLIP
bundle with cached real statistics (:mod:`.scores`) and reconstruction metrics (:mod:`.recon`)."""
