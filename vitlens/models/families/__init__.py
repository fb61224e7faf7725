"""Model families: one module per family, each registering its adapter (or refusals) on import.

``vitlens.models.registry`` imports every module here on first use; nothing else
lists the families. Machinery shared by families (the parts vocabulary, LRP rules,
transformers glue, window geometry) lives one level up, in ``vitlens.models``.
"""
