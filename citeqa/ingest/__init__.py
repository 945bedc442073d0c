"""citeqa.ingest"""
