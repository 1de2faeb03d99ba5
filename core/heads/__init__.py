"""Learned draft heads: the static EAGLE-3 head (`eagle3`, SGLang-exportable via `export_sglang`) and the light
online-trainable adaptive head (`adaptive`). Both borrow the target's frozen embedding and LM head.

Submodules are imported explicitly (`from adaspec.core.heads.eagle3 import Eagle3Head`) so that importing
the package costs nothing.
"""
