"""The lab model and the registries the code asks: the lab file, roles, media, firmware, accelerators, artefact kinds and their layout, assertion types, the quorum walk, faults."""
