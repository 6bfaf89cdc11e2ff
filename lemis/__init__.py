"""Pieces every part of lemis shares and none owns: error types, atomic files and artefact records, the stage
runner of multi-stage methods."""
