"""Prefix store: the artifact format, PEFT import, backends and the tiered registry.

Never imports `server`; the server imports from the submodules here.
"""
