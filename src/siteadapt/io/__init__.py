"""Reading and writing imaging data: DICOM series, NIfTI, 2D images, manifests, de-identification."""
