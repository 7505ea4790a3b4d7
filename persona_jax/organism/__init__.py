"""The persona organism: a synthetic chat language, its tokenizer, exact judge, trait
artifacts and corpora, so the whole method runs end to end on a small model trained here.

Modules: `language` (grammar, traits, sampling, parsing), `tokenizer` (the Hugging Face
tokenizer files and the chat template), `judge` (`OrganismJudge`, the taught-closing
content metric), `artifacts` (trait JSONs, the system-prompt ladder, many-shot prompts),
`data` (pretraining corpus, fine-tuning and flagging datasets). `assets/` holds the
shipped tokenizer (and the trained organism's files).
"""
