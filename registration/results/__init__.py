"""What a registration leaves behind: the result folder, the QA picture,
the verdict in words, DICOM REG objects and warped label maps."""
