"""The evaluation of docs/method.md §7.

`metrics` has the statistics (discrepancy, toxicity ratio, FID, Inception Score, CLIP score),
`judges` the judge roles and the CLIP judge, `vlm` / `llava` the VLM toxicity judges, `evaluate`
the whole run (generate, judge, manifest, results) and `report` its report.md and grid.
"""
