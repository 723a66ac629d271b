"""Data layer: loading and mixing sources, schema checks, the tokenizer, packing, and the default task data.

sources.py   DataSource, load_source, load_mixture
schemas.py   check_schema: columns and row shapes per stage
tokenizer.py train_tokenizer, CHAT_TEMPLATE, bytes_per_token
packing.py   pack_documents / pack_batch / pack_dataset, collate_packed
tasks.py     reasoning-gym tasks: generation, DPO wrong answers, score and the TRL reward_fn
default_data.py build_default_data: the offline default recipe data
builtin.py   `quill:default/NAME` paths, built and cached on first use
labelled.py  the encoder recipes' `quill:encoder/NAME` sets and the labelled-data checks
"""

DEFAULT_PREFIX = "quill:default/"  # the embedded default data (its demonstrator applies only to these sources)
