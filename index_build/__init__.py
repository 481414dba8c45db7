"""Batched, resumable building of a MedFinder case index from a manifest, BIMCV-R, CT-RATE or a DICOM tree."""
