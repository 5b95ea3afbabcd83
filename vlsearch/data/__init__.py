"""Where images come from: sources (folders, manifests, webdataset tars, URLs), the one manifest reader,
safe image opening and preprocessing, and the generated shapes dataset."""
