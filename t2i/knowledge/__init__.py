"""Knowledge injection (ARTIST, issue 19): entity lexicon and linking (:mod:`t2i.knowledge.lexicon`)."""

from t2i.knowledge.lexicon import EntityLexicon, entity_batch, fold, load_lexicon

__all__ = ["EntityLexicon", "entity_batch", "fold", "load_lexicon"]
