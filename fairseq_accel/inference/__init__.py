"""Fast incremental decoding: beam caches, decoder steps and the generator that ``fairseq-generate`` uses
through the ``translation_accel`` / ``speech_to_text_accel`` tasks (``--accel-generator fast``)."""
