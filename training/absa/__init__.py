"""The ABSA training stages: ``data`` (SemEval-2014 / MAMS readers), ``pair`` (the (text, aspect) polarity
classifier), ``tagger`` (aspect-term extraction), ``embed`` (the category embedder) and ``evaluate``."""
