"""Weights from files: :func:`load_tokenizer` (any image tokenizer, ours or a release) and the importers for
public weights (``t2i-import`` is the command-line front door, :mod:`t2i.cli.importer`).

* :func:`load_tokenizer` / :func:`tokenizer_spec` (:mod:`t2i.pretrained.image_tokenizers`): an image tokenizer
  from our checkpoint, a carried record or a spec naming public files.
* :func:`load_taming_vqgan`: CompVis taming-transformers VQGAN (``VQModel`` / ``GumbelVQ``) ``.ckpt`` +
  YAML -> :class:`t2i.models.vqgan.VQGAN`.
* :func:`load_openai_dvae`: OpenAI's DALL·E dVAE (``encoder.pkl`` / ``decoder.pkl``) ->
  :class:`t2i.models.dvae.DVAE`; :func:`save_openai_dvae_state` converts the pickles to weights-only files.
* :func:`load_easynlp` (:mod:`t2i.pretrained.easynlp`): EasyNLP pai-painter -> transformer + tokenizers.
* :func:`load_rudalle` (:mod:`t2i.pretrained.rudalle`): ruDALL-E v3 (Malevich) -> transformer + tokenizers.
* :func:`load_realesrgan` / :func:`load_sr` (:mod:`t2i.pretrained.realesrgan`): Real-ESRGAN -> RRDBNet.
* :func:`bert_tokenizer`, :func:`yttm_tokenizer` (:mod:`t2i.data.vocabs`): their text tokenizers.

No file is fully unpickled unless the caller passes ``trust_pickle=True`` (see :mod:`t2i.pretrained._pickle`).
"""

from t2i.data.vocabs import bert_tokenizer, yttm_tokenizer
from t2i.pretrained.easynlp import load_easynlp
from t2i.pretrained.image_tokenizers import load_tokenizer, tokenizer_spec
from t2i.pretrained.openai import load_openai_dvae, openai_dvae_config, save_openai_dvae_state
from t2i.pretrained.realesrgan import load_realesrgan, load_sr
from t2i.pretrained.rudalle import load_rudalle
from t2i.pretrained.taming import find_taming_config, load_taming_vqgan, taming_vqgan_config

__all__ = ["bert_tokenizer", "find_taming_config", "load_easynlp", "load_openai_dvae", "load_realesrgan",
           "load_rudalle", "load_sr", "load_taming_vqgan", "load_tokenizer", "openai_dvae_config", "save_openai_dvae_state",
           "taming_vqgan_config", "tokenizer_spec", "yttm_tokenizer"]
