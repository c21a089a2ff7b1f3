"""Training data preparation (e.g. `prepare_tr`: Turkish text from Debian's LibreOffice help)."""
