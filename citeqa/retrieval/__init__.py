"""citeqa.retrieval"""
