"""Reports for people and CI systems: what a model is (`inspection`), how a comparison went
(`checks`: JUnit XML, Markdown, text) and what each layer became (`layers`: Markdown, HTML).
JSON is written by `graphopt.io.write_json` (atomic, like every file graphopt writes)."""
