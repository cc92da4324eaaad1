"""kfp-finetune pipelines: the @dsl.pipeline definition and the operator commands (compile, run, submit,
schedule)."""
