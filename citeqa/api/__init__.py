"""citeqa.api"""
