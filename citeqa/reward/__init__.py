"""citeqa.reward"""
