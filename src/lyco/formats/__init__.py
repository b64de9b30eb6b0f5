"""File formats: pure state-dict ↔ state-dict conversions plus reading/writing files."""
