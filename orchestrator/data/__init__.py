"""Shards: preparation (sources -> WebDataset tars + manifest) and streaming to ranks."""
