"""The evaluation of REFERENCE.md section 7.

`metrics` has the statistics (discrepancy, toxicity ratio, FID, Inception Score, CLIP score),
`vlm` the VLM toxicity judge, `judges` the CLIP zero-shot judges, `evaluate` the whole run and
`report` its grids and report.md.
"""
