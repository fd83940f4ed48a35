"""Reports for people and CI systems: what a model is (`inspection`), how a comparison went
(`checks`: JUnit XML, Markdown, text), what each layer became (`layers`: Markdown, HTML) and what
`evaluate` found (`evaluation`). Renderers read typed records (`records`: a report's JSON parsed
once, by field name); JSON is a record's ``to_dict`` through `graphopt.io.to_json`, written by
`graphopt.io.write_text` (atomic, like every file graphopt writes)."""
