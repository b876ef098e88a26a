"""The lab: the built-in model's recipe (corpus, pretraining), the quality benchmark, bench and demo.

Run from the CLI; never imported by nodes/ (a test checks this)."""
