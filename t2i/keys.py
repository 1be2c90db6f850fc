"""Names of the entries t2i writes into checkpoints, in one place so that every layer reads them downward.

* ``TOKENIZER_KEY``: a stage-1 checkpoint's image tokenizer: ``{"target", "config", "prefix"}``
  (the class, its constructor arguments and the prefix of its weights in ``state_dict``).
* ``IMAGE_TOKENIZER_KEY``: a later stage's carried image tokenizer: ``{"target", "config", "state_dict"}``.
* ``TEXT_TOKENIZER_KEY``: an imported transformer's text tokenizer; ``LEXICON_KEY``: the entity lexicon of a
  model with knowledge; ``IMPORT_KEY``: where imported weights came from; ``SR_KEY``: a Real-ESRGAN net.
"""

TOKENIZER_KEY = "t2i_tokenizer"
IMAGE_TOKENIZER_KEY = "t2i_image_tokenizer"
TEXT_TOKENIZER_KEY = "t2i_text_tokenizer"
LEXICON_KEY = "t2i_entity_lexicon"
IMPORT_KEY = "t2i_import"
SR_KEY = "t2i_sr"
