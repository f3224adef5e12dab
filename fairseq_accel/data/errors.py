"""The one exception type of corpus and feature preparation.

Every problem with the user's input data or options is a :class:`CorpusError` whose message names the
file (and line, utterance or option) and says what was expected and what was found; the
``fairseq-accel-prepare`` CLI prints it as one line and exits with status 2.
"""


class CorpusError(ValueError):
    """A problem with the user's input data or options; the CLI prints it as one line and exits 2."""
