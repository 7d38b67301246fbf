"""Reading and checking images: NIfTI, NRRD, MetaImage and DICOM series
(folders and zips, slice stacks that are no regular grid), and writing volumes."""
