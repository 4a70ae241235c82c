"""Releasing: the gate, the release (manifest, signatures, provenance, SBOMs, CHANGES, page) and its offline verification; the nightly."""
