"""The api layer: the user-facing Python API that loads any checkpoint format.

`from_pretrained` (`pretrained.py`), the EMA teacher as a model (`teacher.py`), `Transcriber`/`transcribe`
(`transcribe.py`), `Classifier`/`classify` (`classify.py`) and the parity reports `d2v verify` writes
(`verify.py` against transformers, `verify2.py` for data2vec 2.0). It imports core and convert, never
train or commands (ARCHITECTURE.md); `import flax_d2v` re-exports its entry points.
"""
