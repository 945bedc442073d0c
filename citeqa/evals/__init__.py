"""citeqa.evals"""
