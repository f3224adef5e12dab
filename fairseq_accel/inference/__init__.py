"""Fast incremental decoding: beam caches, decoder steps and the generator that ``fairseq-generate`` uses
through the ``translation_accel`` / ``speech_to_text_accel`` tasks (``--accel-generator fast``).

Importing the package registers the fast steps of the decoders it supports (``transformer_step``,
``sanm_step``) with the registry in ``fast_decoder``.
"""
from fairseq_accel.inference import sanm_step, transformer_step  # noqa: F401  (register the fast decoders)
