"""citeqa.generation"""
