"""Where images come from: sources (folders, manifests, webdataset tars, URLs), the one manifest reader,
image formats (HEIC, AVIF, RAW refusals), safe image opening and preprocessing, photo metadata
columns (EXIF, folder), and the generated shapes dataset."""
