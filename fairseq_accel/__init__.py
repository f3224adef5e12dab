"""fairseq_accel: a fairseq plugin for smaller and faster Transformer ASR and NMT.

Importing the package itself loads nothing of fairseq; ``import fairseq_accel.plugin`` (what
``--user-dir user_dir`` does) registers the plugin's models, criteria and tasks with fairseq.
"""
__version__ = "0.1.0"
