"""Importers for public image-tokenizer weights.

* :func:`load_taming_vqgan`: CompVis taming-transformers VQGAN (``VQModel`` / ``GumbelVQ``) ``.ckpt`` +
  YAML -> :class:`t2i.models.vqgan.VQGAN`.
* :func:`load_openai_dvae`: OpenAI's DALL·E dVAE (``encoder.pkl`` / ``decoder.pkl``) ->
  :class:`t2i.models.dvae.DVAE`; :func:`save_openai_dvae_state` converts the pickles to weights-only files.

No file is fully unpickled unless the caller passes ``trust_pickle=True`` (see :mod:`t2i.pretrained._pickle`).
"""

from t2i.pretrained.openai import load_openai_dvae, openai_dvae_config, save_openai_dvae_state
from t2i.pretrained.taming import find_taming_config, load_taming_vqgan, taming_vqgan_config

__all__ = ["find_taming_config", "load_openai_dvae", "load_taming_vqgan", "openai_dvae_config",
           "save_openai_dvae_state", "taming_vqgan_config"]
