"""Data: source readers, the decode pass, FFCV betons, validation, ingestion."""
